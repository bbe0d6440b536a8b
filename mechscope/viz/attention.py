"""Attention patterns: every head at once, and one head as a query × key heatmap.

:func:`attention_patterns` draws a grid of heads (one row per layer) beside the prompt's
tokens. Hovering a token shows, for the selected head, which earlier tokens it attends to and
which later tokens attend to it; clicking a head selects it.

    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("pattern"))
    pattern = torch.stack([cache["pattern", layer][0] for layer in range(model.cfg.n_layers)])
    attention_patterns(model.to_str_tokens(tokens), pattern)
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor

from mechscope.viz.heatmaps import heatmap
from mechscope.viz.html import VizError, Widget, as_tensor, check_size, numbers, strings

MAX_PATTERN_VALUES = 4_000_000  # about 30 MB of JSON: a page still opens in a second or two


def attention_patterns(
    tokens: Sequence[str],
    pattern: Float[Tensor, "layer head query key"] | Float[Tensor, "head query key"],
    *,
    layers: Sequence[int] | None = None,
    title: str = "Attention patterns",
) -> Widget:
    """Every head's pattern over ``tokens``; ``layers`` names the layers of ``pattern``'s first axis
    (default 0, 1, ...; a ``[head, query, key]`` pattern is one layer, by default layer 0)."""
    tokens = strings(tokens, "tokens")
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
    check_size(values.numel(), MAX_PATTERN_VALUES, "pattern", "slice some layers or heads, or shorten the prompt")
    return Widget(
        "attention",
        {
            "title": title,
            "tokens": tokens,
            "layers": layer_labels(layers, n_layers),
            "heads": n_heads,
            "patterns": numbers(values),
        },
    )


def layer_labels(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    labels = list(layers)
    if len(labels) != n_layers or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in labels):
        raise VizError(
            f"layers names the {n_layers} layer(s) on pattern's first axis, so it must be {n_layers} integer(s); "
            f"got {labels!r} (to show fewer layers, slice pattern, e.g. pattern[[0, 2]])"
        )
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
