from __future__ import annotations

from typer.testing import CliRunner

from mechscope import Model
from mechscope.cli import app

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
    assert result.exit_code != 0
    assert "not a model directory" in str(result.exception)


def test_demo_builds_and_describes_a_model(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "model.safetensors").exists()
    assert "hook points" in result.output and "top next tokens" in result.output
