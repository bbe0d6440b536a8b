"""The induction organism: its data, its phase-change detector, and the shipped checkpoint's heads."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mechscope import zoo
from mechscope.toys import train
from mechscope.toys.induction import Induction, phase_change
from mechscope.toys.training import TrainConfig

SMALL = Induction(d_vocab=40, n_ctx=24, d_model=16, n_heads=2, batch_size=8, min_run=3, max_run=6, eval_length=8)


def has_copy(row, run):
    """Whether some window of ``run`` tokens occurs twice in ``row``."""
    windows = [tuple(row[i : i + run]) for i in range(len(row) - run + 1)]
    return len(set(windows)) < len(windows)


@given(seed=st.integers(0, 10_000), step=st.integers(0, 10_000))
def test_every_row_starts_with_bos_and_contains_a_copied_run(seed, step):
    batch = SMALL.batch(step, torch.Generator().manual_seed(seed))
    assert batch.shape == (SMALL.batch_size, SMALL.n_ctx)
    assert (batch[:, 0] == 0).all() and (batch[:, 1:] > 0).all() and (batch < SMALL.d_vocab).all()
    assert all(has_copy(row.tolist()[1:], SMALL.min_run) for row in batch)
    again = SMALL.batch(step, torch.Generator().manual_seed(seed))
    assert torch.equal(batch, again)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_vocab": 2}, "d_vocab >= 3"),
        ({"min_run": 1}, "2 <= min_run <= max_run"),
        ({"max_run": 40}, "2 \\* max_run \\+ 1 <= n_ctx"),
        ({"eval_length": 40}, "eval_length=40"),
    ],
)
def test_impossible_task_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        Induction(**fields)


def curve(losses, every=50):
    return [{"step": every * (i + 1), "loss": 0.0, "repeat_loss": loss} for i, loss in enumerate(losses)]


def test_phase_change_finds_the_cliff_and_ignores_a_flat_curve():
    cliff = curve([4.0] * 10 + [3.9, 2.0, 0.5] + [0.3] * 7)
    change = phase_change(cliff, chance=4.0)
    assert (change["start"], change["end"]) == (550, 650)
    assert change["loss_before"] == 3.9 and change["loss_after"] == 0.5
    assert change["fraction_of_training"] == pytest.approx(100 / 1000)
    assert phase_change(curve([4.0, 3.98, 3.97, 3.99] * 5), chance=4.0) is None
    assert phase_change(curve([4.0, 3.0]), chance=4.0) is None  # too few evaluations to tell


def test_training_reduces_the_loss_on_repeated_tokens():
    result = train(SMALL, TrainConfig(steps=150, lr=3e-3, eval_every=50, log_every=50), progress=False)
    first, last = result.metrics[0], result.metrics[-1]
    assert last["repeat_loss"] < first["repeat_loss"]
    assert last["random_loss"] > 0.8 * math.log(SMALL.d_vocab - 1)  # random tokens stay unpredictable


def test_the_shipped_model_has_a_previous_token_head_feeding_an_induction_head():
    findings = zoo.explain("induction")
    assert findings["previous_token_head"][0] == 0 and findings["previous_token_score"] > 0.5
    assert findings["induction_head"][0] == 1 and findings["induction_score"] > 0.5
    scores = findings["head_scores"]
    assert max(scores["induction"][0]) < 0.2  # layer 0 cannot do induction on its own
    chance = math.log(Induction().d_vocab - 1)
    assert findings["repeat_loss"] < 0.25 * chance


def test_the_shipped_metrics_record_a_phase_change():
    model = zoo.load("induction")
    change = zoo.explain("induction")["phase_change"]
    assert change["loss_after"] < 0.5 * change["loss_before"]
    assert 0 < change["start"] < change["end"] < model.run["train"]["steps"]
    assert change["fraction_of_training"] < 0.3  # abrupt: most of the fall in under a third of the run
