"""Modular addition: the Fourier tools, the task, training on a small p, and the shipped p = 113 model."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope import zoo
from mechscope.loading.pretrained import Model
from mechscope.toys import TrainConfig, fourier, train
from mechscope.toys.modular import ModularAddition, figure, grokking_figure, key_frequencies
from mechscope.toys.zoo import SHIPPED, load_run

PRIMES = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61]


def wave(p: int, k: int, phase: float, values: torch.Tensor | None = None) -> torch.Tensor:
    """``cos(2πk x / p + phase)`` for x in Z_p (or at ``values``)."""
    x = torch.arange(p, dtype=torch.float64) if values is None else values.double()
    return torch.cos(2 * math.pi * k * x / p + phase).float()


# ----------------------------------------------------------------- the Fourier basis
@pytest.mark.parametrize("p", [3, 23, 113])
def test_fourier_basis_is_orthonormal(p):
    basis = fourier.fourier_basis(p)
    assert basis.shape == (p, p)
    torch.testing.assert_close(basis @ basis.T, torch.eye(p), atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), p=st.sampled_from(PRIMES), d=st.integers(1, 8), phase=st.floats(0, 2 * math.pi))
def test_a_pure_wave_embedding_is_one_key_frequency(data, p, d, phase):
    k = data.draw(st.integers(1, (p - 1) // 2))
    direction = torch.randn(d, generator=torch.Generator().manual_seed(p * d))
    direction = direction / direction.norm()  # unit length, so the 1e-3 noise below stays small beside it
    embedding = wave(p, k, phase)[:, None] * direction  # every dimension is the same circle
    energy = fourier.frequency_energy(embedding)
    assert fourier.top_frequencies(energy, 1) == [k]
    assert fourier.energy_fraction(energy, [k]) == pytest.approx(1.0, abs=1e-5)
    if p > 3:  # with one frequency only, there is no gap to find
        noisy = embedding + 1e-3 * torch.randn(p, d, generator=torch.Generator().manual_seed(k))
        assert key_frequencies(fourier.frequency_energy(noisy)) == [k]


@settings(max_examples=30, deadline=None)
@given(p=st.sampled_from(PRIMES), d=st.integers(1, 6), seed=st.integers(0, 1000))
def test_frequency_energies_add_up_to_the_squared_norm(p, d, seed):
    values = torch.randn(p, d, generator=torch.Generator().manual_seed(seed))
    energy = fourier.frequency_energy(values)
    assert energy.shape == (fourier.n_frequencies(p),)
    assert float(energy.sum()) == pytest.approx(float(values.pow(2).sum()), rel=1e-4)


def test_key_frequencies_are_the_ones_above_the_gap():
    energy = torch.tensor([5.0, 1e-4, 0.3, 2e-4, 0.25, 0.2, 1e-4, 3e-4])  # index 0: the constant
    assert key_frequencies(energy) == [2, 4, 5]


# ----------------------------------------------------------------- restricted and excluded logits
def clock_logits(p: int, k: int, scale: float = 1.0) -> torch.Tensor:
    """What the Fourier circuit computes: ``scale * cos(w_k (a + b - c))`` over ``[a, b, c]``."""
    a, b, c = torch.meshgrid(torch.arange(p), torch.arange(p), torch.arange(p), indexing="ij")
    return scale * wave(p, k, 0.0, a + b - c)


def test_restricted_keeps_and_excluded_removes_the_key_frequencies():
    p, k = 13, 3
    clock = clock_logits(p, k)
    memorised = torch.randn(p, p, p, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fourier.restricted_logits(clock, [k]), clock, atol=1e-5, rtol=0)
    torch.testing.assert_close(fourier.excluded_logits(clock, [k]), torch.zeros_like(clock), atol=1e-5, rtol=0)
    other = fourier.restricted_logits(clock, [k + 1])  # the wrong frequency keeps nothing of the clock
    torch.testing.assert_close(other, torch.zeros_like(clock), atol=1e-5, rtol=0)
    # A function of a alone has no component along a + b beyond its mean.
    only_a = wave(p, k, 0.3)[:, None, None].expand(p, p, p)
    torch.testing.assert_close(fourier.excluded_logits(only_a, [k]), only_a, atol=1e-5, rtol=0)
    # Restricted and excluded split the logits (the constant is kept by both).
    logits = clock + memorised
    total = fourier.restricted_logits(logits, [k]) + fourier.excluded_logits(logits, [k])
    torch.testing.assert_close(total, logits + fourier.sum_components(logits, [0]), atol=1e-5, rtol=0)


def test_restricted_and_excluded_losses_of_a_perfect_clock():
    """A model that is all circuit: restricted loss tiny, excluded loss that of a uniform guess."""
    p, k = 17, 5
    organism = ModularAddition(p=p, n_key_frequencies=1)
    answers = organism.all_pairs[1]
    logits = clock_logits(p, k, scale=300.0)  # one circle: the runner-up answer is only 1 - cos(2π/p) behind
    restricted = fourier.restricted_logits(logits, [k]).reshape(p * p, p)
    excluded = fourier.excluded_logits(logits, [k]).reshape(p * p, p)
    assert torch.nn.functional.cross_entropy(restricted, answers) < 1e-3
    assert float(torch.nn.functional.cross_entropy(excluded, answers)) == pytest.approx(math.log(p), rel=1e-4)
    assert fourier.top_frequencies(fourier.sum_frequency_energy(logits), 1) == [k]


# ----------------------------------------------------------------- the task
@pytest.mark.parametrize("p", [5, 23, 113])
def test_split_is_deterministic_disjoint_and_complete(p):
    organism = ModularAddition(p=p, train_fraction=0.3, data_seed=7)
    train_pairs, test_pairs = organism.split
    again_train, again_test = ModularAddition(p=p, train_fraction=0.3, data_seed=7).split
    assert torch.equal(train_pairs, again_train) and torch.equal(test_pairs, again_test)
    assert len(train_pairs) == round(0.3 * p * p)
    assert not set(train_pairs.tolist()) & set(test_pairs.tolist())
    assert sorted(train_pairs.tolist() + test_pairs.tolist()) == list(range(p * p))
    other = ModularAddition(p=p, train_fraction=0.3, data_seed=8).split[0]
    assert not torch.equal(train_pairs, other)


def test_batches_are_the_whole_training_set_with_the_right_answers():
    organism = ModularAddition(p=23)
    tokens, answers = organism.batch(0, torch.Generator().manual_seed(1))
    later, _ = organism.batch(99, torch.Generator().manual_seed(2))
    assert torch.equal(tokens, later)  # full batch: the generator is not used
    assert tokens.shape == (organism.n_train, 3)
    assert (tokens[:, 2] == 23).all()
    assert torch.equal(answers, (tokens[:, 0] + tokens[:, 1]) % 23)
    assert set((tokens[:, 0] * 23 + tokens[:, 1]).tolist()) == set(organism.split[0].tolist())


@pytest.mark.bad_input
@pytest.mark.parametrize("p", [1, 2, 4, 9, 15, 113.0, True, "113"])
def test_p_must_be_an_odd_prime(p):
    with pytest.raises(ValueError, match="odd prime"):
        ModularAddition(p=p)


@pytest.mark.bad_input
@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_train_fraction_must_lie_in_the_open_unit_interval(fraction):
    with pytest.raises(ValueError, match="train_fraction"):
        ModularAddition(train_fraction=fraction)


@pytest.mark.bad_input
def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="n_key_frequencies"):
        ModularAddition(p=7, n_key_frequencies=0)
    with pytest.raises(ValueError, match="both the training and the test set"):
        ModularAddition(p=3, train_fraction=0.01)
    with pytest.raises(ValueError, match="n_heads"):
        ModularAddition(d_model=10, n_heads=4)


# ----------------------------------------------------------------- training on a small p
def test_training_a_small_p_reduces_the_loss_and_logs_the_curves():
    torch.manual_seed(0)
    organism = ModularAddition(p=23, d_model=32, n_heads=2, d_mlp=64)
    config = TrainConfig(steps=150, lr=1e-2, weight_decay=1.0, betas=(0.9, 0.98), grad_clip=None, eval_every=50)
    result = train(organism, config, progress=False)
    assert isinstance(result.model, Model)
    assert result.final_loss < 0.2 * result.metrics[0]["loss"]
    evaluated = [m for m in result.metrics if "test_accuracy" in m]
    assert [m["step"] for m in evaluated] == [50, 100, 150]
    assert evaluated[-1]["train_accuracy"] > evaluated[0]["train_accuracy"]
    for key in ("train_loss", "test_loss", "restricted_loss", "excluded_loss", "embedding_key_fraction"):
        assert all(math.isfinite(m[key]) for m in evaluated)
    findings = organism.explain(result.model, result.metrics)
    assert findings["train_acc_100_step"] in (None, 50, 100, 150)
    assert 0 < findings["key_frequency_norm_fraction"] <= 1
    assert isinstance(grokking_figure(result.metrics), go.Figure)


# ----------------------------------------------------------------- the shipped p = 113 model
@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "modular_addition" / "run.json").exists():
        pytest.skip("the modular_addition checkpoint is not shipped in this checkout")
    model, organism, record, metrics = load_run("modular_addition")
    return model, organism, record, metrics, organism.explain(model, metrics)


def test_shipped_model_is_the_recipe(shipped):
    model, organism, record, _, _ = shipped
    assert isinstance(model, Model) and organism == ModularAddition()
    assert record["command"].startswith("mechscope train modular_addition --seed 0")
    assert record["train"] == {**organism.train_config().to_dict(), "seed": record["seed"]}
    loaded = zoo.load("modular_addition")
    assert isinstance(loaded, Model) and loaded.organism == organism


def test_shipped_embedding_is_sparse_in_the_fourier_basis(shipped):
    findings = shipped[4]
    assert len(findings["key_frequencies"]) >= 3
    assert findings["key_frequency_norm_fraction"] > 0.8
    assert findings["logit_key_frequencies"] == findings["key_frequencies"]  # the logits use the same circles
    assert isinstance(figure(findings), go.Figure)


def test_shipped_model_generalises(shipped):
    findings = shipped[4]
    assert findings["final_train_accuracy"] == 1.0
    assert findings["final_test_accuracy"] >= 0.99


def test_shipped_metrics_record_grokking(shipped):
    findings = shipped[4]
    memorised, grokked = findings["train_acc_100_step"], findings["test_acc_99_step"]
    assert memorised is not None and grokked is not None
    assert grokked >= memorised + 1000 and grokked >= 5 * memorised  # long after, not alongside
    restricted, excluded = findings["restricted_loss"], findings["excluded_loss"]
    assert restricted["final"] < 0.1 * restricted["memorised"]  # the circuit alone now does the task
    assert excluded["final"] > 10 * excluded["memorised"]  # and the model relies on it
    assert findings["restricted_loss_01_step"] < grokked  # the circuit formed before the test loss fell
