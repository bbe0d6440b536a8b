"""Toy models of superposition (Elhage et al., 2022): more features than dimensions.

``n`` features, each zero with probability ``S`` (the sparsity) and otherwise uniform on
[0, 1], with importance ``decay**i``, are squeezed through ``m < n`` hidden dimensions and
read back out by ``x' = ReLU(WᵀW x + b)``. When inputs are dense the model keeps the ``m`` most
important features on orthogonal directions and drops the rest; as inputs grow sparse,
interference between features is rarely paid, so it packs more than ``m`` features into the
``m`` dimensions (antipodal pairs, pentagons...): superposition.

One :class:`ToyModel` holds the whole sparsity sweep: one independent instance per sparsity,
trained in parallel. The loss is a sum over instances and Adam's updates are per parameter,
so the instances never influence each other (which is why the recipe does not clip the
global gradient norm: that would couple them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import plotly.graph_objects as go
import torch
from einops import einsum
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor, nn

from mechscope.toys.organism import Findings, Organism
from mechscope.toys.training import TrainConfig

REPRESENTED_NORM = 0.5  # ‖W_i‖ above this: feature i is represented (norms sit near 0 or near 1)
SUPERPOSED_DIMENSIONALITY = 0.9  # a represented feature with D_i below this shares its dimensions
EVAL_SAMPLES = 1 << 14
EVAL_SEED = 1234


class ToyModel(nn.Module):
    """``n_instances`` independent models ``x' = ReLU(WᵀW x + b)``, one per sparsity."""

    def __init__(self, n_instances: int, n_features: int, n_hidden: int) -> None:
        super().__init__()
        W = torch.empty(n_instances, n_hidden, n_features)
        for instance in W:
            nn.init.xavier_normal_(instance)
        self.W = nn.Parameter(W)
        self.b_final = nn.Parameter(torch.zeros(n_instances, n_features))

    def hidden(self, x: Float[Tensor, "batch instance feature"]) -> Float[Tensor, "batch instance hidden"]:
        return einsum(self.W, x, "instance hidden feature, batch instance feature -> batch instance hidden")

    def forward(self, x: Float[Tensor, "batch instance feature"]) -> Float[Tensor, "batch instance feature"]:
        h = self.hidden(x)
        out = einsum(self.W, h, "instance hidden feature, batch instance hidden -> batch instance feature")
        return torch.relu(out + self.b_final)


def dimensionality(W: Float[Tensor, "*instance hidden feature"]) -> Float[Tensor, "*instance feature"]:
    """Each feature's share of a dimension, D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)².

    1 for a feature with a dimension of its own, 1/2 for each of an antipodal pair, 2/5 for a
    pentagon; 0 for a feature the model does not represent."""
    norms = W.norm(dim=-2, keepdim=True)
    unit = W / norms.clamp(min=1e-12)
    overlaps = einsum(unit, W, "... hidden i, ... hidden j -> ... i j")
    return norms.squeeze(-2) ** 2 / (overlaps**2).sum(-1).clamp(min=1e-12)


@dataclass
class Superposition(Organism):
    """A sparsity sweep of toy models of superposition, one instance per sparsity."""

    name: ClassVar[str] = "superposition"
    summary: ClassVar[str] = "ReLU(WᵀWx + b) packs more features than dimensions as inputs grow sparse"

    n_features: int = 20
    n_hidden: int = 5
    importance_decay: float = 0.9
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999])
    batch_size: int = 1024

    def __post_init__(self) -> None:
        for name in ("n_features", "n_hidden", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Superposition.{name} must be a positive integer, got {value!r}")
        if self.n_hidden >= self.n_features:
            raise ValueError(
                f"Superposition.n_hidden={self.n_hidden} must be smaller than n_features={self.n_features} "
                "(the model compresses n features into m < n dimensions)"
            )
        if not 0 < self.importance_decay <= 1:
            raise ValueError(f"Superposition.importance_decay must lie in (0, 1], got {self.importance_decay!r}")
        self.sparsities = [float(s) for s in self.sparsities]
        if not self.sparsities or any(not 0 <= s < 1 for s in self.sparsities):
            raise ValueError(
                f"Superposition.sparsities must be a non-empty list of values in [0, 1), got {self.sparsities!r}"
            )

    # ------------------------------------------------------------ the task
    @property
    def n_instances(self) -> int:
        return len(self.sparsities)

    def importance(self) -> Float[Tensor, " feature"]:
        """Feature i matters ``decay**i`` as much as feature 0 in the loss."""
        return self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32)

    def features(self, n: int, generator: torch.Generator) -> Float[Tensor, "batch instance feature"]:
        """``n`` inputs per instance: each feature is 0 with probability S, else uniform on [0, 1]."""
        shape = (n, self.n_instances, self.n_features)
        values = torch.rand(shape, generator=generator)
        present = torch.rand(shape, generator=generator) >= torch.tensor(self.sparsities)[:, None]
        return values * present

    def per_instance_loss(
        self, model: ToyModel, x: Float[Tensor, "batch instance feature"]
    ) -> Float[Tensor, " instance"]:
        """Importance-weighted squared error, summed over features and averaged over the batch."""
        error = self.importance() * (model(x) - x) ** 2
        return error.sum(-1).mean(0)

    # ------------------------------------------------------------ the organism interface
    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=10_000,
            lr=1e-3,
            weight_decay=0.0,
            schedule="cosine",
            final_lr_fraction=0.05,
            grad_clip=None,
            log_every=50,
            eval_every=500,
            checkpoint_every=2500,
        )

    def build_model(self) -> ToyModel:
        return ToyModel(self.n_instances, self.n_features, self.n_hidden)

    def batch(self, step: int, generator: torch.Generator) -> Float[Tensor, "batch instance feature"]:
        return self.features(self.batch_size, generator)

    def loss(self, model: nn.Module, batch: Tensor) -> tuple[Tensor, dict[str, float]]:
        return self.per_instance_loss(model, batch).sum(), {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Each instance's held-out loss and how many features it represents."""
        x = self.features(EVAL_SAMPLES, torch.Generator().manual_seed(EVAL_SEED))
        losses = self.per_instance_loss(model, x).tolist()
        counts = represented(model.W).sum(-1).tolist()
        out: dict[str, float] = {}
        for s, instance_loss, count in zip(self.sparsities, losses, counts):
            out[f"loss_S{s:g}"] = instance_loss
            out[f"represented_S{s:g}"] = float(count)
        return out

    def explain(self, model: nn.Module, metrics: Sequence[dict[str, Any]] = ()) -> Findings:
        """Count the represented features and measure each one's share of a dimension."""
        W = model.W.detach()
        norms = W.norm(dim=-2)
        kept = represented(W)
        dims = dimensionality(W)
        superposed = kept & (dims < SUPERPOSED_DIMENSIONALITY)
        dims_per_feature = self.n_hidden / (W**2).sum((-2, -1))
        counts = kept.sum(-1).tolist()

        findings = Findings(self.name)
        findings.add("n_features", self.n_features)
        findings.add("n_hidden", self.n_hidden)
        findings.add("sparsities", list(self.sparsities))
        findings.add("features_represented", counts)
        findings.add("dimensionality", [[round(d, 4) for d in row] for row in dims.tolist()])
        findings.add("feature_norms", [[round(v, 4) for v in row] for row in norms.tolist()])
        findings.add("superposed_fraction", [frac(s, k) for s, k in zip(superposed.sum(-1).tolist(), counts)])
        findings.add("dimensions_per_feature", [round(v, 4) for v in dims_per_feature.tolist()])
        for i, s in enumerate(self.sparsities):
            findings.lines.append(
                f"S={s:.3f}: {counts[i]} of {self.n_features} features represented (m={self.n_hidden}), "
                f"{int(superposed[i].sum())} in superposition, {dims_per_feature[i]:.2f} dimensions per feature"
            )
        densest = min(range(self.n_instances), key=self.sparsities.__getitem__)
        sparsest = max(range(self.n_instances), key=self.sparsities.__getitem__)
        findings.add(
            "superposition",
            counts[sparsest] > self.n_hidden,
            f"the densest inputs (S={self.sparsities[densest]:g}) keep {counts[densest]} features in "
            f"{self.n_hidden} dimensions; the sparsest (S={self.sparsities[sparsest]:g}) pack {counts[sparsest]}",
        )
        gap = norm_gap(norms)
        findings.add(
            "norm_gap",
            gap,
            f"threshold ‖W_i‖ > {REPRESENTED_NORM}: the largest norm at or below it is {gap[0]}, "
            f"the smallest above it {gap[1]}",
        )
        return findings

    def figures(self, model: nn.Module, metrics: Sequence[dict[str, Any]], findings: Findings) -> dict[str, Any]:
        return {"superposition_sweep": figure(findings)}


def represented(W: Float[Tensor, "*instance hidden feature"]) -> Tensor:
    """Which features the model represents: those whose embedding has norm above 1/2.

    A represented feature must come back out at its own size, so ‖W_i‖² ≈ 1; a dropped one
    only adds interference and is pushed to 0. Trained norms sit near one end or the other
    (``explain`` reports the empty gap around the threshold)."""
    return W.norm(dim=-2) > REPRESENTED_NORM


def norm_gap(norms: Float[Tensor, "instance feature"]) -> list[float | None]:
    """The largest norm at or below the threshold and the smallest above it, over all instances
    (None where there is none): how far the trained norms stay from the threshold."""
    below = norms[norms <= REPRESENTED_NORM]
    above = norms[norms > REPRESENTED_NORM]
    low = round(float(below.max()), 2) if below.numel() else None
    high = round(float(above.min()), 2) if above.numel() else None
    return [low, high]


def frac(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def figure(findings: Findings) -> go.Figure:
    """Features represented against sparsity, and each feature's dimensionality (as in the paper)."""
    sparsities = findings["sparsities"]
    density_inverse = [1 / (1 - s) for s in sparsities]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("Features represented", "Dimensions per feature"),
        horizontal_spacing=0.12,
    )
    fig.add_trace(
        go.Scatter(x=density_inverse, y=findings["features_represented"], mode="lines+markers", name="represented"),
        row=1,
        col=1,
    )
    for value, label in ((findings["n_hidden"], "m (hidden dimensions)"), (findings["n_features"], "n (features)")):
        fig.add_trace(
            go.Scatter(
                x=[density_inverse[0], density_inverse[-1]],
                y=[value, value],
                mode="lines",
                line={"dash": "dash"},
                name=label,
            ),
            row=1,
            col=1,
        )
    points = [(x, d) for x, row in zip(density_inverse, findings["dimensionality"]) for d in row]
    fig.add_trace(
        go.Scatter(
            x=[x for x, _ in points],
            y=[d for _, d in points],
            mode="markers",
            marker={"size": 6, "opacity": 0.6},
            name="D_i (each feature)",
        ),
        row=1,
        col=2,
    )
    fig.add_trace(
        go.Scatter(x=density_inverse, y=findings["dimensions_per_feature"], mode="lines", name="m / ‖W‖²_F"),
        row=1,
        col=2,
    )
    for col in (1, 2):
        fig.update_xaxes(type="log", title_text="1 / (1 − S)", row=1, col=col)
    fig.update_yaxes(title_text="features", row=1, col=1)
    fig.update_yaxes(title_text="dimensionality", range=[-0.05, 1.1], row=1, col=2)
    fig.update_layout(
        title=f"Toy models of superposition: {findings['n_features']} features in {findings['n_hidden']} dimensions"
    )
    return fig
