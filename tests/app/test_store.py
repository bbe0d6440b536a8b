"""The experiment store: what is saved comes back, newest first, after a restart too."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.app import store as store_module
from mechscope.app.store import KINDS, MAX_ID, SCHEMA_VERSION, ExperimentStore, StoreError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**9), 10**9) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)  # fmt: skip
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


@pytest.fixture
def store(tmp_path) -> ExperimentStore:
    return ExperimentStore(tmp_path / "experiments.sqlite3")


def test_a_saved_experiment_comes_back_whole(store):
    id = store.save("prompt", "language", "a title", {"prompt": "x <b>"}, {"sections": [{"id": "tokens"}]})
    got = store.get(id)
    assert (got.id, got.kind, got.model, got.title) == (id, "prompt", "language", "a title")
    assert got.settings == {"prompt": "x <b>"}
    assert got.result == {"sections": [{"id": "tokens"}]}
    assert got.created.endswith("+00:00")  # UTC, ISO 8601


@settings(max_examples=20, deadline=None)
@given(settings_=json_objects, result=json_objects, title=st.text(max_size=40))
def test_any_json_settings_and_result_round_trip(tmp_path_factory, settings_, result, title):
    store = ExperimentStore(tmp_path_factory.mktemp("db") / "db.sqlite3")
    got = store.get(store.save("activation", "m", title, settings_, result))
    assert (got.settings, got.result, got.title) == (settings_, result, title)


def test_the_list_is_newest_first_and_leaves_out_results(store):
    ids = [store.save(kind, "m", f"t{i}", {}, {"big": i}) for i, kind in enumerate(KINDS * 2)]
    listed = store.list()
    assert [s.id for s in listed] == ids[::-1]
    assert [s.kind for s in listed] == list(KINDS * 2)[::-1]
    assert set(listed[0].to_json()) == {"id", "created", "kind", "model", "title"}
    assert [s.id for s in store.list(limit=2)] == ids[:-3:-1]


def test_the_list_pages_back_from_an_id(store):
    ids = [store.save("prompt", "m", f"t{i}", {}, {}) for i in range(7)]
    first = store.list(limit=3)
    second = store.list(limit=3, before=first[-1].id)
    last = store.list(limit=3, before=second[-1].id)
    assert [[s.id for s in page] for page in (first, second, last)] == [ids[:3:-1], ids[3:0:-1], ids[:1]]
    assert store.list(limit=3, before=ids[0]) == []
    assert [s.id for s in store.list(before=MAX_ID * 10)] == ids[::-1]


def test_experiments_survive_a_restart(tmp_path):
    path = tmp_path / "db.sqlite3"
    id = ExperimentStore(path).save("patching", "m", "kept", {"hook": "resid_pre"}, {"sections": []})
    reopened = ExperimentStore(path)
    assert [s.id for s in reopened.list()] == [id]
    assert reopened.get(id).settings == {"hook": "resid_pre"}


def test_delete_removes_one_experiment(store):
    kept, dropped = store.save("prompt", "m", "a", {}, {}), store.save("prompt", "m", "b", {}, {})
    store.delete(dropped)
    assert [s.id for s in store.list()] == [kept]
    with pytest.raises(KeyError):
        store.get(dropped)


def test_the_file_is_versioned_and_in_wal_mode(store):
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [(row[1], row[2]) for row in db.execute("PRAGMA table_info(experiments)")]
    assert [name for name, _ in columns] == ["id", "created", "kind", "model", "title", "settings", "result"]
    assert dict(columns)["result"] == "BLOB"


def test_results_are_stored_compressed(store):
    result = {"sections": [{"values": [[0.123456] * 200] * 50}]}
    id = store.save("prompt", "m", "big", {}, result)
    with sqlite3.connect(store.path) as db:
        kind, size = db.execute("SELECT typeof(result), length(result) FROM experiments WHERE id = ?", (id,)).fetchone()
    assert kind == "blob" and size < len(json.dumps(result)) / 10
    assert store.get(id).result == result


def version_1_file(path, rows: list[tuple[str, dict, dict]]) -> None:
    """A database as the first workbench wrote it: results as JSON text, user_version 1."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE experiments (id INTEGER PRIMARY KEY, created TEXT NOT NULL, kind TEXT NOT NULL,"
            " model TEXT NOT NULL, title TEXT NOT NULL, settings TEXT NOT NULL, result TEXT NOT NULL)"
        )
        for title, settings_, result in rows:
            db.execute(
                "INSERT INTO experiments (created, kind, model, title, settings, result) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    "2025-01-01T00:00:00.000+00:00",
                    "prompt",
                    "language",
                    title,
                    json.dumps(settings_),
                    json.dumps(result),
                ),
            )
        db.execute("PRAGMA user_version = 1")


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.tuples(st.text(max_size=20), json_objects, json_objects), max_size=4))
def test_a_version_1_file_is_migrated_and_its_rows_stay_readable(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("v1") / "db.sqlite3"
    version_1_file(path, rows)
    store = ExperimentStore(path)
    listed = store.list()[::-1]
    assert [s.title for s in listed] == [title for title, _, _ in rows]
    for summary, (_, settings_, result) in zip(listed, rows, strict=True):
        got = store.get(summary.id)
        assert (got.settings, got.result, got.created) == (settings_, result, "2025-01-01T00:00:00.000+00:00")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert {kind for (kind,) in db.execute("SELECT typeof(result) FROM experiments")} <= {"blob"}
    assert store.get(store.save("prompt", "m", "new", {}, {"x": 1})).result == {"x": 1}


def test_the_default_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_DATA_DIR", str(tmp_path / "data"))
    store = ExperimentStore()
    assert store.path == tmp_path / "data" / store_module.FILE_NAME
    assert store.path.exists()


def test_saves_from_many_threads_all_land(store):
    def save_some(worker: int) -> None:
        for i in range(5):
            store.save("prompt", "m", f"{worker}-{i}", {}, {})

    threads = [threading.Thread(target=save_some, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(s.title for s in store.list()) == sorted(f"{w}-{i}" for w in range(4) for i in range(5))


@pytest.mark.bad_input
def test_a_missing_id_is_a_key_error_naming_it(store):
    with pytest.raises(KeyError, match="no experiment with id 41"):
        store.get(41)
    with pytest.raises(KeyError, match="41"):
        store.delete(41)


@pytest.mark.bad_input
@pytest.mark.parametrize("id", [MAX_ID + 1, 10**30, -(10**30)])
def test_an_id_too_large_for_sqlite_is_a_key_error_not_an_overflow(store, id):
    with pytest.raises(KeyError, match=f"no experiment with id {id}"):
        store.get(id)
    with pytest.raises(KeyError, match="ids are at most"):
        store.delete(id)


@pytest.mark.bad_input
def test_an_unknown_kind_is_refused(store):
    with pytest.raises(ValueError, match="kind must be one of prompt, patching, activation, feature; got 'sweep'"):
        store.save("sweep", "m", "t", {}, {})


@pytest.mark.bad_input
def test_a_non_positive_limit_is_refused(store):
    with pytest.raises(ValueError, match="limit must be at least 1"):
        store.list(limit=0)


@pytest.mark.bad_input
def test_a_database_from_a_newer_mechscope_is_refused(tmp_path):
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"{path} has schema version {SCHEMA_VERSION + 1}, newer than this mechscope"):
        ExperimentStore(path)


@pytest.mark.bad_input
@pytest.mark.parametrize("content", [b"not a database, just text\n", bytes(range(256)) * 20])
def test_a_file_that_is_not_a_database_is_a_store_error_saying_what_to_do(tmp_path, content):
    path = tmp_path / "notes.sqlite3"
    path.write_bytes(content)
    with pytest.raises(StoreError) as raised:
        ExperimentStore(path)
    message = str(raised.value)
    assert message.startswith(f"cannot open the experiment database {path}: ")
    assert "file is not a database" in message and message.endswith("pass --db elsewhere or move it aside")
    assert isinstance(raised.value, ValueError)  # the command line reports ValueErrors as one line
    assert path.read_bytes() == content  # never overwritten


@pytest.mark.bad_input
def test_a_directory_given_as_the_database_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match=f"{tmp_path} is a directory; pass --db a file inside it"):
        ExperimentStore(tmp_path)


@pytest.mark.bad_input
def test_a_database_under_a_file_is_a_store_error(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(StoreError, match=f"cannot open the experiment database {blocker / 'db.sqlite3'}: "):
        ExperimentStore(blocker / "db.sqlite3")
