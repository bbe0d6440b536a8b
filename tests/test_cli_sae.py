"""``mechscope sae train`` and ``mechscope sae eval`` on the shipped language organism: the run
folder holds an SAELens-format SAE, and eval prints the metrics that evaluate_sae computes."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli import app
from mechscope.sae import SAE, evaluate_sae, token_source
from mechscope.toys.zoo import load

runner = CliRunner()
HOOK = "blocks.1.hook_resid_post"


def test_train_then_eval(tmp_path):
    out = tmp_path / "sae"
    args = ["sae", "train", "--model", "language", "--hook", HOOK, "--arch", "topk", "--k", "8", "--width", "64"]
    result = runner.invoke(
        app, [*args, "--tokens", "4096", "--batch-tokens", "512", "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    sae = SAE.load(out)
    assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.d_sae, sae.cfg.k) == ("topk", HOOK, 64, 8)
    assert json.loads((out / "cfg.json").read_text())["d_in"] == 128
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["tokens"] <= 4096
    result = runner.invoke(app, ["sae", "eval", str(out), "--model", "language", "--sequences", "4", "--context", "32"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(maxsplit=1) for line in result.output.strip().splitlines())
    tokens = torch.stack(list(itertools.islice(token_source("language", tokenizer=load("language").tokenizer,
                                                                seq_len=32, seed=1), 4)))  # fmt: skip
    expected = evaluate_sae(load("language"), sae, tokens)
    assert float(lines["l0"]) == 8
    assert float(lines["fvu"]) == pytest.approx(expected.fvu, rel=1e-4)
    assert float(lines["ce_loss_recovered"]) == pytest.approx(expected.ce_loss_recovered, rel=1e-4)
    pages = tmp_path / "dashboard"
    args = ["sae", "dashboard", str(out), "--model", "language", "--top-features", "3", "--sequences", "8"]
    result = runner.invoke(app, [*args, "--context", "32", "--out", str(pages)])
    assert result.exit_code == 0, result.output
    assert (pages / "index.html").exists() and len(list(pages.glob("feature-*.html"))) == 3


def test_normalised_autocast_training_saves_an_sae_for_raw_activations(tmp_path):
    out = tmp_path / "sae"
    args = ["sae", "train", "--model", "language", "--hook", HOOK, "--arch", "relu", "--width", "64", "--autocast"]
    result = runner.invoke(app, [*args, "--normalize", "expected_average_only_in", "--tokens", "1024",
                                 "--batch-tokens", "512", "--out", str(out), "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["train"]["autocast"] is True and record["sae"]["normalize_activations"] == "expected_average_only_in"
    assert record["norm_scaling_factor"] > 0
    assert json.loads((out / "cfg.json").read_text())["normalize_activations"] == "none"


def test_bad_requests_fail_in_one_line(tmp_path):
    result = runner.invoke(app, ["sae", "train", "--model", "language", "--hook", "blocks.1.hook_resid_pots",
                                 "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 1 and "blocks.1.hook_resid_post" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["sae", "train", "--model", "language", "--hook", HOOK, "--arch", "gated",
                                 "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 1 and "architecture" in result.output
    result = runner.invoke(app, ["sae", "train", "--model", "language", "--hook", HOOK, "--normalize", "layer_norm",
                                 "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 1 and "normalize_activations" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["sae", "eval", str(tmp_path / "missing"), "--model", "language"])
    assert result.exit_code == 1 and "error:" in result.output
