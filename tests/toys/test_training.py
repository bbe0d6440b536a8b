"""The trainer: schedules, validation, metrics, and runs that survive SIGKILL."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from mechscope.toys import Findings, Organism, TrainConfig, train
from mechscope.toys import checkpoint as ckpt
from mechscope.toys.training import step_generator
from tests.conftest import TINY_INDUCTION


@dataclass
class Regression(Organism):
    """Least squares on a fixed random linear map: a task any optimiser must make progress on."""

    name = "regression"
    summary = "fit y = Ax"
    dim: int = 4

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=60, lr=0.05, log_every=5, eval_every=20, checkpoint_every=20)

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(self.dim, self.dim)

    def target(self) -> torch.Tensor:
        return torch.randn(self.dim, self.dim, generator=torch.Generator().manual_seed(7))

    def batch(self, step: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(16, self.dim, generator=generator)

    def loss(self, model, batch):
        error = model(batch) - batch @ self.target().T
        return error.pow(2).mean(), {"batch_mean": batch.mean().item()}

    def evaluate(self, model):
        return {"weight_error": (model.weight - self.target()).norm().item()}

    def explain(self, model, metrics=()):
        return Findings(self.name, {"weight_error": self.evaluate(model)["weight_error"]})


@given(
    steps=st.integers(1, 500),
    warmup=st.integers(0, 100),
    final=st.floats(0, 1),
    data=st.data(),
)
def test_schedule_warms_up_linearly_then_decays_to_the_final_fraction(steps, warmup, final, data):
    config = TrainConfig(steps=steps, warmup_steps=warmup, schedule="cosine", final_lr_fraction=final)
    step = data.draw(st.integers(0, steps - 1))
    factor = config.lr_factor(step)
    if step < warmup:
        assert factor == pytest.approx((step + 1) / warmup)
    else:
        assert min(final, 1.0) - 1e-9 <= factor <= 1.0 + 1e-9
    if steps > warmup + 1:
        assert config.lr_factor(steps) == pytest.approx(final)  # the cosine has fully decayed
    constant = TrainConfig(steps=steps, warmup_steps=warmup)
    assert constant.lr_factor(max(step, warmup)) == 1.0


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps must be a positive integer"),
        ("eval_every", 1.5, "eval_every must be a positive integer"),
        ("warmup_steps", -1, "warmup_steps must be a non-negative integer"),
        ("schedule", "linear", "schedule must be 'constant' or 'cosine'"),
        ("lr", 0.0, "lr must be positive"),
        ("grad_clip", -1.0, "grad_clip must be positive or None"),
    ],
)
def test_bad_training_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_batches_are_a_function_of_seed_and_step():
    first = torch.randn(3, generator=step_generator(0, 5))
    assert torch.equal(first, torch.randn(3, generator=step_generator(0, 5)))
    assert not torch.equal(first, torch.randn(3, generator=step_generator(0, 6)))
    assert not torch.equal(first, torch.randn(3, generator=step_generator(1, 5)))


def test_training_reduces_the_loss_and_logs_every_interval(tmp_path):
    result = train(Regression(), out=tmp_path, progress=False)
    logged = ckpt.read_metrics(tmp_path)
    assert [r["step"] for r in logged] == list(range(5, 61, 5))
    assert logged == result.metrics
    assert logged[-1]["loss"] < 0.1 * logged[0]["loss"]
    evaluated = [r for r in logged if "weight_error" in r]
    assert [r["step"] for r in evaluated] == [20, 40, 60]
    assert evaluated[-1]["weight_error"] < evaluated[0]["weight_error"]
    assert all("batch_mean" in r and "lr" in r for r in logged)
    record = json.loads((tmp_path / ckpt.RUN_FILE).read_text())
    assert record["organism"] == "regression" and record["final"]["step"] == 60
    weights = load_file(tmp_path / ckpt.WEIGHTS_FILE)
    assert torch.equal(weights["weight"], result.model.weight.detach())


def test_a_paused_run_resumes_on_the_same_schedule(tmp_path):
    whole = train(Regression(), out=tmp_path / "whole", progress=False)
    paused = train(Regression(), out=tmp_path / "paused", until=25, progress=False)
    assert [r["step"] for r in paused.metrics][-1] == 25 and not (tmp_path / "paused" / ckpt.WEIGHTS_FILE).exists()
    resumed = train(Regression(), out=tmp_path / "paused", resume=True, progress=False)
    assert resumed.metrics == whole.metrics
    assert torch.equal(resumed.model.weight, whole.model.weight)


def test_callbacks_run_at_each_evaluation():
    seen = []

    def remember(step, model, entry):
        seen.append((step, entry["weight_error"]))

    train(Regression(), progress=False, callbacks=[remember])
    assert [step for step, _ in seen] == [20, 40, 60]


def test_gradient_clipping_limits_the_update():
    """Clipped to a norm far below Adam's epsilon, a gradient can hardly move the weights."""

    def moved(grad_clip):
        config = TrainConfig(steps=3, lr=0.1, grad_clip=grad_clip, weight_decay=0.0)
        torch.manual_seed(0)
        start = Regression().build_model().weight.detach().clone()
        return (train(Regression(), config, progress=False).model.weight.detach() - start).abs().max().item()

    assert moved(1e-12) < 1e-3 * moved(None)


def test_an_existing_run_is_never_overwritten(tmp_path):
    train(Regression(), out=tmp_path, progress=False)
    with pytest.raises(FileExistsError, match=r"already holds a run.*resume"):
        train(Regression(), out=tmp_path, progress=False)


def test_resuming_with_other_settings_names_the_difference(tmp_path):
    train(Regression(), out=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"params\.dim: 4 in the folder, 5 now"):
        train(Regression(dim=5), out=tmp_path, resume=True, progress=False)
    changed = TrainConfig(**{**Regression().train_config().to_dict(), "lr": 0.1})
    with pytest.raises(ValueError, match=r"train\.lr: 0\.05 in the folder, 0\.1 now"):
        train(Regression(), changed, out=tmp_path, resume=True, progress=False)


def test_a_torn_write_is_invisible_to_resume(tmp_path):
    """A kill during a checkpoint write leaves a temporary file and maybe half a metrics line."""
    uninterrupted = train(Regression(), out=tmp_path / "whole", progress=False)
    config = TrainConfig(**{**Regression().train_config().to_dict(), "steps": 40})
    train(Regression(), config, out=tmp_path / "cut", progress=False)
    run = tmp_path / "cut"
    # Pretend the 40-step run was the 60-step one, killed after step 40's checkpoint.
    record = json.loads((run / ckpt.RUN_FILE).read_text())
    record["train"]["steps"] = 60
    (run / ckpt.RUN_FILE).write_text(json.dumps(record))
    (run / f".{ckpt.CHECKPOINT_FILE}.tmp").write_bytes(b"half a checkpoint")
    with open(run / ckpt.METRICS_FILE, "a") as f:
        f.write('{"step": 41, "lo')
    resumed = train(Regression(), out=run, resume=True, progress=False)
    assert resumed.final_loss == uninterrupted.final_loss
    assert [r["step"] for r in ckpt.read_metrics(run)] == list(range(5, 61, 5))


KILLED_RUN = """
import os, signal, sys
from mechscope.toys import train
from mechscope.toys.registry import configured
organism, config = configured("induction", {settings})
def kill(step, model, entry):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
train(organism, config, sys.argv[1], progress=False, callbacks=[kill])
"""


@pytest.mark.replay
def test_a_run_killed_with_sigkill_resumes_to_the_same_final_loss(tmp_path):
    """The real thing: SIGKILL between checkpoints, then ``mechscope train --resume``."""
    settings = {
        **TINY_INDUCTION,
        "steps": 40,
        "log_every": 5,
        "eval_every": 10,
        "checkpoint_every": 20,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "mechscope.cli", "train", "induction", "--no-progress"]
    cli += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN.format(settings=settings, kill_at=30), str(tmp_path / "killed")],
        env=env,
        capture_output=True,
    )
    assert killed.returncode == -9, killed.stderr.decode()
    assert not (tmp_path / "killed" / ckpt.WEIGHTS_FILE).exists()  # it never finished
    assert max(r["step"] for r in ckpt.read_metrics(tmp_path / "killed")) == 25  # logged past its checkpoint (20)

    for name, extra in (("killed", ["--resume"]), ("whole", [])):
        done = subprocess.run([*cli, "--out", str(tmp_path / name), *extra], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    finals = [json.loads((tmp_path / n / ckpt.RUN_FILE).read_text())["final"] for n in ("killed", "whole")]
    assert finals[0] == finals[1] and math.isfinite(finals[0]["loss"])
    resumed, whole = (load_file(tmp_path / n / ckpt.WEIGHTS_FILE) for n in ("killed", "whole"))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert ckpt.read_metrics(tmp_path / "killed") == ckpt.read_metrics(tmp_path / "whole")
