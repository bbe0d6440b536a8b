"""SAE features in the workbench: a tiny SAE on the language organism, saved to disk and loaded
back as ``mechscope serve --sae DIR`` does, browsed one feature at a time through /api/feature."""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechscope.app import ExperimentStore, create_app
from mechscope.app import server as server_module
from mechscope.app.features import DEFAULT_SEQUENCES, MAX_SEQUENCES, NO_SAE, SEED, SEQ_LEN
from mechscope.sae import SAE, SAEConfig, build_sae, feature_statistics, token_source
from mechscope.toys.zoo import load
from mechscope.viz.dashboard import feature_sections
from mechscope.viz.prompts import decoder
from tests.app.test_server import SlowSweep, assert_error, finish, running

HOOK = "blocks.0.hook_resid_post"
D_SAE = 16
FEATURE = 3  # its encoder bias is raised far above the rest, so it fires on every token


@pytest.fixture(scope="module")
def model():
    return load("language")


@pytest.fixture(scope="module")
def sae_dir(model, tmp_path_factory):
    cfg = SAEConfig(d_in=model.cfg.d_model, d_sae=D_SAE, architecture="topk", hook_name=HOOK, hook_layer=0, k=4)
    sae = build_sae(cfg, seed=0)
    with torch.no_grad():
        sae.b_enc[FEATURE] = 50.0
    return sae.save(tmp_path_factory.mktemp("sae") / "sae")


@pytest.fixture(scope="module")
def sae(sae_dir):
    return SAE.load(sae_dir)


def make_client(model, path, sae=None) -> TestClient:
    app = create_app(model, model_name="language", store=ExperimentStore(path), sae=sae)
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


@pytest.fixture
def client(model, sae, tmp_path) -> TestClient:
    return make_client(model, tmp_path / "workbench.sqlite3", sae)


@pytest.fixture
def slow_sweep(monkeypatch) -> SlowSweep:
    sweep = SlowSweep()
    monkeypatch.setattr(server_module, "patching_sections", sweep)
    yield sweep
    sweep.release.set()


def expected_sections(model, sae, feature: int, sequences: int) -> list[dict]:
    """The dashboard of ``feature`` computed here, from the seeded language source directly."""
    source = token_source("language", tokenizer=model.tokenizer, seq_len=min(SEQ_LEN, model.cfg.n_ctx), seed=SEED)
    tokens = torch.stack(list(itertools.islice(source, sequences)))
    stats = feature_statistics(model, sae, tokens, features=[feature], seed=SEED)
    return [s.to_json() for s in feature_sections(stats.feature(feature), decoder(model), stats.logit_note)]


def without_facts(section: dict) -> dict:
    return {key: value for key, value in section.items() if key != "facts"}


def tokens_widgets(sections: list[dict]) -> list[dict]:
    return [w["data"] for s in sections for w in s["widgets"] if w["kind"] == "tokens"]


# ------------------------------------------------------------------ what works


def test_the_model_reports_its_sae_or_none(client, model, tmp_path):
    assert client.get("/api/model").json()["sae"] == {"hook_name": HOOK, "d_sae": D_SAE, "architecture": "topk"}
    assert make_client(model, tmp_path / "plain.sqlite3").get("/api/model").json()["sae"] is None


def test_a_feature_gives_its_dashboard_and_is_saved(client, model, sae):
    reply = client.post("/api/feature", json={"feature": FEATURE})
    assert reply.status_code == 200, reply.text
    sections = reply.json()["sections"]
    kinds = ("summary", "top", "intervals", "logits")
    assert [s["id"] for s in sections] == [f"feature-{FEATURE}-{kind}" for kind in kinds]
    examples = tokens_widgets(sections)
    assert examples and all(0 <= e["focus"] < len(e["tokens"]) == len(e["values"]) for e in examples)
    assert f"{DEFAULT_SEQUENCES} sequences of {min(SEQ_LEN, model.cfg.n_ctx)}" in sections[0]["facts"][-1]
    [listed] = client.get("/api/experiments").json()
    assert (listed["id"], listed["kind"], listed["model"]) == (reply.json()["experiment"], "feature", "language")
    assert listed["title"] == f"feature {FEATURE} · {HOOK} · {DEFAULT_SEQUENCES} sequences"
    saved = client.get(f"/api/experiments/{listed['id']}").json()
    assert saved["settings"] == {"feature": FEATURE, "sequences": DEFAULT_SEQUENCES}  # what it was measured on
    assert saved["sections"] == sections


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(feature=st.integers(0, D_SAE - 1), sequences=st.integers(1, 6))
def test_a_feature_is_measured_on_the_seeded_language_sequences(client, model, sae, feature, sequences):
    """Whatever was asked before (the server keeps the rows it drew), the same seeded rows."""
    served = client.post("/api/feature", json={"feature": feature, "sequences": sequences}).json()["sections"]
    expected = expected_sections(model, sae, feature, sequences)
    assert served[1:] == expected[1:]
    assert served[0]["facts"][: len(expected[0]["facts"])] == expected[0]["facts"]
    assert without_facts(served[0]) == without_facts(expected[0])


def test_the_strongest_example_is_about_its_strongest_token_on_one_scale(client):
    sections = client.post("/api/feature", json={"feature": FEATURE, "sequences": 2}).json()["sections"]
    [top] = [s for s in sections if s["id"] == f"feature-{FEATURE}-top"]
    strongest = top["widgets"][0]["data"]
    assert strongest["values"][strongest["focus"]] == max(strongest["values"])
    assert all(e["zmin"] == 0.0 and e["zmax"] >= max(e["values"]) for e in tokens_widgets(sections))


def test_a_feature_request_during_a_sweep_is_a_409_but_a_bad_id_is_still_a_400(client, slow_sweep):
    job = running(client, slow_sweep)
    assert_error(client.post("/api/feature", json={"feature": FEATURE}), 409, "a patching sweep is running (25% done)")
    assert_error(client.post("/api/feature", json={"feature": D_SAE}), 400, f"between 0 and {D_SAE - 1}")
    slow_sweep.release.set()
    assert finish(client, job)[0]["state"] == "done"
    assert [e["kind"] for e in client.get("/api/experiments").json()] == ["patching"]  # the refused ones: not saved


def test_a_feature_request_waits_briefly_for_another_one_and_then_gets_a_409(client, monkeypatch):
    monkeypatch.setattr(server_module, "LOCK_WAIT_S", 0.01)
    with client.app.state.workbench.lock:
        reply = client.post("/api/feature", json={"feature": FEATURE, "sequences": 1})
    assert_error(reply, 409, "the model is busy with another request")


def test_serve_loads_the_sae_from_its_folder(model, sae_dir, tmp_path, monkeypatch, capsys):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(app))
    server_module.serve("language", db=tmp_path / "db.sqlite3", sae=sae_dir)
    [app] = served
    assert app.state.workbench.features.describe() == {"hook_name": HOOK, "d_sae": D_SAE, "architecture": "topk"}
    assert f"the SAE in {sae_dir} ({D_SAE} on {HOOK})" in capsys.readouterr().out
    server_module.serve("language", db=tmp_path / "db.sqlite3")
    assert served[1].state.workbench.features is None


def test_the_page_s_feature_form_is_hidden_until_the_server_has_an_sae(client):
    page = client.get("/").text
    form = re.search(r'<form id="feature-form"[^>]*>', page)
    assert form and " hidden" in form.group(0)
    assert f'max="{MAX_SEQUENCES}"' in page and f"(empty: {DEFAULT_SEQUENCES})" in page
    assert '"/api/feature"' in client.get("/static/workbench.js").text


# ------------------------------------------------------------------ what is refused


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"feature": -1}, [f"feature must be between 0 and {D_SAE - 1}", "got -1"]),
        ({"feature": D_SAE}, [f"feature must be between 0 and {D_SAE - 1}", f"got {D_SAE}"]),
        ({"feature": 10**30}, [f"feature must be between 0 and {D_SAE - 1}"]),
        ({"feature": "3"}, ["feature: Input should be a valid integer"]),
        ({"feature": True}, ["feature: Input should be a valid integer"]),
        ({"feature": 1.5}, ["feature: Input should be a valid integer"]),
        ({}, ["feature: Field required"]),
        ({"feature": FEATURE, "sequences": 0}, ["sequences", "greater than or equal to 1"]),
        ({"feature": FEATURE, "sequences": MAX_SEQUENCES + 1}, ["sequences", f"less than or equal to {MAX_SEQUENCES}"]),
        ({"feature": FEATURE, "sequence": 4}, ["sequence"]),
    ],
)
def test_a_bad_feature_request_is_a_400_naming_the_range(client, body, fragments):
    assert_error(client.post("/api/feature", json=body), 400, *fragments)
    assert client.get("/api/experiments").json() == []


@pytest.mark.bad_input
def test_a_feature_without_an_sae_is_a_400_saying_how_to_load_one(model, tmp_path):
    plain = make_client(model, tmp_path / "plain.sqlite3")
    assert_error(plain.post("/api/feature", json={"feature": 0}), 400, NO_SAE)
    assert plain.get("/api/experiments").json() == []


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("hook", "d_in", "fragments"),
    [
        ("blocks.7.hook_resid_post", 128, ["does not fit 'language'", "blocks.7.hook_resid_post"]),
        ("blocks.0.mlp.hook_post", 128, ["reads 128 numbers at blocks.0.mlp.hook_post", "trained on another model"]),
    ],
)
def test_an_sae_trained_on_another_model_is_refused_at_start(model, tmp_path, hook, d_in, fragments):
    cfg = SAEConfig(d_in=d_in, d_sae=D_SAE, architecture="relu", hook_name=hook, hook_layer=int(hook[7]))
    with pytest.raises(ValueError) as refused:
        make_client(model, tmp_path / "db.sqlite3", build_sae(cfg))
    assert all(fragment in str(refused.value) for fragment in fragments), str(refused.value)


@pytest.mark.bad_input
def test_a_model_that_does_not_read_the_language_is_refused_an_sae(model, sae, tmp_path):
    other = SimpleNamespace(tokenizer=model.tokenizer, cfg=model.cfg, hook_dict=model.hook_dict)
    with pytest.raises(ValueError, match="only the language organism") as refused:
        create_app(other, model_name="gpt2", store=ExperimentStore(tmp_path / "db"), sae=sae)
    assert "mechscope sae dashboard SAE_DIR --model gpt2 --data" in str(refused.value)
    with pytest.raises(ValueError, match="sae must be a mechscope SAE"):
        create_app(model, model_name="language", store=ExperimentStore(tmp_path / "db"), sae="runs/sae")
