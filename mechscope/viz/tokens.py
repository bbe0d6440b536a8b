"""Text coloured by one number per token: a neuron's activation, an SAE feature, a loss.

colored_tokens(model.to_str_tokens(prompt), cache["post", 0][0, :, 42], label="neuron 0.42")
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor

from mechscope.viz.colours import Scale, value_range
from mechscope.viz.html import VizError, Widget, as_tensor, check_size, numbers, strings

MAX_TOKENS = 20_000


def colored_tokens(
    tokens: Sequence[str],
    values: Float[Tensor, " pos"] | Sequence[float],
    *,
    label: str = "value",
    title: str | None = None,
    scale: Scale | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
) -> Widget:
    """``tokens`` as text, each one's background coloured by its value, the value shown on hover.
    ``scale=None``: diverging (blue-white-red around 0) if values have both signs, else sequential."""
    tokens = strings(tokens, "tokens")
    series = as_tensor(values, "values")
    if series.ndim != 1 or series.shape[0] != len(tokens):
        raise VizError(f"values must be [pos] = [{len(tokens)}] (one per token), got shape {list(series.shape)}")
    check_size(len(tokens), MAX_TOKENS, "tokens", "show a slice of the text")
    scale, zmin, zmax = value_range(series, scale=scale, zmin=zmin, zmax=zmax)
    return Widget(
        "tokens",
        {
            "title": title,
            "tokens": tokens,
            "values": numbers(series),
            "label": label,
            "scale": scale,
            "zmin": zmin,
            "zmax": zmax,
        },
    )
