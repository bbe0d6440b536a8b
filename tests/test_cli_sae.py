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


@pytest.mark.bad_input
@pytest.mark.parametrize("inside", [False, True])
def test_dashboard_into_a_file_fails_in_one_line_before_any_work(tmp_path, monkeypatch, inside):
    import mechscope.sae.features as features
    from mechscope.sae import SAEConfig, build_sae

    cfg = SAEConfig(d_in=128, d_sae=16, architecture="topk", hook_name=HOOK, hook_layer=1, k=4)
    sae_dir = build_sae(cfg, seed=0).save(tmp_path / "sae")
    (tmp_path / "report.html").write_text("x")
    out = tmp_path / "report.html" / "pages" if inside else tmp_path / "report.html"
    calls = []
    monkeypatch.setattr(features, "feature_statistics", lambda *args, **kwargs: calls.append(args))
    result = runner.invoke(app, ["sae", "dashboard", str(sae_dir), "--model", "language", "--out", str(out)])
    assert result.exit_code == 1 and calls == []
    assert result.output.strip().count("\n") == 0 and "report.html is a file" in result.output
    assert (tmp_path / "report.html").read_text() == "x"


@pytest.mark.bad_input
def test_dashboard_write_errors_fail_in_one_line(tmp_path, monkeypatch):
    import mechscope.viz.dashboard as dashboard
    from mechscope.sae import SAEConfig, build_sae

    def refuse(out, *args, **kwargs):
        raise PermissionError(f"[Errno 13] Permission denied: '{out}'")

    cfg = SAEConfig(d_in=128, d_sae=16, architecture="topk", hook_name=HOOK, hook_layer=1, k=4)
    sae_dir = build_sae(cfg, seed=0).save(tmp_path / "sae")
    monkeypatch.setattr(dashboard, "write_dashboard", refuse)
    args = ["sae", "dashboard", str(sae_dir), "--model", "language", "--sequences", "2", "--context", "16"]
    out = tmp_path / "pages"
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 1 and result.output.strip() == f"error: [Errno 13] Permission denied: '{out}'"


def small_run(*extra: str) -> list[str]:
    """``sae train`` arguments for a small TopK run on the language organism (steps = tokens // 512)."""
    args = ["sae", "train", "--model", "language", "--hook", HOOK, "--k", "8", "--width", "64"]
    return [*args, "--batch-tokens", "512", "--context", "32", "--no-progress", *extra]


def test_a_killed_run_checkpoints_by_default_and_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    import mechscope.sae
    import mechscope.sae.training as training
    from mechscope.toys import checkpoint as ckpt

    class Killed(BaseException):
        """Stands for SIGKILL: nothing after it runs in train_sae (no cleanup writes a checkpoint)."""

    real_train, real_step, steps, kill_at = mechscope.sae.train_sae, training.training_step, 40, 7

    def killed_at_step(*args, **kwargs):
        def kill(step, sae, entry):
            if step == kill_at:
                raise Killed

        return real_train(*args, callbacks=[kill], **kwargs)

    args = small_run("--tokens", str(512 * steps))
    monkeypatch.setattr(mechscope.sae, "train_sae", killed_at_step)
    with pytest.raises(Killed):
        runner.invoke(app, [*args, "--out", str(tmp_path / "killed")])
    _, metadata = ckpt.read_tensors(tmp_path / "killed" / ckpt.CHECKPOINT_FILE)
    every = min(1000, max(1, steps // 20))  # the CLI's default checkpoint interval
    assert 0 < int(metadata["step"]) == kill_at // every * every < steps

    monkeypatch.setattr(mechscope.sae, "train_sae", real_train)
    done = []
    monkeypatch.setattr(training, "training_step", lambda *a, **k: done.append(1) or real_step(*a, **k))
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "killed"), "--resume"])
    assert result.exit_code == 0, result.output
    assert len(done) == steps - int(metadata["step"])  # it went on from the checkpoint, not from step 0
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "whole")]).exit_code == 0
    resumed, whole = SAE.load(tmp_path / "killed"), SAE.load(tmp_path / "whole")
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())
    assert ckpt.read_metrics(tmp_path / "killed") == ckpt.read_metrics(tmp_path / "whole")


def test_cache_dir_caches_the_runs_activations_once_and_a_later_run_reads_them(tmp_path, monkeypatch):
    from mechscope.sae.activations import MANIFEST, ModelStream

    args = small_run("--tokens", "2048", "--cache-dir", str(tmp_path / "cache"))
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "first")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cache" / MANIFEST).read_text())["n_rows"] == 2048  # --cache-tokens: --tokens

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran although the cache is complete")

    monkeypatch.setattr(ModelStream, "forward", refuse)
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "second")])
    assert result.exit_code == 0, result.output
    first, second = SAE.load(tmp_path / "first"), SAE.load(tmp_path / "second")
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())


@pytest.mark.bad_input
def test_an_existing_run_or_a_file_as_out_fails_in_one_line(tmp_path):
    args = small_run("--tokens", "1024")
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "run")]).exit_code == 0
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0, result.output
    assert "already holds a run" in result.output and "--resume" in result.output and "resume=True" not in result.output
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "file")])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0, result.output
    assert "is a file" in result.output and (tmp_path / "file").read_text() == "x"


@pytest.mark.bad_input
def test_resuming_on_other_data_is_refused_naming_the_setting(tmp_path, monkeypatch):
    import shlex
    import sys

    args = [*small_run("--tokens", "1024"), "--out", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", ["/bin/mechscope", *args])
    assert runner.invoke(app, args).exit_code == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["command"] == shlex.join(["mechscope", *args]) and record["data"]["source"] == "language"
    result = runner.invoke(app, [*args, "--context", "64", "--resume"])
    assert result.exit_code == 1 and "data.context: 32 in the folder, 64 now" in result.output, result.output
    other = tmp_path / "other.txt"
    other.write_text("Mary went to the park.\n")
    result = runner.invoke(app, [*args, "--data", str(other), "--resume"])
    assert result.exit_code == 1 and "data.source: 'language' in the folder" in result.output, result.output
    assert "Traceback" not in result.output
