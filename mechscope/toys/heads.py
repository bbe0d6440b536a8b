"""Scoring attention heads on repeated random tokens: the ground-truth check for induction.

On ``[bos, x_1 .. x_L, x_1 .. x_L]`` with random ``x``, a previous-token head puts its weight
one position back, and an induction head, at the second copy of ``x_i``, looks at ``x_{i+1}``
in the first copy: the token that followed last time. Both are stripes in the attention
pattern, so each score is the mean attention on its stripe (1 is a perfect head, about
1/position a uniform one).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.toys.organism import Findings


def repeated_tokens(
    d_vocab: int, length: int, batch: int, generator: torch.Generator, bos: int | None = None
) -> Int[Tensor, "batch seq"]:
    """``batch`` rows of ``length`` random tokens repeated twice, after ``bos`` if given.

    Tokens are drawn from ids other than ``bos``, so the prefix is never confused with content.
    """
    if length < 2:
        raise ValueError(f"repeated random tokens need a run of at least 2 tokens, got length={length}")
    choices = torch.tensor([t for t in range(d_vocab) if t != bos])
    half = choices[torch.randint(len(choices), (batch, length), generator=generator)]
    rows = [half, half]
    if bos is not None:
        rows.insert(0, torch.full((batch, 1), bos, dtype=half.dtype))
    return torch.cat(rows, dim=1)


def stripe(
    pattern: Float[Tensor, "batch head query key"], queries: Int[Tensor, " n"], offset: int
) -> Float[Tensor, " head"]:
    """Mean attention from each query position ``q`` to key ``q - offset``, per head."""
    return pattern[:, :, queries, queries - offset].mean(dim=(0, 2))


def attention_scores(
    model: torch.nn.Module, tokens: Int[Tensor, "batch seq"]
) -> dict[str, Float[Tensor, "layer head"]]:
    """Previous-token, duplicate-token and induction scores of every head on ``tokens``.

    ``tokens`` is a repeated-random-token batch (see :func:`repeated_tokens`): a run of ``L``
    tokens twice, optionally after one BOS token. Scores are averaged over the second copy.
    """
    length = tokens.shape[1] // 2
    start = tokens.shape[1] - length  # first position of the second copy
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns = [cache["pattern", layer] for layer in range(model.cfg.n_layers)]
    second = torch.arange(start, tokens.shape[1])
    everywhere = torch.arange(1, tokens.shape[1])
    return {
        "previous_token": torch.stack([stripe(p, everywhere, 1) for p in patterns]),
        "duplicate_token": torch.stack([stripe(p, second, length) for p in patterns]),
        "induction": torch.stack([stripe(p, second, length - 1) for p in patterns]),
    }


def best_head(scores: Float[Tensor, "layer head"], layer: int | None = None) -> tuple[int, int, float]:
    """(layer, head, score) of the highest score, optionally within one layer."""
    if layer is not None:
        head = int(scores[layer].argmax())
        return layer, head, float(scores[layer, head])
    flat = int(scores.argmax())
    layer, head = divmod(flat, scores.shape[1])
    return layer, head, float(scores[layer, head])


def add_head_findings(
    findings: Findings, scores: dict[str, Float[Tensor, "layer head"]], previous_token_layer: int | None = None
) -> None:
    """Record the best previous-token head (optionally within one layer), the best induction
    head, and every head's scores (``head_scores``) in ``findings``."""
    layer, head, score = best_head(scores["previous_token"], layer=previous_token_layer)
    findings.add("previous_token_head", [layer, head])
    findings.add("previous_token_score", score, f"previous-token head: {layer}.{head} (score {score:.2f})")
    layer, head, score = best_head(scores["induction"])
    findings.add("induction_head", [layer, head])
    findings.add("induction_score", score, f"induction head: {layer}.{head} (score {score:.2f})")
    findings.add("head_scores", {k: v.tolist() for k, v in scores.items()})
