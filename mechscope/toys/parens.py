"""Balanced parentheses: a small transformer says whether a bracket string is balanced.

A string of ``(`` and ``)`` is balanced when its depth (the running count of opens minus
closes) never goes below zero and ends at zero. The generator knows each string's whole
depth profile, where it first fails and how it ends, and it deliberately makes the hard
cases: half the strings are random balanced (Dyck) words, the other half are Dyck words
with one edit, so they fail narrowly, either by going negative somewhere or by ending above
zero. Whether a string is balanced is decided at its end, so a causal model reads it at the
last position.

Strings are left-padded to one length and the padding masked: :class:`mechscope.Model`
counts positions over real tokens, so every string is computed exactly as if it were alone,
its last token is always the last position, and the model never has to learn what padding is.
The class is read from the logits of two label tokens, ``unbalanced`` and ``balanced``.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from plotly.subplots import make_subplots
from torch import Tensor, nn

from mechscope.loading.pretrained import Model
from mechscope.model.config import ModelConfig
from mechscope.toys.organism import Findings, Organism
from mechscope.toys.training import TrainConfig

PAD, BOS, OPEN, CLOSE, UNBALANCED, BALANCED = range(6)
VOCAB = ("<pad>", "<bos>", "(", ")", "<unbalanced>", "<balanced>")
CHAR_IDS = {"(": OPEN, ")": CLOSE}
LABELS = [UNBALANCED, BALANCED]  # class 0: unbalanced, class 1: balanced
Kind = Literal["balanced", "goes_negative", "ends_nonzero"]
KINDS: tuple[Kind, ...] = ("balanced", "goes_negative", "ends_nonzero")
HELD_OUT_SHARE = 10  # one string in ten (by a hash of the string) is never trained on
EVAL_SIZE = 2000
EVAL_SEED = 1234


# ------------------------------------------------------------------ ground truth
@dataclass(frozen=True)
class Brackets:
    """A bracket string with everything its generator knows about it."""

    text: str
    depth: tuple[int, ...]  # the depth after each character
    first_failure: int | None  # the first index where the depth is negative
    final_depth: int

    @classmethod
    def of(cls, text: str) -> Brackets:
        if set(text) - set(CHAR_IDS):
            raise ValueError(f"a bracket string holds only '(' and ')', got {text!r}")
        depth = tuple(accumulate(1 if c == "(" else -1 for c in text))
        first_failure = next((i for i, d in enumerate(depth) if d < 0), None)
        return cls(text, depth, first_failure, depth[-1] if depth else 0)

    @property
    def balanced(self) -> bool:
        return self.first_failure is None and self.final_depth == 0

    @property
    def kind(self) -> Kind:
        if self.first_failure is not None:
            return "goes_negative"
        return "balanced" if self.final_depth == 0 else "ends_nonzero"


def held_out(text: str) -> bool:
    """Whether ``text`` belongs to the evaluation strings (a fixed hash split, the same every run)."""
    return zlib.crc32(text.encode()) % HELD_OUT_SHARE == 0


# ------------------------------------------------------------------ the generator
def random_dyck(n_pairs: int, rng: np.random.Generator) -> str:
    """A uniformly random balanced string of ``n_pairs`` pairs, by the cycle lemma.

    Of the rotations of a sequence of ``n`` opens and ``n + 1`` closes, exactly one stays at
    depth ≥ 0 until its final close: the one starting just after the first lowest point."""
    steps = rng.permutation(np.array([1] * n_pairs + [-1] * (n_pairs + 1)))
    start = int(np.argmin(np.cumsum(steps))) + 1
    rotated = np.roll(steps, -start)[:-1]
    return "".join("(" if s == 1 else ")" for s in rotated)


def near_miss(word: str, rng: np.random.Generator) -> str:
    """An unbalanced string one edit away from the balanced ``word``.

    Half go negative (the same characters shuffled; an open deleted), half never go negative
    but end above zero (a close deleted; a close turned into an open)."""
    edit = int(rng.integers(4))
    if edit == 0:
        while True:
            shuffled = "".join(rng.permutation(list(word)))
            if not Brackets.of(shuffled).balanced:
                return shuffled
    target = "(" if edit == 1 else ")"
    positions = [i for i, c in enumerate(word) if c == target]
    i = int(rng.choice(positions))
    replacement = "(" if edit == 3 else ""
    return word[:i] + replacement + word[i + 1 :]


def sample_text(max_length: int, rng: np.random.Generator) -> str:
    """A balanced string half the time, a near miss the other half; at most ``max_length`` long."""
    word = random_dyck(int(rng.integers(1, max_length // 2 + 1)), rng)
    return word if rng.random() < 0.5 else near_miss(word, rng)


def sample_strings(n: int, max_length: int, rng: np.random.Generator, evaluation: bool = False) -> list[Brackets]:
    """``n`` strings from the training side of the hash split, or from the held-out side."""
    out: list[Brackets] = []
    while len(out) < n:
        text = sample_text(max_length, rng)
        if held_out(text) == evaluation:
            out.append(Brackets.of(text))
    return out


@functools.lru_cache(maxsize=4)
def eval_strings(max_length: int) -> tuple[Brackets, ...]:
    """The fixed held-out strings (cached: rejection sampling keeps one string in ten)."""
    return tuple(sample_strings(EVAL_SIZE, max_length, np.random.default_rng(EVAL_SEED), evaluation=True))


# ------------------------------------------------------------------ tokens
class Batch(NamedTuple):
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    labels: Int[Tensor, " batch"]  # 1: balanced
    strings: Sequence[Brackets]


def encode(texts: Sequence[str], max_length: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """``<bos>`` and the characters, left-padded to ``max_length + 1`` tokens, and the padding mask."""
    tokens = torch.full((len(texts), max_length + 1), PAD, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, text in enumerate(texts):
        if len(text) > max_length:
            raise ValueError(f"bracket string of length {len(text)} is longer than max_length={max_length}")
        ids = [BOS, *(CHAR_IDS[c] for c in text)]
        tokens[row, -len(ids) :] = torch.tensor(ids)
        mask[row, -len(ids) :] = 1
    return tokens, mask


def make_batch(strings: Sequence[Brackets], max_length: int) -> Batch:
    tokens, mask = encode([s.text for s in strings], max_length)
    labels = torch.tensor([int(s.balanced) for s in strings])
    return Batch(tokens, mask, labels, strings)


def class_logits(model: nn.Module, batch: Batch) -> Float[Tensor, "batch 2"]:
    """The ``unbalanced`` and ``balanced`` logits at each string's last token."""
    logits = model(batch.tokens, attention_mask=batch.attention_mask)
    return logits[:, -1, LABELS]


# ------------------------------------------------------------------ the organism
@dataclass
class Parentheses(Organism):
    """Classify bracket strings as balanced or not, with each string's depth profile known."""

    name: ClassVar[str] = "parentheses"
    summary: ClassVar[str] = "a 2-layer transformer tells balanced bracket strings from near misses"

    max_length: int = 20
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    batch_size: int = 128

    def __post_init__(self) -> None:
        for name in ("max_length", "n_layers", "d_model", "n_heads", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Parentheses.{name} must be a positive integer, got {value!r}")
        if self.max_length < 2:
            raise ValueError(f"Parentheses.max_length must be at least 2 (one pair), got {self.max_length}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=600,
            lr=1e-3,
            weight_decay=0.01,
            warmup_steps=50,
            schedule="cosine",
            final_lr_fraction=0.1,
            log_every=10,
            eval_every=50,
            checkpoint_every=200,
        )

    def build_model(self) -> Model:
        cfg = ModelConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_vocab=len(VOCAB),
            n_ctx=self.max_length + 1,
            act_fn="gelu",
        )
        return Model(cfg)

    def batch(self, step: int, generator: torch.Generator) -> Batch:
        rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))
        return make_batch(sample_strings(self.batch_size, self.max_length, rng), self.max_length)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = class_logits(model, batch)
        accuracy = (logits.argmax(-1) == batch.labels).float().mean()
        return F.cross_entropy(logits, batch.labels), {"train_accuracy": accuracy}

    def eval_batch(self) -> Batch:
        """The held-out strings: the same every call, none of them ever in a training batch."""
        return make_batch(eval_strings(self.max_length), self.max_length)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        batch = self.eval_batch()
        logits = class_logits(model, batch)
        correct = logits.argmax(-1) == batch.labels
        out = {"eval_loss": F.cross_entropy(logits, batch.labels).item(), "accuracy": correct.float().mean().item()}
        for kind, value in accuracy_by(correct, [s.kind for s in batch.strings]).items():
            out[f"accuracy_{kind}"] = value
        return out

    def explain(self, model: nn.Module, metrics: Sequence[dict[str, Any]] = ()) -> Findings:
        """Held-out accuracy, split by how a string fails and by its length, and where in the
        model the depth the task depends on becomes linearly readable."""
        batch = self.eval_batch()
        with torch.no_grad():
            correct = class_logits(model, batch).argmax(-1) == batch.labels
        findings = Findings(self.name)
        accuracy = correct.float().mean().item()
        findings.add("n_eval", len(batch.strings))
        findings.add("accuracy", accuracy, f"held-out accuracy {accuracy:.1%} on {len(batch.strings)} strings")
        by_kind = accuracy_by(correct, [s.kind for s in batch.strings])
        findings.add(
            "accuracy_by_kind",
            by_kind,
            "by kind: " + ", ".join(f"{kind} {value:.1%}" for kind, value in by_kind.items()),
        )
        by_length = accuracy_by(correct, [len(s.text) for s in batch.strings])
        worst = min(by_length, key=by_length.__getitem__)
        findings.add(
            "accuracy_by_length",
            {str(length): value for length, value in by_length.items()},
            f"by length ({min(by_length)} to {max(by_length)}): lowest {by_length[worst]:.1%} (length {worst})",
        )
        self.add_depth_readouts(findings, model, batch)
        reached = next((m["step"] for m in metrics if m.get("accuracy", 0.0) >= 0.95), None)
        if reached is not None:
            findings.add("step_95", reached, f"held-out accuracy first reached 95% at step {reached}")
        return findings

    def figures(self, model: nn.Module, metrics: Sequence[dict[str, Any]], findings: Findings) -> dict[str, Any]:
        return {"parentheses_accuracy": figure(findings)}

    def add_depth_readouts(self, findings: Findings, model: nn.Module, batch: Batch) -> None:
        """Whether depth is linearly readable: the running depth at every token after each layer
        (the embeddings, which see one token, are the control), and the final depth at the last
        token of the final residual. Readouts are fitted on half the strings, scored on the rest."""
        depth = depth_profiles(batch)
        real = batch.attention_mask.bool()
        fit = (torch.arange(len(depth)) < len(depth) // 2)[:, None].expand_as(real)
        streams = [residual(model, batch, layer) for layer in range(self.n_layers + 1)]
        by_layer = [round(readout_r2(stream[real], depth[real], fit[real]), 4) for stream in streams]
        findings.add(
            "depth_r2_by_layer",
            by_layer,
            "running depth read linearly from every token's residual, R² after 0 (the embeddings), 1, ... layers: "
            + ", ".join(f"{r2:.3f}" for r2 in by_layer),
        )
        final = round(readout_r2(streams[-1][:, -1], depth[:, -1], fit[:, -1]), 4)
        findings.add(
            "final_depth_r2", final, f"final depth read linearly from the last token's residual, R² {final:.3f}"
        )


def accuracy_by(correct: Tensor, groups: Sequence[Any]) -> dict[Any, float]:
    """Accuracy within each group, in order of first appearance (KINDS first, for kinds)."""
    order = [k for k in KINDS if k in groups] + sorted({g for g in groups if g not in KINDS})
    flags = correct.tolist()
    return {g: float(np.mean([f for f, h in zip(flags, groups) if h == g])) for g in order}


def residual(model: nn.Module, batch: Batch, layer: int) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream after ``layer`` blocks (the final one enters the unembedding)."""
    with torch.no_grad():
        return model(batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=layer)


def depth_profiles(batch: Batch) -> Float[Tensor, "batch pos"]:
    """Each token's depth after it, aligned with the left-padded tokens (0 at ``<bos>`` and padding)."""
    depth = torch.zeros(batch.tokens.shape)
    for row, s in enumerate(batch.strings):
        if s.text:
            depth[row, -len(s.text) :] = torch.tensor(s.depth, dtype=torch.float32)
    return depth


def readout_r2(x: Float[Tensor, "sample d_model"], y: Float[Tensor, " sample"], fit: Bool[Tensor, " sample"]) -> float:
    """Held-out R² of a least-squares linear map (with a bias) from ``x`` to ``y``, fitted on the
    samples where ``fit`` is true and scored on the others."""
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], -1).double()
    y = y.double()
    weights = torch.linalg.lstsq(x[fit], y[fit, None]).solution
    error = y[~fit] - (x[~fit] @ weights).squeeze(-1)
    return float(1 - error.pow(2).sum() / (y[~fit] - y[~fit].mean()).pow(2).sum())


def figure(findings: Findings) -> go.Figure:
    """Held-out accuracy by string length, and how linearly readable the running depth is after each layer."""
    by_length = findings["accuracy_by_length"]
    by_layer = findings["depth_r2_by_layer"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Accuracy by length", "Running depth, linear readout"))
    fig.add_trace(go.Bar(x=[int(k) for k in by_length], y=list(by_length.values()), name="accuracy"), row=1, col=1)
    fig.add_trace(go.Bar(x=list(range(len(by_layer))), y=by_layer, name="R² of depth"), row=1, col=2)
    fig.update_xaxes(title_text="string length", row=1, col=1)
    fig.update_xaxes(title_text="layers applied (0: embeddings)", dtick=1, row=1, col=2)
    fig.update_yaxes(title_text="held-out accuracy", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="held-out R²", range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=f"Balanced parentheses: held-out accuracy {findings['accuracy']:.1%}", showlegend=False)
    return fig
