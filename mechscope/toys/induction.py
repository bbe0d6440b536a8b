"""Induction: a 2-layer attention-only transformer learns to continue repeated token runs.

Training sequences are random tokens in which a few earlier runs are copied later on. Random
tokens cannot be predicted, so the only thing to learn is "after the token I have seen
before comes what came after it last time". Two heads do it together (Olsson et al. 2022):
a previous-token head in layer 0 writes "the token before me was A" into each position, and an
induction head in layer 1 uses that, through K-composition, to find the position after the
earlier A and copy its token. The loss on repeated tokens falls abruptly once the pair forms:
the induction phase change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.loading.pretrained import Model
from mechscope.model.config import ModelConfig
from mechscope.model.transformer import next_token_loss
from mechscope.toys.heads import add_head_findings, attention_scores, repeated_tokens
from mechscope.toys.organism import Findings, Organism
from mechscope.toys.training import TrainConfig

EVAL_SEED = 1234


@dataclass
class Induction(Organism):
    name = "induction"
    summary = "2-layer attention-only transformer; a previous-token head and an induction head form in a phase change"

    d_vocab: int = 512  # token 0 is BOS; the rest are random content
    n_ctx: int = 64
    d_model: int = 64
    n_heads: int = 4
    batch_size: int = 32
    min_run: int = 4  # shortest copied run
    max_run: int = 24
    eval_length: int = 24  # run length of the repeated-random-tokens evaluation

    def __post_init__(self) -> None:
        if self.d_vocab < 3:
            raise ValueError(f"induction needs d_vocab >= 3 (BOS plus content tokens), got {self.d_vocab}")
        if not 2 <= self.min_run <= self.max_run or 2 * self.max_run + 1 > self.n_ctx:
            raise ValueError(
                f"runs must satisfy 2 <= min_run <= max_run and 2 * max_run + 1 <= n_ctx, got "
                f"min_run={self.min_run}, max_run={self.max_run}, n_ctx={self.n_ctx}"
            )
        if 2 * self.eval_length + 1 > self.n_ctx:
            raise ValueError(f"eval_length={self.eval_length} needs 2 * eval_length + 1 <= n_ctx={self.n_ctx}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=2000, lr=1e-3, weight_decay=0.01, warmup_steps=100, log_every=25, eval_every=50)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            n_layers=2,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_ctx=self.n_ctx,
            d_vocab=self.d_vocab,
            attn_only=True,
            d_mlp=0,
            positional_embedding="rotary",  # relative positions: a previous-token head is one rotation away
        )

    def build_model(self) -> Model:
        return Model(self.model_config())

    def batch(self, step: int, generator: torch.Generator) -> Int[Tensor, "batch pos"]:
        """Rows of BOS then random runs, each followed (after a random gap) by a copy of itself."""
        return torch.stack([self.row(generator) for _ in range(self.batch_size)])

    def row(self, generator: torch.Generator) -> Int[Tensor, " pos"]:
        def draw(*shape: int) -> Tensor:
            return torch.randint(1, self.d_vocab, shape, generator=generator)

        pieces, filled = [torch.zeros(1, dtype=torch.long)], 1
        while filled < self.n_ctx:
            run = draw(int(torch.randint(self.min_run, self.max_run + 1, (), generator=generator)))
            gap = draw(int(torch.randint(0, len(run) + 1, (), generator=generator)))
            pieces += [run, gap, run]
            filled += 2 * len(run) + len(gap)
        return torch.cat(pieces)[: self.n_ctx]

    def loss(self, model: Model, batch: Tensor) -> tuple[Tensor, dict[str, float]]:
        return next_token_loss(model(batch), batch), {}

    def eval_tokens(self) -> Int[Tensor, "batch seq"]:
        return repeated_tokens(self.d_vocab, self.eval_length, 64, torch.Generator().manual_seed(EVAL_SEED), bos=0)

    def evaluate(self, model: Model) -> dict[str, float]:
        """Loss on the first (unpredictable) and second (predictable by induction) copy."""
        tokens = self.eval_tokens()
        losses = next_token_loss(model(tokens), tokens, per_token=True)
        half = self.eval_length
        return {
            "random_loss": losses[:, :half].mean().item(),  # predicting x_2..x_L and the first x_1
            "repeat_loss": losses[:, half + 1 :].mean().item(),  # predicting the second x_2..x_L
        }

    def explain(self, model: Model, metrics: Sequence[dict[str, Any]] = ()) -> Findings:
        findings = Findings(self.name)
        chance = math.log(self.d_vocab - 1)
        scores = attention_scores(model, self.eval_tokens())
        evaluation = self.evaluate(model)
        findings.add(
            "repeat_loss",
            evaluation["repeat_loss"],
            f"loss on repeated tokens {evaluation['repeat_loss']:.3f} nats vs {evaluation['random_loss']:.3f} on "
            f"random ones (chance {chance:.3f})",
        )
        add_head_findings(findings, scores, previous_token_layer=0)
        change = phase_change(metrics, chance)
        if change is not None:
            findings.add(
                "phase_change",
                change,
                f"phase change: repeated-token loss fell from {change['loss_before']:.2f} to {change['loss_after']:.2f}"
                f" between steps {change['start']} and {change['end']} (of {metrics[-1]['step']})",
            )
        return findings

    def figures(self, model: Model, metrics: Sequence[dict[str, Any]], findings: Findings) -> dict[str, Any]:
        return {"induction_phase_change": figure(metrics)}


def phase_change(metrics: Sequence[dict[str, Any]], chance: float) -> dict[str, Any] | None:
    """Where the repeated-token loss fell fastest, and the window in which most of its fall happened.

    The window runs from the last evaluation still within 10 % of the plateau's drop to the
    first within 10 % of the final loss, so a sharp phase change gives a short window.
    """
    curve = [(m["step"], m["repeat_loss"]) for m in metrics if "repeat_loss" in m]
    if len(curve) < 3:
        return None
    plateau, final = max(loss for _, loss in curve), curve[-1][1]
    drop = plateau - final
    if drop < 0.25 * chance:
        return None
    start = max(step for step, loss in curve if loss >= plateau - 0.1 * drop)
    end = min(step for step, loss in curve if loss <= final + 0.1 * drop and step >= start)
    loss_at = dict(curve)
    return {
        "start": start,
        "end": end,
        "loss_before": loss_at[start],
        "loss_after": loss_at[end],
        "fraction_of_training": (end - start) / curve[-1][0],
    }


def figure(metrics: Sequence[dict[str, Any]]):
    """Loss on repeated and random tokens over training: the phase change is the cliff."""
    import plotly.graph_objects as go

    curve = [m for m in metrics if "repeat_loss" in m]
    fig = go.Figure()
    for key, label in (("random_loss", "first (random) copy"), ("repeat_loss", "second (repeated) copy")):
        fig.add_scatter(x=[m["step"] for m in curve], y=[m[key] for m in curve], mode="lines", name=label)
    fig.update_layout(
        title="Induction phase change: loss on repeated random tokens",
        xaxis_title="training step",
        yaxis_title="loss (nats)",
    )
    return fig
