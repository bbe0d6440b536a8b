"""Modular addition: the organism that groks (Nanda et al. 2023, "Progress measures for grokking").

A one-layer transformer reads ``[a, b, =]`` and predicts ``(a + b) mod p`` at ``=``. It is
trained on the whole training set at every step (30% of the ``p²`` pairs) with strong weight
decay. It first memorises the training pairs (train accuracy 100%, test accuracy near chance),
then, thousands of steps later, generalises (test accuracy 100%): it has *grokked*.

The algorithm it ends up with is Fourier multiplication: the embedding writes each number as
points on a few circles ``(cos(w_k x), sin(w_k x))`` with ``w_k = 2πk/p`` for a handful of
*key frequencies* ``k``; attention and the MLP combine the circles of ``a`` and ``b`` into
``cos(w_k(a + b))`` and ``sin(w_k(a + b))``; the unembedding reads off ``cos(w_k(a + b - c))``,
largest at the right answer ``c``. The analysis (see :mod:`mechscope.toys.fourier`) shows:

- the embedding is sparse in the Fourier basis: a few key frequencies carry most of its norm;
- the *restricted loss* (logits cut down to the constant and the key frequencies of ``a + b``,
  on all pairs) falls well before the test loss does: the circuit forms gradually;
- the *excluded loss* (logits with the key frequencies of ``a + b`` removed, on the training
  pairs) rises: the model comes to rely on the circuit rather than on memorised answers.

``evaluate`` cannot know the final key frequencies, so at every evaluation it takes the
``n_key_frequencies`` frequencies of ``a + b`` that carry the most energy in the current logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.loading.pretrained import Model
from mechscope.model.config import ModelConfig
from mechscope.toys import fourier
from mechscope.toys.organism import Findings, Organism
from mechscope.toys.training import TrainConfig

Batch = tuple[Int[Tensor, "pair 3"], Int[Tensor, " pair"]]


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


@dataclass
class ModularAddition(Organism):
    """``[a, b, =] -> (a + b) mod p`` with a one-layer ReLU transformer, trained until it groks."""

    name: ClassVar[str] = "modular_addition"
    summary: ClassVar[str] = "one-layer transformer that groks (a + b) mod 113 with a few Fourier frequencies"

    p: int = 113
    train_fraction: float = 0.3
    data_seed: int = 0
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    init_std: float = 0.088  # ≈ 1/sqrt(d_model), the scale Nanda et al. initialise with
    n_key_frequencies: int = 5  # how many frequencies evaluate() treats as key

    def __post_init__(self) -> None:
        if (
            not isinstance(self.p, int)
            or isinstance(self.p, bool)
            or self.p < 3
            or self.p % 2 == 0
            or not is_prime(self.p)
        ):
            raise ValueError(f"ModularAddition.p must be an odd prime >= 3, got {self.p!r}")
        if not 0 < self.train_fraction < 1:
            raise ValueError(
                f"ModularAddition.train_fraction must lie strictly between 0 and 1, got {self.train_fraction!r}"
            )
        n_train = self.n_train
        if not 0 < n_train < self.p**2:
            raise ValueError(
                f"train_fraction={self.train_fraction} leaves {n_train} of the {self.p**2} pairs for training; "
                "both the training and the test set need at least one pair"
            )
        if not isinstance(self.n_key_frequencies, int) or self.n_key_frequencies < 1:
            raise ValueError(
                f"ModularAddition.n_key_frequencies must be a positive integer, got {self.n_key_frequencies!r}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    # ------------------------------------------------------------ the task
    @property
    def n_keys(self) -> int:
        """``n_key_frequencies``, or all ``(p - 1) / 2`` frequencies when ``p`` has fewer."""
        return min(self.n_key_frequencies, fourier.n_frequencies(self.p) - 1)

    @property
    def n_train(self) -> int:
        return round(self.train_fraction * self.p**2)

    @cached_property
    def split(self) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
        """Indices ``a * p + b`` of the training and test pairs: a fixed shuffle of all ``p²`` pairs."""
        order = torch.randperm(self.p**2, generator=torch.Generator().manual_seed(self.data_seed))
        return order[: self.n_train].sort().values, order[self.n_train :].sort().values

    @cached_property
    def all_pairs(self) -> Batch:
        """Every input ``[a, b, =]`` (``=`` is token ``p``) in the order ``a * p + b``, with its answer."""
        a, b = torch.cartesian_prod(torch.arange(self.p), torch.arange(self.p)).unbind(dim=1)
        tokens = torch.stack([a, b, torch.full_like(a, self.p)], dim=1)
        return tokens, (a + b) % self.p

    def pairs(self, indices: Int[Tensor, " n"]) -> Batch:
        tokens, answers = self.all_pairs
        return tokens[indices], answers[indices]

    # ------------------------------------------------------------ the recipe
    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=3500,
            lr=3e-3,
            weight_decay=1.0,
            betas=(0.9, 0.98),
            warmup_steps=10,
            schedule="constant",
            grad_clip=None,
            log_every=10,
            eval_every=50,
            checkpoint_every=500,
        )

    def build_model(self) -> Model:
        cfg = ModelConfig(
            n_layers=1,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_model // self.n_heads,
            d_mlp=self.d_mlp,
            act_fn="relu",
            normalization="none",
            n_ctx=3,
            d_vocab=self.p + 1,
            attn_bias=False,  # bias-free, as in Nanda et al.: every computation is in the weights
            attn_out_bias=False,
            mlp_bias=False,
            initializer_range=self.init_std,
        )
        return Model(cfg)

    def batch(self, step: int, generator: torch.Generator) -> Batch:
        """The whole training set, every step (full-batch training needs no randomness)."""
        return self.pairs(self.split[0])

    def loss(self, model: Model, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        tokens, answers = batch
        return cross_entropy(answer_logits(model, tokens, self.p), answers), {}

    # ------------------------------------------------------------ measuring
    def logit_grid(self, model: Model) -> Float[Tensor, "a b c"]:
        """The answer logits of every pair, as a function of ``(a, b)``."""
        tokens, _ = self.all_pairs
        with torch.no_grad():
            return fourier.pair_grid(answer_logits(model, tokens, self.p), self.p)

    def evaluate(self, model: Model) -> dict[str, float]:
        train, test = self.split
        grid = self.logit_grid(model)
        logits = grid.reshape(self.p**2, self.p)
        answers = self.all_pairs[1]
        keys = fourier.top_frequencies(fourier.sum_frequency_energy(grid), self.n_keys)
        restricted = fourier.restricted_logits(grid, keys).reshape(self.p**2, self.p)
        excluded = fourier.excluded_logits(grid, keys).reshape(self.p**2, self.p)
        embedding = fourier.frequency_energy(model.W_E[: self.p].detach())
        return {
            "train_loss": cross_entropy(logits[train], answers[train]).item(),
            "train_accuracy": accuracy(logits[train], answers[train]),
            "test_loss": cross_entropy(logits[test], answers[test]).item(),
            "test_accuracy": accuracy(logits[test], answers[test]),
            "restricted_loss": cross_entropy(restricted, answers).item(),
            "excluded_loss": cross_entropy(excluded[train], answers[train]).item(),
            "embedding_key_fraction": fourier.energy_fraction(
                embedding, fourier.top_frequencies(embedding, self.n_keys)
            ),
            "weight_norm": sum(w.detach().pow(2).sum() for w in model.parameters()).sqrt().item(),
        }

    # ------------------------------------------------------------ explaining
    def explain(self, model: Model, metrics: Sequence[dict[str, Any]] = ()) -> Findings:
        findings = Findings(self.name)
        self.explain_fourier(model, findings)
        final = self.evaluate(model)
        findings.add("final_train_accuracy", final["train_accuracy"])
        findings.add(
            "final_test_accuracy",
            final["test_accuracy"],
            f"now: train accuracy {final['train_accuracy']:.1%}, test accuracy {final['test_accuracy']:.1%} "
            f"(test loss {final['test_loss']:.2g}) on the {self.p**2 - self.n_train} pairs never trained on",
        )
        explain_grokking(metrics, findings)
        return findings

    def figures(self, model: Model, metrics: Sequence[dict[str, Any]], findings: Findings) -> dict[str, Any]:
        return {"modular_fourier_spectrum": figure(findings), "modular_grokking": grokking_figure(metrics)}

    def explain_fourier(self, model: Model, findings: Findings) -> None:
        """Which frequencies the embedding and the logits use, and how much of the embedding they carry."""
        embedding = fourier.frequency_energy(model.W_E[: self.p].detach())
        keys = key_frequencies(embedding)
        fraction = fourier.energy_fraction(embedding, keys)
        findings.add("key_frequencies", keys)
        findings.add(
            "key_frequency_norm_fraction",
            fraction,
            f"embedding: {len(keys)} key frequencies {keys} of {len(embedding) - 1} carry {fraction:.1%} "
            "of its squared norm in the Fourier basis",
        )
        grid = self.logit_grid(model)
        logit_keys = fourier.top_frequencies(fourier.sum_frequency_energy(grid), len(keys))
        varying = grid - fourier.sum_components(grid, [0])  # what changes with (a, b)
        explained = float(fourier.sum_components(grid, keys).pow(2).sum() / varying.pow(2).sum())
        findings.add("embedding_spectrum", (embedding / embedding.sum()).tolist())
        findings.add("logit_key_frequencies", logit_keys)
        findings.add(
            "logit_variance_explained",
            explained,
            f"logits: the strongest frequencies of cos/sin(w(a+b)) are {logit_keys}"
            + (" (the same)" if logit_keys == keys else "")
            + f"; the key frequencies of a+b carry {explained:.1%} of the logits' variation over (a, b)",
        )


def answer_logits(model: Model, tokens: Int[Tensor, "pair 3"], p: int) -> Float[Tensor, "pair p"]:
    """Logits for the answer, read at ``=``; the ``=`` token itself is never an answer."""
    return model(tokens)[:, -1, :p]


def cross_entropy(logits: Float[Tensor, "n c"], answers: Int[Tensor, " n"]) -> Float[Tensor, ""]:
    """Cross-entropy in float64, as Nanda et al. compute it: a memorised model's losses are
    ~1e-7, below float32's resolution near 1, where ``logsumexp`` rounds them to 0."""
    return F.cross_entropy(logits.double(), answers)


def accuracy(logits: Float[Tensor, "n c"], answers: Int[Tensor, " n"]) -> float:
    return (logits.argmax(dim=-1) == answers).float().mean().item()


def key_frequencies(energy: Float[Tensor, " freq"]) -> list[int]:
    """The frequencies that stand out: those above the largest gap in the sorted spectrum.

    A trained embedding puts nearly all of its norm on a few frequencies and orders of magnitude
    less on each of the others; the biggest ratio between consecutive sorted energies falls
    between the two groups, so no threshold has to be chosen.
    """
    order = torch.argsort(energy[1:], descending=True)
    sorted_energy = energy[1:][order].clamp_min(torch.finfo(energy.dtype).tiny)
    n_keys = int(torch.argmax(sorted_energy[:-1] / sorted_energy[1:])) + 1
    return sorted((order[:n_keys] + 1).tolist())


# ----------------------------------------------------------------- reading the curves
def first_step(metrics: Sequence[dict[str, Any]], key: str, at_least: float) -> int | None:
    """The first logged step whose ``key`` reached ``at_least``, or None if it never did."""
    return next((int(m["step"]) for m in metrics if key in m and m[key] >= at_least), None)


def value_at(metrics: Sequence[dict[str, Any]], key: str, step: int | None) -> float | None:
    if step is None:
        return None
    return next((float(m[key]) for m in metrics if m["step"] == step and key in m), None)


def explain_grokking(metrics: Sequence[dict[str, Any]], findings: Findings) -> None:
    """When the model memorised, when it generalised, and what the restricted and excluded losses did."""
    evaluated = [m for m in metrics if "test_accuracy" in m]
    if not evaluated:
        findings.add("train_acc_100_step", None, "no evaluation records: grokking curves unavailable")
        return
    memorised = first_step(evaluated, "train_accuracy", 1.0)
    grokked = first_step(evaluated, "test_accuracy", 0.99)
    gap = grokked - memorised if memorised is not None and grokked is not None else None
    findings.add("train_acc_100_step", memorised)
    findings.add("test_acc_99_step", grokked)
    findings.add(
        "grokking_gap",
        gap,
        f"train accuracy first 100% at step {memorised}; test accuracy first >= 99% at step {grokked}"
        + (f": generalisation came {gap} steps after memorisation" if gap is not None else ""),
    )
    moments = {"memorised": memorised, "grokked": grokked, "final": evaluated[-1]["step"]}
    for key, meaning in (
        ("restricted_loss", "key frequencies only, all pairs"),
        ("excluded_loss", "key frequencies removed, training pairs"),
    ):
        values = {name: value_at(evaluated, key, step) for name, step in moments.items()}
        shown = ", ".join(f"{v:.3g} when {name}" for name, v in values.items() if v is not None)
        peak = max(m[key] for m in evaluated)
        findings.add(key, values, f"{key.replace('_', ' ')} ({meaning}): {shown}; at most {peak:.3g}")
    findings.add("excluded_loss_peak", max(m["excluded_loss"] for m in evaluated))
    circuit = next((m for m in evaluated if m["restricted_loss"] < 0.1), None)
    findings.add(
        "restricted_loss_01_step",
        None if circuit is None else int(circuit["step"]),
        None
        if circuit is None
        else f"the key frequencies alone reached loss < 0.1 at step {circuit['step']}, while test accuracy was "
        f"{circuit['test_accuracy']:.0%}: the circuit forms before the test loss falls",
    )


# ----------------------------------------------------------------- pictures
def figure(findings: Findings) -> go.Figure:
    """The embedding's squared norm by Fourier frequency: a few key frequencies, almost nothing elsewhere."""
    spectrum = findings["embedding_spectrum"]
    keys = set(findings["key_frequencies"])
    frequencies = list(range(len(spectrum)))
    fig = go.Figure(
        go.Bar(
            x=frequencies,
            y=spectrum,
            marker_color=["crimson" if k in keys else "steelblue" for k in frequencies],
            hovertemplate="frequency %{x}<br>%{y:.1%} of the norm<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"Embedding of modular addition in the Fourier basis: key frequencies {sorted(keys)} in red "
        f"carry {findings['key_frequency_norm_fraction']:.0%}",
        xaxis_title="frequency k (0 = constant; k pairs cos and sin of 2πkx/p)",
        yaxis_title="fraction of the embedding's squared norm",
        yaxis_tickformat=".0%",
        bargap=0.1,
    )
    return fig


def grokking_figure(metrics: Sequence[dict[str, Any]]) -> go.Figure:
    """Train, test, restricted and excluded loss over training (log scale): memorise, form the circuit, clean up."""
    evaluated = [m for m in metrics if "test_loss" in m]
    steps = [m["step"] for m in evaluated]
    fig = go.Figure()
    for key, label, dash in (
        ("train_loss", "train loss", "solid"),
        ("test_loss", "test loss", "solid"),
        ("restricted_loss", "restricted loss (key frequencies only)", "dot"),
        ("excluded_loss", "excluded loss (key frequencies removed, train)", "dash"),
    ):
        values = [max(m[key], 1e-12) for m in evaluated]
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines", name=label, line_dash=dash))
    for key, threshold, label in (("train_accuracy", 1.0, "train acc 100%"), ("test_accuracy", 0.99, "test acc 99%")):
        step = first_step(evaluated, key, threshold)
        if step is not None:
            fig.add_vline(x=step, line_dash="dot", line_color="gray", annotation_text=label)
    fig.update_layout(
        title="Grokking modular addition: train loss falls first, test loss thousands of steps later",
        xaxis_title="training step",
        yaxis_title="cross-entropy loss",
        yaxis_type="log",
        yaxis_exponentformat="power",
    )
    return fig
