"""The workbench's HTTP API, driven in-process on the shipped synthetic-language organism:
results come back as sections and are saved, a patching job runs to done, bad input gets a
400 whose message says what was wrong, and no response ever carries a traceback."""

from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechscope.app import ExperimentStore, create_app
from mechscope.app import server as server_module
from mechscope.app.inputs import MAX_BODY_BYTES
from mechscope.app.jobs import CANCELLED
from mechscope.app.store import MAX_ID
from mechscope.interventions.sweeps import RESID_HOOKS
from mechscope.toys.zoo import load
from mechscope.viz.prompts import InputError, read_prompt

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
PATCHING = {"clean": CLEAN, "corrupted": CORRUPTED, "answer": " Mary", "wrong": " John", "hook": "resid_pre"}
MAX_TOKENS = 32
WIDGET_KINDS = {"attention", "tokens", "heatmap", "bars", "table"}
WAIT_S = 120  # an upper bound on a sweep that takes about a second, so a hang fails instead of blocking


@pytest.fixture(scope="module")
def model():
    return load("language")


def make_client(model, path, **options) -> TestClient:
    app = create_app(model, model_name="language", store=ExperimentStore(path), max_tokens=MAX_TOKENS)
    options = {"base_url": "http://127.0.0.1", "raise_server_exceptions": False} | options
    return TestClient(app, **options)


@pytest.fixture
def client(model, tmp_path) -> TestClient:
    return make_client(model, tmp_path / "workbench.sqlite3")


def assert_error(response, status: int, *fragments: str) -> str:
    """A JSON error body of exactly {"error": message}, with no trace of the server's insides."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    for leak in ("Traceback", 'File "', "site-packages", "mechscope/"):
        assert leak not in response.text
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body["error"]


def finish(client: TestClient, job: str) -> tuple[dict, list[float]]:
    """Poll a job as the page does until it ends; return its last state and the progress seen."""
    seen, deadline = [], time.monotonic() + WAIT_S
    while True:
        status = client.get(f"/api/jobs/{job}").json()
        seen.append(status["progress"])
        if status["state"] in ("done", "failed"):
            return status, seen
        assert time.monotonic() < deadline, f"job still {status['state']}"
        time.sleep(0.05)


def widgets(sections: list[dict]) -> list[dict]:
    return [widget for section in sections for widget in section["widgets"]]


class SlowSweep:
    """Stands in for patching_sections: reports ``fraction`` after every pass, as a sweep does,
    until released (or cancelled through its progress callback)."""

    def __init__(self, fraction: float = 0.25) -> None:
        self.fraction, self.started, self.release = fraction, threading.Event(), threading.Event()

    def __call__(self, *args, progress, **kwargs) -> list:
        deadline = time.monotonic() + WAIT_S
        while not self.release.is_set() and time.monotonic() < deadline:
            progress(self.fraction)
            self.started.set()
            time.sleep(0.005)
        return []


@pytest.fixture
def slow_sweep(monkeypatch) -> SlowSweep:
    sweep = SlowSweep()
    monkeypatch.setattr(server_module, "patching_sections", sweep)
    yield sweep
    sweep.release.set()


def running(client: TestClient, sweep: SlowSweep) -> str:
    """Start the stand-in sweep and return its job id once it is running."""
    job = client.post("/api/patching", json=PATCHING).json()["job"]
    assert sweep.started.wait(WAIT_S)
    return job


# ------------------------------------------------------------------ what works


def test_the_model_is_described(client, model):
    described = client.get("/api/model").json()
    assert described["name"] == "language"
    assert (described["n_layers"], described["n_heads"]) == (model.cfg.n_layers, model.cfg.n_heads)
    assert (described["d_model"], described["n_ctx"], described["max_tokens"]) == (
        model.cfg.d_model,
        model.cfg.n_ctx,
        MAX_TOKENS,
    )
    assert "resid_pre" in described["hooks"] and set(described["hooks"]) <= set(RESID_HOOKS)
    assert described["hook_points"] == list(model.hook_dict)


def test_a_prompt_gives_sections_of_widgets_and_is_saved(client):
    reply = client.post("/api/prompt", json={"prompt": CLEAN, "answer": " Mary", "wrong": " John"})
    assert reply.status_code == 200, reply.text
    sections = reply.json()["sections"]
    assert all({"id", "title", "description", "widgets"} <= set(s) for s in sections)
    assert {w["kind"] for w in widgets(sections)} <= WIDGET_KINDS
    assert "attention" in {w["kind"] for w in widgets(sections)}
    [listed] = client.get("/api/experiments").json()
    assert (listed["id"], listed["kind"], listed["model"], listed["title"]) == (
        reply.json()["experiment"],
        "prompt",
        "language",
        CLEAN,
    )
    saved = client.get(f"/api/experiments/{listed['id']}").json()
    assert saved["sections"] == sections
    assert saved["settings"] == {"prompt": CLEAN, "answer": " Mary", "wrong": " John"}


def test_an_activation_colours_every_token(client, model):
    reply = client.post("/api/activation", json={"prompt": CLEAN, "hook": "blocks.1.mlp.hook_post", "index": 3})
    assert reply.status_code == 200, reply.text
    [tokens] = [w for w in widgets(reply.json()["sections"]) if w["kind"] == "tokens"]
    assert len(tokens["data"]["values"]) == len(model.to_str_tokens(CLEAN))
    assert client.get("/api/experiments").json()[0]["kind"] == "activation"


def test_a_patching_job_runs_to_done_and_is_saved(client, model):
    reply = client.post("/api/patching", json=PATCHING)
    assert reply.status_code == 200, reply.text
    status, progress = finish(client, reply.json()["job"])
    assert status["state"] == "done", status.get("error")
    assert progress == sorted(progress) and progress[-1] == 1.0
    maps = [w["data"] for w in widgets(status["sections"]) if w["kind"] == "heatmap"]
    by_position = [m for m in maps if len(m["cols"]) == len(model.to_str_tokens(CLEAN))]
    assert by_position and all(len(m["values"]) == model.cfg.n_layers for m in by_position)
    assert all(isinstance(v, float) for m in by_position for row in m["values"] for v in row)
    saved = client.get(f"/api/experiments/{status['experiment']}").json()
    assert (saved["kind"], saved["settings"], saved["sections"]) == ("patching", PATCHING, status["sections"])
    assert saved["title"].startswith("John → Mary · resid_pre · When Mary and John")


def test_a_patching_title_names_the_first_tokens_that_differ(model):
    clean = read_prompt(model, "When Mary and John went to the store")
    corrupted = read_prompt(model, "When Mary and Mary went to the the")
    title = server_module.patching_title(clean, corrupted, "resid_mid", "When Mary and John went to the store")
    assert title == "John → Mary · resid_mid · When Mary and John went to the store"
    assert server_module.patching_title(clean, clean, "resid_pre", "x").startswith("no token differs")
    long = server_module.patching_title(clean, corrupted, "resid_pre", "word " * 100)
    assert len(long) <= server_module.TITLE_WIDTH and long.endswith("…")


def test_experiments_are_listed_by_a_new_server_on_the_same_file(model, tmp_path):
    path = tmp_path / "workbench.sqlite3"
    first = make_client(model, path).post("/api/activation", json={"prompt": CLEAN, "hook": "hook_embed"}).json()
    restarted = make_client(model, path)
    assert [e["id"] for e in restarted.get("/api/experiments").json()] == [first["experiment"]]
    assert restarted.get(f"/api/experiments/{first['experiment']}").json()["sections"] == first["sections"]


def test_experiments_are_listed_a_page_at_a_time_newest_first(client):
    store = client.app.state.workbench.store
    ids = [store.save("prompt", name, f"t{i}", {}, {}) for i, name in enumerate(["language", "gpt2"] * 3)]
    first = client.get("/api/experiments", params={"limit": 4}).json()
    rest = client.get("/api/experiments", params={"limit": 4, "before": first[-1]["id"]}).json()
    assert [e["id"] for e in first + rest] == ids[::-1]
    assert {e["model"] for e in first} == {"language", "gpt2"}  # every model's experiments are listed


def test_an_experiment_is_deleted(client):
    store = client.app.state.workbench.store
    kept, dropped = store.save("prompt", "language", "kept", {}, {}), store.save("prompt", "language", "gone", {}, {})
    reply = client.delete(f"/api/experiments/{dropped}")
    assert (reply.status_code, reply.json()) == (200, {"deleted": dropped})
    assert [e["id"] for e in client.get("/api/experiments").json()] == [kept]
    assert_error(client.get(f"/api/experiments/{dropped}"), 404, f"no experiment with id {dropped}")
    assert_error(client.delete(f"/api/experiments/{dropped}"), 404, f"no experiment with id {dropped}")


def test_a_prompt_during_a_sweep_is_a_409_saying_how_far_it_is(client, slow_sweep):
    job = running(client, slow_sweep)
    assert_error(client.post("/api/prompt", json={"prompt": CLEAN}), 409, "a patching sweep is running (25% done)")
    activation = client.post("/api/activation", json={"prompt": CLEAN, "hook": "hook_embed"})
    assert_error(activation, 409, "try again when it finishes")
    assert client.get(f"/api/jobs/{job}").json()["state"] == "running"  # polls are answered meanwhile
    slow_sweep.release.set()
    assert finish(client, job)[0]["state"] == "done"
    assert client.post("/api/prompt", json={"prompt": CLEAN}).status_code == 200


def test_a_request_waits_briefly_for_another_one_and_then_gets_a_409(client, monkeypatch):
    lock = client.app.state.workbench.lock
    lock.acquire()
    threading.Timer(0.1, lock.release).start()  # another request's forward pass, well within the wait
    assert client.post("/api/activation", json={"prompt": CLEAN, "hook": "hook_embed"}).status_code == 200
    monkeypatch.setattr(server_module, "LOCK_WAIT_S", 0.01)
    with lock:
        reply = client.post("/api/activation", json={"prompt": CLEAN, "hook": "hook_embed"})
    assert_error(reply, 409, "the model is busy with another request")


def test_stopping_the_server_cancels_a_running_sweep(model, tmp_path, slow_sweep, capsys):
    with make_client(model, tmp_path / "db.sqlite3") as client:
        job = running(client, slow_sweep)
        jobs = client.app.state.workbench.jobs
    stopped = jobs.get(job)  # the sweep is never released: only cancelling it lets the server stop
    assert (stopped.state, stopped.error) == ("failed", CANCELLED)
    assert "stopping: cancelling the running patching job" in capsys.readouterr().out
    assert client.app.state.workbench.store.list() == []


def test_the_viz_bundle_is_served_when_the_viz_package_joins_one(model, tmp_path, monkeypatch):
    joined = SimpleNamespace(bundle_js=lambda: "/* joined js */", bundle_css=lambda: "/* joined css */")
    monkeypatch.setattr(server_module, "viz_html", joined)
    client = make_client(model, tmp_path / "db.sqlite3")
    assert client.get("/static/mechscope.js").text == "/* joined js */"
    assert client.get("/static/mechscope.css").text == "/* joined css */"


def test_the_page_and_its_files_are_served_with_the_policy(client):
    for path, media in [
        ("/", "text/html"),
        ("/static/workbench.js", "text/javascript"),
        ("/static/workbench.css", "text/css"),
        ("/static/mechscope.js", "text/javascript"),
        ("/static/mechscope.css", "text/css"),
    ]:
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(media), path
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "connect-src 'self'" in policy
        assert "script-src 'self';" in policy  # no inline script may run
    assert 'id="prompt-form"' in client.get("/").text


def test_the_page_has_no_inline_script_no_markup_injection_and_no_other_host(client):
    page = client.get("/").text
    assert re.findall(r"<script(?![^>]*\ssrc=)[^>]*>", page) == []
    code = client.get("/static/workbench.js").text
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", code)
    for text in (page, code, client.get("/static/workbench.css").text):
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE)


# ------------------------------------------------------------------ what is refused


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("path", "body", "fragments"),
    [
        ("/api/prompt", {"prompt": ""}, ["prompt is empty"]),
        ("/api/prompt", {"prompt": " Mary" * (MAX_TOKENS + 5)}, ["the limit is 32 tokens"]),
        ("/api/prompt", {"prompt": CLEAN, "answer": " Mary and John"}, ["answer", "exactly one"]),
        ("/api/activation", {"prompt": CLEAN, "hook": "blocks.0.hook_resid_pree"}, ["blocks.0.hook_resid_pre"]),
        ("/api/activation", {"prompt": CLEAN, "hook": "blocks.0.mlp.hook_post", "index": 10**6}, ["out of range"]),
        ("/api/patching", PATCHING | {"corrupted": CORRUPTED + " them"}, ["same number of tokens"]),
        ("/api/patching", PATCHING | {"clean": "   "}, ["clean prompt is empty"]),
        ("/api/patching", PATCHING | {"hook": "pattern"}, ["hook must be one of", "resid_pre"]),
        ("/api/patching", PATCHING | {"wrong": ""}, ["wrong answer is empty"]),
        ("/api/patching", PATCHING | {"wrong": " Mary"}, ["the answer and the wrong answer are the same token"]),
        ("/api/prompt", {}, ["prompt: Field required"]),
        ("/api/prompt", {"prompt": 3}, ["prompt: Input should be a valid string"]),
        ("/api/prompt", {"prompt": CLEAN, "anser": " Mary"}, ["anser"]),
        ("/api/activation", {"prompt": CLEAN, "hook": "hook_embed", "index": "two"}, ["index"]),
        ("/api/activation", {"prompt": CLEAN, "hook": "hook_embed", "index": "3"}, ["index: Input should be a valid"]),
        ("/api/activation", {"prompt": CLEAN, "hook": "hook_embed", "index": True}, ["index: Input should be a valid"]),
    ],
)
def test_bad_input_is_a_400_naming_the_problem(client, path, body, fragments):
    assert_error(client.post(path, json=body), 400, *fragments)
    assert client.get("/api/experiments").json() == []


@pytest.mark.bad_input
def test_a_body_that_is_not_json_is_a_400(client):
    response = client.post("/api/prompt", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400, "not valid JSON")


@pytest.mark.bad_input
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blank=st.text(alphabet=" \t\n\r", max_size=8))
def test_a_blank_prompt_is_refused_however_it_is_spaced(client, blank):
    assert_error(client.post("/api/prompt", json={"prompt": blank}), 400, "empty")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("body", "field"),
    [(rb'{"prompt": "x\ud800y"}', "prompt"), (rb'{"prompt": "hi", "answer": "x\udfffy"}', "answer")],
)
def test_a_lone_surrogate_is_refused_with_a_sentence(client, body, field):
    response = client.post("/api/prompt", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, f"{field}: holds a lone surrogate U+D", "at character 1")


@pytest.mark.bad_input
def test_missing_things_are_404s(client):
    assert_error(client.get("/api/experiments/12345"), 404, "no experiment with id 12345")
    assert_error(client.get("/api/jobs/nope"), 404, "no job with id 'nope'")
    assert_error(client.get("/static/secrets.py"), 404, "no static file")
    assert_error(client.get("/docs"), 404, "nothing here: /docs")  # its explorer would load scripts from a CDN
    assert_error(client.get("/api/nope"), 404, "/api/nope")


@pytest.mark.bad_input
@pytest.mark.parametrize("id", [str(MAX_ID + 1), "99999999999999999999999", "0", "-1", "abc", "1.5"])
def test_an_experiment_id_that_cannot_exist_is_a_404(client, id):
    assert_error(client.get(f"/api/experiments/{id}"), 404, f"id {id!r}")
    assert_error(client.delete(f"/api/experiments/{id}"), 404, f"id {id!r}")


@pytest.mark.bad_input
def test_a_wrong_method_is_a_405_sentence_that_keeps_its_allow_header(client):
    response = client.put("/api/prompt", json={"prompt": CLEAN})
    assert_error(response, 405, "PUT is not allowed on /api/prompt")
    assert "POST" in response.headers["allow"]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("params", "fragment"), [({"limit": 0}, "limit"), ({"limit": 10**6}, "limit"), ({"before": "x"}, "before")]
)
def test_a_bad_page_of_the_list_is_a_400(client, params, fragment):
    assert_error(client.get("/api/experiments", params=params), 400, fragment)


@pytest.mark.bad_input
@pytest.mark.parametrize("streamed", [False, True])
def test_a_body_over_the_size_limit_is_a_413_sentence(client, streamed):
    body = b"x" * (MAX_BODY_BYTES + 1)
    content = iter([body[: MAX_BODY_BYTES // 2], body[MAX_BODY_BYTES // 2 :]]) if streamed else body
    response = client.post("/api/prompt", content=content, headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers or not streamed  # a chunked body declares no length
    assert_error(response, 413, f"the limit of {MAX_BODY_BYTES:,} bytes")
    assert "default-src 'self'" in response.headers["content-security-policy"]


@pytest.mark.bad_input
def test_a_number_too_long_to_parse_is_a_400_sentence(client):
    body = b'{"prompt": "hi", "hook": "hook_embed", "index": 1' + b"1" * 5000 + b"}"
    response = client.post("/api/activation", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "the request body")


@pytest.mark.bad_input
def test_an_unexpected_failure_is_a_500_without_details(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail from deep inside")

    monkeypatch.setattr(server_module, "prompt_sections", broken)
    response = client.post("/api/prompt", json={"prompt": CLEAN})
    assert "secret detail" not in assert_error(response, 500, "internal error")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("raised", "shown"),
    [(InputError("the sweep found nothing to restore"), "nothing to restore"), (ZeroDivisionError(), "internal error")],
)
def test_a_failed_job_reports_only_what_the_user_may_see(client, monkeypatch, raised, shown):
    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(server_module, "patching_sections", failing)
    status, _ = finish(client, client.post("/api/patching", json=PATCHING).json()["job"])
    assert (status["state"], "sections" in status) == ("failed", False)
    assert shown in status["error"] and "Traceback" not in status["error"]
    assert client.get("/api/experiments").json() == []


@pytest.mark.bad_input
def test_requests_for_another_host_name_are_refused(model, tmp_path):
    rebound = make_client(model, tmp_path / "db.sqlite3", base_url="http://attacker.example")
    assert_error(rebound.get("/api/experiments"), 400, "answers only to 127.0.0.1")


def test_a_server_bound_beyond_this_machine_answers_to_its_names():
    assert server_module.hosts_for("127.0.0.1") == server_module.LOCAL_HOSTS
    assert "192.168.1.9" in server_module.hosts_for("192.168.1.9")
    assert server_module.hosts_for("0.0.0.0") is None  # every interface: any name


def test_an_exposed_app_answers_any_host_name(model, tmp_path):
    app = create_app(model, model_name="language", store=ExperimentStore(tmp_path / "db"), allowed_hosts=None)
    assert TestClient(app, base_url="http://workstation.lan").get("/api/experiments").json() == []


@pytest.mark.bad_input
def test_a_model_without_a_tokenizer_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="needs a model with a tokenizer; 'modular' has none"):
        create_app(SimpleNamespace(cfg=model.cfg), model_name="modular", store=ExperimentStore(tmp_path / "db"))


@pytest.mark.bad_input
def test_cross_site_posts_and_deletes_are_refused(client):
    response = client.post("/api/prompt", json={"prompt": CLEAN}, headers={"origin": "http://attacker.example"})
    assert_error(response, 403, "cross-site")
    assert client.get("/api/experiments").json() == []
    id = client.app.state.workbench.store.save("prompt", "language", "mine", {}, {})
    response = client.delete(f"/api/experiments/{id}", headers={"origin": "http://attacker.example"})
    assert_error(response, 403, "cross-site")
    assert [e["id"] for e in client.get("/api/experiments").json()] == [id]
