"""Attention patterns: every head at once, and one head as a query × key heatmap.

:func:`attention_patterns` draws a grid of heads (one row per layer) beside the prompt's
tokens. Hovering a token shows, for the selected head, which earlier tokens it attends to and
which later tokens attend to it; clicking a head selects it.

    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("pattern"))
    pattern = torch.stack([cache["pattern", layer][0] for layer in range(model.cfg.n_layers)])
    attention_patterns(model.to_str_tokens(tokens), pattern)

Patterns are the bulk of a report, so a causal pattern sends only its lower triangle and every
weight is rounded to 4 decimal places; :func:`attention_token_budget` says how long a prompt
fits under :data:`MAX_PATTERN_VALUES`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any, SupportsIndex

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.viz.heatmaps import heatmap
from mechscope.viz.html import VizError, Widget, as_tensor, check_size, finite, strings

MAX_PATTERN_VALUES = 4_000_000  # values sent (a causal pattern's lower triangle): about 30 MB of JSON
DECIMALS = 4  # weights lie in [0, 1]: 1e-4 is finer than any colour on the page shows


def attention_patterns(
    tokens: Sequence[str],
    pattern: Float[Tensor, "layer head query key"] | Float[Tensor, "head query key"],
    *,
    layers: Iterable[SupportsIndex] | None = None,
    title: str = "Attention patterns",
    first_position: int = 0,
) -> Widget:
    """Every head's pattern over ``tokens``; ``layers`` names the layers of ``pattern``'s first axis
    (default 0, 1, ...; a ``[head, query, key]`` pattern is one layer, by default layer 0), as any
    integers: Python, numpy or torch.

    ``data["patterns"][layer][head][query]`` lists that query's weights over keys, rounded to 4
    decimal places (None where not finite). If the pattern is causal (every weight above the
    diagonal exactly 0), ``data["triangular"]`` is True and row ``query`` holds keys ``0..query``
    only; otherwise it is False and every row holds all keys. ``first_position`` is the prompt
    position of ``tokens[0]`` when they are a prompt's last tokens, so tooltips number tokens as
    the rest of a page does."""
    tokens = strings(tokens, "tokens")
    if operator.index(first_position) < 0:
        raise VizError(f"first_position must be a position (>= 0), got {first_position}")
    values = as_tensor(pattern, "pattern")
    if values.ndim == 3:
        values = values[None]
    if values.ndim != 4:
        raise VizError(f"pattern must be [layer, head, query, key] or [head, query, key], got {list(values.shape)}")
    n_layers, n_heads, n_query, n_key = values.shape
    if not n_query == n_key == len(tokens):
        raise VizError(
            f"pattern's query and key axes must both match the {len(tokens)} tokens, "
            f"got [query, key] = [{n_query}, {n_key}]"
        )
    if n_layers == 0 or n_heads == 0 or not tokens:
        raise VizError(f"pattern must have at least one layer, head and token, got {list(values.shape)}")
    triangular = is_causal(values)
    sent = values_sent(n_layers, n_heads, len(tokens), triangular=triangular)
    check_size(sent, MAX_PATTERN_VALUES, "pattern", "slice some layers or heads, or shorten the prompt")
    return Widget(
        "attention",
        {
            "title": title,
            "tokens": tokens,
            "layers": layer_labels(layers, n_layers),
            "heads": n_heads,
            "triangular": triangular,
            "first_position": operator.index(first_position),
            "patterns": weights(values, triangular=triangular),
        },
    )


def is_causal(values: Float[Tensor, "layer head query key"]) -> bool:
    """No query attends to a later key: every weight above the diagonal is exactly 0 (NaN is not)."""
    return not values.triu(1).any().item()


def values_sent(n_layers: int, n_heads: int, n_tokens: int, *, triangular: bool) -> int:
    per_head = n_tokens * (n_tokens + 1) // 2 if triangular else n_tokens * n_tokens
    return n_layers * n_heads * per_head


def weights(values: Float[Tensor, "layer head query key"], *, triangular: bool) -> list[Any]:
    """Nested lists of weights rounded to :data:`DECIMALS` places; only keys up to the query if ``triangular``."""
    rows = values.double().round(decimals=DECIMALS)
    nested = rows.tolist() if rows.isfinite().all() else finite(rows.tolist())
    if not triangular:
        return nested
    return [[[row[: query + 1] for query, row in enumerate(head)] for head in layer] for layer in nested]


def unpack_patterns(data: dict[str, Any]) -> Float[Tensor, "layer head query key"]:
    """The full pattern an attention widget's data describes (NaN where None): what the page draws."""
    n = len(data["tokens"])
    rows = [row + [0.0] * (n - len(row)) for layer in data["patterns"] for head in layer for row in head]
    pattern = torch.tensor([[math.nan if w is None else w for w in row] for row in rows], dtype=torch.float64)
    return pattern.reshape(len(data["patterns"]), data["heads"], n, n)


def attention_token_budget(n_layers: int, n_heads: int, *, causal: bool = True) -> int:
    """The longest sequence whose pattern over ``n_layers`` x ``n_heads`` heads fits
    :data:`MAX_PATTERN_VALUES` (counting a causal pattern's lower triangle only): slice prompts to it."""
    layers, heads = index(n_layers, "n_layers"), index(n_heads, "n_heads")
    if layers < 1 or heads < 1:
        raise VizError(f"n_layers and n_heads must be positive integers, got {n_layers!r} and {n_heads!r}")
    per_head = MAX_PATTERN_VALUES // (layers * heads)
    if causal:  # the largest n with n (n + 1) / 2 <= per_head
        return (math.isqrt(8 * per_head + 1) - 1) // 2
    return math.isqrt(per_head)


def index(value: Any, name: str) -> int:
    """An integer from any integer type (int, numpy, a one-element torch tensor), never a bool."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise VizError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise VizError(f"{name} must be an integer, got {value!r}") from None


def layer_labels(layers: Iterable[SupportsIndex] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    wrong = VizError(
        f"layers names the {n_layers} layer(s) on pattern's first axis, so it must be {n_layers} integer(s); "
        f"got {layers!r} (to show fewer layers, slice pattern, e.g. pattern[[0, 2]])"
    )
    try:
        labels = [index(layer, "layers") for layer in layers]
    except (TypeError, VizError):
        raise wrong from None
    if len(labels) != n_layers:
        raise wrong
    return labels


def attention_heatmap(
    tokens: Sequence[str], pattern: Float[Tensor, "query key"], *, title: str = "Attention"
) -> Widget:
    """One head's pattern as a query × key heatmap (rows: queries, columns: keys)."""
    tokens = strings(tokens, "tokens")
    values = as_tensor(pattern, "pattern")
    if values.ndim != 2 or not values.shape[0] == values.shape[1] == len(tokens):
        n = len(tokens)
        raise VizError(f"pattern must be [query, key] = [{n}, {n}] for {n} tokens, got {list(values.shape)}")
    return heatmap(
        values,
        rows=tokens,
        cols=tokens,
        title=title,
        x_label="key",
        y_label="query",
        value_label="attention",
        scale="sequential",
        zmin=0.0,
        zmax=1.0,
    )
