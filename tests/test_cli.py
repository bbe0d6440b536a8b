from __future__ import annotations

import json

from typer.testing import CliRunner

from mechscope import Model
from mechscope.cli import app
from mechscope.toys.registry import ORGANISMS
from tests.conftest import TINY_INDUCTION

runner = CliRunner()


def test_info_on_a_local_directory(gpt2_dir):
    result = runner.invoke(app, ["info", str(gpt2_dir)])
    assert result.exit_code == 0, result.output
    assert "architecture   gpt2" in result.output
    n_params = sum(p.numel() for p in Model.from_pretrained(gpt2_dir).parameters())
    assert f"parameters     {n_params:,}" in result.output
    assert "blocks.1.attn.hook_pattern      (1, 4, 1, 1)" in result.output
    assert "blocks.0.hook_q_input           (1, 1, 4, 32)  *" in result.output
    assert "ln_final.hook_scale             (1, 1, 1)" in result.output


def test_info_on_a_missing_model_fails_cleanly(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "not a model directory" in result.output


TINY = [f"{key}={value}" for key, value in TINY_INDUCTION.items()]


def tiny_train(out, *extra):
    settings = [arg for setting in TINY for arg in ("--set", setting)]
    return runner.invoke(app, ["train", "induction", "--steps", "20", *settings, "--out", str(out), *extra])


def test_train_writes_a_run_and_prints_its_findings(tmp_path):
    result = tiny_train(tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "final loss" in result.output and "induction head:" in result.output
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"run.json", "metrics.jsonl", "model.safetensors"}
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["command"] == (
        "mechscope train induction --seed 0 --steps 20 "
        + " ".join(f"--set {s}" for s in TINY)
        + f" --out {tmp_path / 'run'}"
    )
    again = tiny_train(tmp_path / "run", "--no-progress")
    assert again.exit_code != 0 and "already holds a run" in again.output
    resumed = tiny_train(tmp_path / "run", "--no-progress", "--resume")
    assert resumed.exit_code == 0, resumed.output
    explained = runner.invoke(app, ["zoo", "explain", str(tmp_path / "run")])
    assert explained.exit_code == 0 and "previous-token head:" in explained.output


def test_train_names_bad_settings():
    result = runner.invoke(app, ["train", "induction", "--set", "colour=blue"])
    assert result.exit_code != 0 and "unknown setting(s) ['colour']" in result.output
    result = runner.invoke(app, ["train", "dragon"])
    assert result.exit_code != 0 and "unknown model organism 'dragon'" in result.output


def test_zoo_lists_every_organism_and_how_the_shipped_ones_were_made():
    result = runner.invoke(app, ["zoo", "list"])
    assert result.exit_code == 0, result.output
    for name in ORGANISMS:
        assert name in result.output
    assert "shipped: mechscope train induction --seed 0" in result.output
    assert "not shipped: mechscope train parentheses" in result.output


def test_zoo_explain_an_unknown_name_fails_cleanly():
    result = runner.invoke(app, ["zoo", "explain", "dragon"])
    assert result.exit_code != 0 and "neither a shipped organism" in result.output


def test_info_on_a_shipped_organism_and_a_model_without_hook_points():
    result = runner.invoke(app, ["info", "induction"])
    assert result.exit_code == 0, result.output
    assert "blocks.1.attn.hook_pattern" in result.output and "layers         2" in result.output
    result = runner.invoke(app, ["info", "superposition"])
    assert result.exit_code == 1
    assert "not a transformer" in result.output
