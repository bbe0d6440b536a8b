"""Saved experiments: one SQLite file in the user's data directory, so a workbench session's
prompts, settings and results survive a restart of the server.

Every call opens its own connection (the server runs handlers on a thread pool, and a SQLite
connection belongs to one thread); WAL mode lets readers and the writer proceed together.
A result (every widget's data) is stored as zlib-compressed JSON: a prompt on a 12-layer,
12-head model is ~25 MB of JSON text, mostly digits, which compresses several times over.
"""

from __future__ import annotations

import json
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import platformdirs

FILE_NAME = "workbench.sqlite3"
DATA_DIR_VARIABLE = "MECHSCOPE_DATA_DIR"
KINDS = ("prompt", "patching", "activation", "feature")  # a new kind needs no new schema
SUMMARY_COLUMNS = "id, created, kind, model, title"
MAX_ID = 2**63 - 1  # SQLite's largest integer key
COMPRESSION_LEVEL = 6


class StoreError(ValueError):
    """The database cannot be used: the message names the file and what to do about it."""


def compress(result: dict[str, Any]) -> bytes:
    return zlib.compress(json.dumps(result).encode(), COMPRESSION_LEVEL)


def decompress(blob: bytes) -> dict[str, Any]:
    return json.loads(zlib.decompress(blob))


def default_path() -> Path:
    """``$MECHSCOPE_DATA_DIR/workbench.sqlite3``, else the platform's per-user data directory."""
    directory = os.environ.get(DATA_DIR_VARIABLE) or platformdirs.user_data_dir("mechscope")
    return Path(directory) / FILE_NAME


@dataclass(frozen=True)
class ExperimentSummary:
    """One row of the experiment list: enough to show it, without its (large) result."""

    id: int
    created: str
    kind: str
    model: str
    title: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Experiment(ExperimentSummary):
    """A saved experiment: what was asked (settings) and what came back (result)."""

    settings: dict[str, Any]
    result: dict[str, Any]


class ExperimentStore:
    """Experiments saved in a SQLite file (``path``, default :func:`default_path`)."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        if self.path.is_dir():
            raise StoreError(
                f"the experiment database {self.path} is a directory; pass --db a file inside it, "
                f"such as {self.path / FILE_NAME}"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                migrate(db, self.path)
        except (sqlite3.Error, OSError) as error:
            raise StoreError(
                f"cannot open the experiment database {self.path}: {error}; pass --db elsewhere or move it aside"
            ) from error

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection, committed on success and rolled back on error, then closed."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db, db:
            yield db

    def save(self, kind: str, model: str, title: str, settings: dict[str, Any], result: dict[str, Any]) -> int:
        """Store one experiment and return its id."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        row = (created, kind, model, title, json.dumps(settings), compress(result))
        with self.connect() as db:
            cursor = db.execute(
                "INSERT INTO experiments (created, kind, model, title, settings, result) VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cursor.lastrowid)

    def get(self, id: int) -> Experiment:
        """The experiment with this id, or KeyError naming it."""
        check_id(id)
        with self.connect() as db:
            row = db.execute(f"SELECT {SUMMARY_COLUMNS}, settings, result FROM experiments WHERE id = ?", (id,))
            found = row.fetchone()
        if found is None:
            raise KeyError(f"no experiment with id {id}")
        *summary, settings, result = found
        return Experiment(*summary, settings=json.loads(settings), result=decompress(result))

    def delete(self, id: int) -> None:
        """Remove one experiment; KeyError if there is none with this id."""
        check_id(id)
        with self.connect() as db:
            if db.execute("DELETE FROM experiments WHERE id = ?", (id,)).rowcount == 0:
                raise KeyError(f"no experiment with id {id}")

    def list(self, limit: int = 100, before: int | None = None) -> list[ExperimentSummary]:
        """The newest ``limit`` experiments (older than id ``before``, for the next page), newest
        first, without their results."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1; got {limit}")
        where, bound = ("", ()) if before is None else ("WHERE id < ?", (min(before, MAX_ID),))
        with self.connect() as db:
            query = f"SELECT {SUMMARY_COLUMNS} FROM experiments {where} ORDER BY id DESC LIMIT ?"
            rows = db.execute(query, (*bound, limit))
            return [ExperimentSummary(*row) for row in rows.fetchall()]

    def __repr__(self) -> str:
        return f"ExperimentStore({str(self.path)!r})"


def check_id(id: int) -> None:
    """An id SQLite cannot even hold names no experiment (rather than overflowing in the query)."""
    if abs(id) > MAX_ID:
        raise KeyError(f"no experiment with id {id} (ids are at most {MAX_ID})")


def create_table(db: sqlite3.Connection) -> None:
    """Version 1: one row per experiment, the result as JSON text."""
    db.execute(
        "CREATE TABLE experiments (id INTEGER PRIMARY KEY, created TEXT NOT NULL, kind TEXT NOT NULL,"
        " model TEXT NOT NULL, title TEXT NOT NULL, settings TEXT NOT NULL, result TEXT NOT NULL)"
    )


def compress_results(db: sqlite3.Connection) -> None:
    """Version 2: the result column holds zlib-compressed JSON; earlier rows are compressed
    one at a time (a version-1 result can be tens of megabytes)."""
    db.execute("ALTER TABLE experiments RENAME TO experiments_v1")
    db.execute(
        "CREATE TABLE experiments (id INTEGER PRIMARY KEY, created TEXT NOT NULL, kind TEXT NOT NULL,"
        " model TEXT NOT NULL, title TEXT NOT NULL, settings TEXT NOT NULL, result BLOB NOT NULL)"
    )
    ids = [id for (id,) in db.execute("SELECT id FROM experiments_v1 ORDER BY id")]
    for id in ids:
        *row, result = db.execute(
            f"SELECT {SUMMARY_COLUMNS}, settings, result FROM experiments_v1 WHERE id = ?", (id,)
        ).fetchone()
        db.execute("INSERT INTO experiments VALUES (?, ?, ?, ?, ?, ?, ?)", (*row, compress(json.loads(result))))
    db.execute("DROP TABLE experiments_v1")


# Step i takes the database from version i to i + 1; a later schema appends a step.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (create_table, compress_results)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to SCHEMA_VERSION; refuse a file written by a newer mechscope.

    The write lock is taken before the version is read, so two servers starting on one file
    cannot both create the table."""
    db.execute("BEGIN IMMEDIATE")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the experiment database {path} has schema version {version}, newer than this mechscope's "
            f"{SCHEMA_VERSION}: upgrade mechscope or pass --db another file"
        )
    for step in MIGRATIONS[version:]:
        step(db)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
