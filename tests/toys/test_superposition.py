"""Toy models of superposition: the data, the maths, training, and the shipped sparsity sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

from mechscope.toys import TrainConfig, train, zoo
from mechscope.toys import checkpoint as ckpt
from mechscope.toys.superposition import Superposition, ToyModel, dimensionality

SHIPPED = Path(__file__).parents[2] / "mechscope" / "toys" / "checkpoints" / "superposition"


def load_shipped() -> tuple[Superposition, ToyModel, list[dict]]:
    model, organism, _, metrics = zoo.load_run("superposition")
    return organism, model, metrics


def with_weights(W: torch.Tensor, sparsities: list[float]) -> tuple[Superposition, ToyModel]:
    """A sweep whose model has the hand-built ``W`` [instance, hidden, feature] and zero bias."""
    organism = Superposition(n_features=W.shape[-1], n_hidden=W.shape[-2], sparsities=sparsities)
    model = organism.build_model()
    with torch.no_grad():
        model.W.copy_(W)
    return organism, model


# ------------------------------------------------------------------ the data
def test_features_are_zero_with_probability_s_and_otherwise_uniform():
    organism = Superposition(n_features=20, n_hidden=5, sparsities=[0.0, 0.3, 0.9, 0.99])
    x = organism.features(20_000, torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 4, 20)
    assert x.min() >= 0 and x.max() <= 1
    n = x.shape[0] * x.shape[2]
    for i, s in enumerate(organism.sparsities):
        zero = (x[:, i] == 0).float().mean().item()
        tolerance = 5 * math.sqrt(s * (1 - s) / n) + 1e-5  # five binomial standard deviations
        assert abs(zero - s) <= tolerance, (s, zero, tolerance)
        present = x[:, i][x[:, i] > 0]
        assert abs(present.mean().item() - 0.5) <= 5 * math.sqrt(1 / 12 / present.numel())  # uniform on [0, 1]


def test_batches_depend_only_on_the_generator():
    organism = Superposition()
    first = organism.batch(3, torch.Generator().manual_seed(7))
    again = organism.batch(3, torch.Generator().manual_seed(7))
    other = organism.batch(3, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (organism.batch_size, organism.n_instances, organism.n_features)


def test_importance_decays_geometrically_and_weights_the_loss():
    organism = Superposition(n_features=6, n_hidden=2, importance_decay=0.5, sparsities=[0.0])
    assert torch.allclose(organism.importance(), torch.tensor([1, 0.5, 0.25, 0.125, 0.0625, 0.03125]))
    model = organism.build_model()
    with torch.no_grad():
        model.W.zero_()  # the model then outputs 0, so the loss is Σ_i I_i x_i² averaged over the batch
    x = organism.features(64, torch.Generator().manual_seed(0))
    expected = (x[:, 0] ** 2 * organism.importance()).sum(-1).mean()
    assert torch.allclose(organism.per_instance_loss(model, x), expected[None])


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="n_hidden=5 must be smaller than n_features=5"):
        Superposition(n_features=5, n_hidden=5)
    with pytest.raises(ValueError, match=r"sparsities must be .* in \[0, 1\)"):
        Superposition(sparsities=[0.5, 1.0])
    with pytest.raises(ValueError, match="importance_decay"):
        Superposition(importance_decay=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        Superposition(batch_size=0)


# ------------------------------------------------------------------ the model and its measures
def test_each_instance_computes_relu_of_wtwx_plus_b():
    model = ToyModel(n_instances=3, n_features=7, n_hidden=2)
    with torch.no_grad():
        model.b_final.normal_()
    x = torch.rand(5, 3, 7)
    for i in range(3):
        W, b = model.W[i], model.b_final[i]
        assert torch.allclose(model(x)[:, i], torch.relu(x[:, i] @ W.T @ W + b), atol=1e-6)


def test_dimensionality_of_hand_built_geometries():
    orthogonal = torch.eye(3)
    antipodal = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])  # features 0 and 1 share a direction
    angles = torch.arange(5) * 2 * math.pi / 5
    pentagon = torch.stack([angles.cos(), angles.sin()])  # five features in two dimensions
    dropped = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # feature 1 is not represented at all
    assert torch.allclose(dimensionality(orthogonal), torch.ones(3))
    assert torch.allclose(dimensionality(antipodal), torch.tensor([0.5, 0.5, 1.0]))
    assert torch.allclose(dimensionality(pentagon), torch.full((5,), 0.4), atol=1e-6)
    assert torch.allclose(dimensionality(dropped), torch.tensor([1.0, 0.0]))
    batched = dimensionality(torch.stack([orthogonal, 2 * orthogonal]))  # per instance, and scale-free
    assert torch.allclose(batched, torch.ones(2, 3))


def test_explain_counts_features_and_superposition_on_hand_built_weights():
    dense = torch.zeros(2, 4)
    dense[0, 0] = dense[1, 1] = 1.0  # two features on their own dimensions, two dropped
    sparse = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]])  # two antipodal pairs
    organism, model = with_weights(torch.stack([dense, sparse]), sparsities=[0.0, 0.99])
    findings = organism.explain(model)
    assert findings["features_represented"] == [2, 4]
    assert findings["superposed_fraction"] == [0.0, 1.0]
    assert findings["dimensionality"] == [[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]
    assert findings["dimensions_per_feature"] == [1.0, 0.5]
    assert findings["superposition"] is True
    assert findings["norm_gap"] == [0.0, 1.0]
    assert any("S=0.990: 4 of 4 features represented (m=2)" in line for line in findings.lines)
    fig = organism.figures(model, [], findings)["superposition_sweep"]
    assert isinstance(fig, go.Figure) and "superposition" in fig.layout.title.text
    assert list(fig.data[0].y) == [2, 4]


def test_a_short_run_reduces_the_loss_of_every_instance():
    organism = Superposition(n_features=6, n_hidden=2, sparsities=[0.0, 0.9], batch_size=256)
    before = organism.evaluate(organism.build_model())
    config = TrainConfig(steps=300, lr=1e-2, weight_decay=0.0, grad_clip=None, log_every=100, eval_every=300)
    after = train(organism, config, progress=False).metrics[-1]
    for s in ("0", "0.9"):
        assert after[f"loss_S{s}"] < 0.7 * before[f"loss_S{s}"]
    assert after["represented_S0"] <= 3


# ------------------------------------------------------------------ the shipped checkpoint
def test_shipped_checkpoint_represents_m_features_when_dense_and_more_when_sparse():
    organism, model, metrics = load_shipped()
    findings = organism.explain(model, metrics)
    counts = dict(zip(organism.sparsities, findings["features_represented"]))
    m = organism.n_hidden
    assert m - 1 <= counts[min(counts)] <= m + 1
    assert counts[max(counts)] > m
    assert findings["superposition"] is True
    assert findings["superposed_fraction"][organism.sparsities.index(min(counts))] == 0.0
    evaluated = organism.evaluate(model)
    assert [evaluated[f"represented_S{s:g}"] for s in organism.sparsities] == findings["features_represented"]
    assert evaluated == pytest.approx({k: v for k, v in metrics[-1].items() if k in evaluated}, rel=1e-4)


def test_shipped_checkpoint_is_the_default_recipe():
    record = json.loads((SHIPPED / ckpt.RUN_FILE).read_text(encoding="utf-8"))
    organism = Superposition()
    assert record["organism"] == "superposition"
    assert record["params"] == organism.params()
    assert record["train"] == organism.train_config().to_dict()
    assert record["command"].startswith("mechscope train superposition --seed 0")
