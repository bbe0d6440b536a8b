"""Colour scales shared by the widgets and the plotly figures.

Two scales, chosen by what the numbers mean: *sequential* (white to blue) for quantities with a
natural zero at one end, such as probabilities and attention; *diverging* (blue, white, red) for
signed effects, such as a patching metric or a direct logit attribution, with white at 0 so that
the sign is the first thing one sees. The range of a diverging scale is symmetric by default, so
equal colours mean equal magnitudes on both sides.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

from mechscope.viz.html import VizError, rounded

Scale = Literal["diverging", "sequential"]
SCALES = ("diverging", "sequential")
# The same colours as mechscope.css / mechscope.js, for plotly figures.
PLOTLY_SCALES = {
    "sequential": [[0.0, "#ffffff"], [1.0, "#2166ac"]],
    "diverging": [[0.0, "#2166ac"], [0.5, "#ffffff"], [1.0, "#b2182b"]],
}


def value_range(
    values: Tensor, *, scale: Scale | None = None, zmin: float | None = None, zmax: float | None = None
) -> tuple[Scale, float, float]:
    """The scale and the colour range for ``values``: the caller's where given, else from the data.

    ``scale=None`` picks diverging when the finite values have both signs. A diverging range
    missing an end mirrors the other around 0.
    """
    if scale is not None and scale not in SCALES:
        raise VizError(f"scale must be one of {', '.join(SCALES)} or None; got {scale!r}")
    for name, bound in (("zmin", zmin), ("zmax", zmax)):
        if bound is not None and (isinstance(bound, bool) or not math.isfinite(bound)):
            raise VizError(f"{name} must be a finite number or None; got {bound!r}")
    seen = values[values.isfinite()]
    low, high = (seen.min().item(), seen.max().item()) if seen.numel() else (0.0, 0.0)
    if scale is None:
        scale = "diverging" if low < 0 < high else "sequential"
    if scale == "diverging":
        zmin, zmax = diverging_range(low, high, zmin, zmax)
    else:
        zmin = min(low, 0.0) if zmin is None else float(zmin)
        zmax = max(high, 0.0) if zmax is None else float(zmax)
    if zmin == zmax:  # constant data: any range that contains it
        zmax = zmin + 1.0
    if zmin > zmax:
        raise VizError(f"zmin must be below zmax; got zmin={zmin}, zmax={zmax}")
    return scale, rounded(zmin), rounded(zmax)


def diverging_range(low: float, high: float, zmin: float | None, zmax: float | None) -> tuple[float, float]:
    """A range with 0 in the middle unless the caller says otherwise."""
    if zmin is None and zmax is None:
        extent = max(abs(low), abs(high)) or 1.0
        return -extent, extent
    if zmin is None:
        return -abs(float(zmax)), float(zmax)
    if zmax is None:
        return float(zmin), abs(float(zmin))
    return float(zmin), float(zmax)
