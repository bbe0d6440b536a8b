"""Saved experiments: one SQLite file in the user's data directory, so a workbench session's
prompts, settings and results survive a restart of the server.

Every call opens its own connection (the server runs handlers on a thread pool, and a SQLite
connection belongs to one thread); WAL mode lets readers and the writer proceed together.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import platformdirs

FILE_NAME = "workbench.sqlite3"
DATA_DIR_VARIABLE = "MECHSCOPE_DATA_DIR"
KINDS = ("prompt", "patching", "activation")
SCHEMA_VERSION = 1
# Each step takes the database from version i to i + 1; a later schema appends a step.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE experiments (id INTEGER PRIMARY KEY, created TEXT NOT NULL, kind TEXT NOT NULL,"
        " model TEXT NOT NULL, title TEXT NOT NULL, settings TEXT NOT NULL, result TEXT NOT NULL)",
    ),
)
SUMMARY_COLUMNS = "id, created, kind, model, title"


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            migrate(db, self.path)

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
        row = (created, kind, model, title, json.dumps(settings), json.dumps(result))
        with self.connect() as db:
            cursor = db.execute(
                "INSERT INTO experiments (created, kind, model, title, settings, result) VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cursor.lastrowid)

    def get(self, id: int) -> Experiment:
        """The experiment with this id, or KeyError naming it."""
        with self.connect() as db:
            row = db.execute(f"SELECT {SUMMARY_COLUMNS}, settings, result FROM experiments WHERE id = ?", (id,))
            found = row.fetchone()
        if found is None:
            raise KeyError(f"no experiment with id {id}")
        *summary, settings, result = found
        return Experiment(*summary, settings=json.loads(settings), result=json.loads(result))

    def delete(self, id: int) -> None:
        """Remove one experiment; KeyError if there is none with this id."""
        with self.connect() as db:
            if db.execute("DELETE FROM experiments WHERE id = ?", (id,)).rowcount == 0:
                raise KeyError(f"no experiment with id {id}")

    def list(self, limit: int = 100) -> list[ExperimentSummary]:
        """The newest ``limit`` experiments, newest first, without their results."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1; got {limit}")
        with self.connect() as db:
            rows = db.execute(f"SELECT {SUMMARY_COLUMNS} FROM experiments ORDER BY id DESC LIMIT ?", (limit,))
            return [ExperimentSummary(*row) for row in rows.fetchall()]

    def __repr__(self) -> str:
        return f"ExperimentStore({str(self.path)!r})"


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to SCHEMA_VERSION; refuse a file written by a newer mechscope.

    The write lock is taken before the version is read, so two servers starting on one file
    cannot both create the table."""
    db.execute("BEGIN IMMEDIATE")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"{path} has schema version {version}, newer than this mechscope's {SCHEMA_VERSION}: "
            "upgrade mechscope or pass another database"
        )
    for step in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[step]:
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
