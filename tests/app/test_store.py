"""The experiment store: what is saved comes back, newest first, after a restart too."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.app import store as store_module
from mechscope.app.store import KINDS, SCHEMA_VERSION, ExperimentStore

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
        columns = [row[1] for row in db.execute("PRAGMA table_info(experiments)")]
    assert columns == ["id", "created", "kind", "model", "title", "settings", "result"]


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
def test_an_unknown_kind_is_refused(store):
    with pytest.raises(ValueError, match="kind must be one of prompt, patching, activation; got 'sweep'"):
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
    with pytest.raises(RuntimeError, match="newer than this mechscope"):
        ExperimentStore(path)
