"""Direct logit attribution as bars, and top-k predictions as a table.

attribution_bars(direct_logit_attribution(model, tokens, answer, wrong))
top_k_table(tokens, [[model.to_string([t]) for t in row] for row in ids], probs)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.analysis.attribution import Attribution
from mechscope.viz.html import (
    VizError,
    Widget,
    as_tensor,
    check_shape,
    check_size,
    numbers,
    rounded,
    string_rows,
    strings,
)

MAX_BARS = 2_000
CONSTANT = "constant (norm and unembedding bias)"
MAX_TABLE_CELLS = 50_000


def attribution_bars(
    attribution: Attribution | tuple[Sequence[str], Sequence[float]],
    *,
    batch: int | None = None,
    top: int | None = None,
    title: str = "Direct logit attribution",
    value_label: str = "logit difference",
) -> Widget:
    """One bar per component, positive and negative in two colours. ``batch=None`` averages the
    examples; ``top`` keeps the components largest in absolute value, largest first, and one bar
    ``other (N components)`` for the rest. An Attribution's non-zero constant (what no component
    writes) gets a bar of its own, so the bars always add up to the total shown."""
    labels, values, constant, total = bar_values(attribution, batch)
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise VizError(f"top must be a positive integer or None, got {top!r}")
        labels, values = largest(labels, values, top)
    if constant != 0:
        labels, values = [*labels, CONSTANT], torch.cat([values, torch.tensor([constant])])
    check_size(len(labels), MAX_BARS, "attribution", "pass top=50 to keep the largest components")
    data = {"title": title, "labels": labels, "values": numbers(values), "value_label": value_label, "total": total}
    return Widget("bars", data)


def largest(labels: list[str], values: Tensor, top: int) -> tuple[list[str], Tensor]:
    """The ``top`` values largest in absolute value, largest first, then one for the sum of the rest."""
    order = values.abs().argsort(descending=True, stable=True).tolist()
    kept, dropped = order[:top], order[top:]
    if not dropped:
        return [labels[i] for i in kept], values[kept]
    other = f"other ({len(dropped)} component{'s' if len(dropped) > 1 else ''})"
    return [*(labels[i] for i in kept), other], torch.cat([values[kept], values[dropped].sum()[None]])


def bar_values(
    attribution: Attribution | tuple[Sequence[str], Sequence[float]], batch: int | None
) -> tuple[list[str], Tensor, float, float | None]:
    """Labels, one value per label, the constant (0 when there is none) and the total (None when not known)."""
    if isinstance(attribution, Attribution):
        per_example = attribution.values.detach().float().cpu()  # [component, batch]
        constants = attribution.constant.detach().float().cpu()
        totals = attribution.total.detach().float().cpu()
        if batch is None:
            values, constant, total = per_example.mean(-1), constants.mean(), totals.mean()
        else:
            n_batch = per_example.shape[1]
            if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < n_batch:
                raise VizError(f"batch must be an integer in [0, {n_batch - 1}] or None, got {batch!r}")
            values, constant, total = per_example[:, batch], constants[batch], totals[batch]
        return list(attribution.labels), values, constant.item(), rounded(total.item())
    if not isinstance(attribution, tuple) or len(attribution) != 2:
        raise VizError("attribution must be an Attribution or a (labels, values) pair")
    labels, values = strings(attribution[0], "labels"), as_tensor(attribution[1], "values")
    check_shape(values, "values", [len(labels)], "label")
    return labels, values, 0.0, None


def top_k_table(
    tokens: Sequence[str],
    top_tokens: Sequence[Sequence[str]],
    top_probs: Float[Tensor, "pos k"],
    *,
    title: str = "Top predictions",
) -> Widget:
    """For each position: the input token and the k most likely next tokens with their probabilities."""
    tokens = strings(tokens, "tokens")
    probs = as_tensor(top_probs, "top_probs")
    if probs.ndim != 2 or probs.shape[0] != len(tokens):
        raise VizError(f"top_probs must be [pos, k] with pos = {len(tokens)} tokens, got {list(probs.shape)}")
    predicted = string_rows(top_tokens, "top_tokens")
    k = probs.shape[1]
    if len(predicted) != len(tokens) or any(len(row) != k for row in predicted):
        raise VizError(f"top_tokens must be [pos][k] = [{len(tokens)}][{k}] strings, matching top_probs")
    check_size(probs.numel(), MAX_TABLE_CELLS, "top_probs", "show fewer positions or a smaller k")
    values = numbers(probs)
    rows = [
        [p, token, *({"text": text, "value": value} for text, value in zip(predicted[p], values[p]))]
        for p, token in enumerate(tokens)
    ]
    return Widget("table", {"title": title, "columns": ["#", "token", *map(ordinal, range(1, k + 1))], "rows": rows})


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
