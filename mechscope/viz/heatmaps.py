"""Heatmaps: any [row, col] grid of numbers, the logit lens and patching results.

Rows are labelled on the left, columns (often token strings) on top; hovering a cell shows its
row, column and value, plus the cell's text and details where given. Each cell is a DOM element,
so a heatmap is refused beyond :data:`MAX_CELLS` cells: slice it first.

    heatmap(values, rows=["L0", "L1"], cols=tokens, title="Effect", x_label="position",
            y_label="layer", value_label="logit difference")
    patching_heatmap(resid_sweep, cols=tokens, metric="logit difference")
    logit_lens_heatmap(logit_lens(model, prompt), model.to_str_tokens(prompt), lambda t: model.to_string([t]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxtyping import Float
from torch import Tensor

from mechscope.analysis.lens import LensResult
from mechscope.viz.colours import Scale, value_range
from mechscope.viz.html import VizError, Widget, as_tensor, check_size, numbers, rounded, string_rows, strings

MAX_CELLS = 100_000


def heatmap(
    values: Float[Tensor, "row col"],
    *,
    rows: Sequence[str],
    cols: Sequence[str],
    text: Sequence[Sequence[str]] | None = None,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    value_label: str = "value",
    scale: Scale | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
    hover: Sequence[Sequence[str]] | None = None,
) -> Widget:
    """A labelled grid of coloured cells; ``text`` is written in each cell, ``hover`` is added to
    its tooltip (both ``[row][col]`` strings). ``scale=None``: diverging if values have both signs."""
    grid = as_tensor(values, "values")
    rows, cols = strings(rows, "rows"), strings(cols, "cols")
    if grid.ndim != 2:
        raise VizError(f"values must be [row, col], got shape {list(grid.shape)}")
    check_size(grid.numel(), MAX_CELLS, "values", "slice it (e.g. values[:, -50:]) or show fewer rows/columns")
    if list(grid.shape) != [len(rows), len(cols)]:
        raise VizError(
            f"values must be [row, col] = [{len(rows)}, {len(cols)}] to match rows and cols, got {list(grid.shape)}"
        )
    scale, zmin, zmax = value_range(grid, scale=scale, zmin=zmin, zmax=zmax)
    return Widget(
        "heatmap",
        {
            "title": title,
            "rows": rows,
            "cols": cols,
            "values": numbers(grid),
            "text": cell_strings(text, grid.shape, "text"),
            "hover": cell_strings(hover, grid.shape, "hover"),
            "x_label": x_label,
            "y_label": y_label,
            "value_label": value_label,
            "scale": scale,
            "zmin": zmin,
            "zmax": zmax,
        },
    )


def cell_strings(cells: Sequence[Sequence[str]] | None, shape: tuple[int, ...], name: str) -> list[list[str]] | None:
    """One string per cell, or None."""
    if cells is None:
        return None
    table = string_rows(cells, name)
    if len(table) != shape[0] or any(len(row) != shape[1] for row in table):
        found = [len(table), *sorted({len(row) for row in table})]
        raise VizError(f"{name} must be [row][col] = [{shape[0]}][{shape[1]}] strings, got lengths {found}")
    return table


def patching_heatmap(
    values: Float[Tensor, "layer pos"] | Float[Tensor, "layer head"],
    *,
    cols: Sequence[str],
    rows: Sequence[str] | None = None,
    title: str = "Activation patching",
    metric: str = "metric",
    x_label: str = "position",
    y_label: str = "layer",
    limit: float | None = None,
) -> Widget:
    """A patching or ablation sweep on a diverging scale symmetric around 0 (rows default L0, L1, ...).

    ``limit`` fixes the scale at ±limit (default: the largest magnitude), so that two maps meant to
    be compared, such as exact patching and its attribution estimate, share one colour scale."""
    grid = as_tensor(values, "values")
    if grid.ndim != 2:
        raise VizError(f"values must be [layer, pos] or [layer, head], got shape {list(grid.shape)}")
    if limit is not None and not limit > 0:
        raise VizError(f"limit must be a positive number, got {limit}")
    rows = [f"L{layer}" for layer in range(grid.shape[0])] if rows is None else rows
    bounds = {} if limit is None else {"zmin": -float(limit), "zmax": float(limit)}
    return heatmap(
        grid,
        rows=rows,
        cols=cols,
        title=title,
        x_label=x_label,
        y_label=y_label,
        value_label=metric,
        scale="diverging",
        **bounds,
    )


def logit_lens_heatmap(
    result: LensResult,
    tokens: Sequence[str],
    decode: Callable[[int], str],
    *,
    batch: int = 0,
    title: str = "Logit lens",
) -> Widget:
    """Each layer's top prediction at each position: colour is its probability, text the token;
    the tooltip lists the top k. ``tokens`` are the whole input's (the kept positions are shown);
    ``decode`` turns one token id into text, e.g. ``lambda t: model.to_string([t])``."""
    tokens = strings(tokens, "tokens")
    n_batch = result.top_probs.shape[1]
    if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < n_batch:
        raise VizError(f"batch must be an integer in [0, {n_batch - 1}], got {batch!r}")
    positions = result.positions.tolist()
    if positions and max(positions) >= len(tokens):
        raise VizError(
            f"tokens must be the whole input's tokens: the result reads position {max(positions)}, "
            f"but only {len(tokens)} tokens were given"
        )
    probs = result.top_probs[:, batch].detach().float().cpu()  # [layer, pos, k]
    ids = result.top_tokens[:, batch].cpu().tolist()
    real = result.mask[batch].cpu().tolist()
    names = {t: decode(t) for t in {t for layer in ids for pos in layer for t in pos}}
    top1 = probs[..., 0].masked_fill(~result.mask[batch].cpu()[None], float("nan"))
    text = [[names[pos[0]] if real[p] else "" for p, pos in enumerate(layer)] for layer in ids]
    hover = [
        [top_k_lines(pos, probs[layer, p].tolist(), names) if real[p] else "padding" for p, pos in enumerate(row)]
        for layer, row in enumerate(ids)
    ]
    return heatmap(
        top1,
        rows=result.labels,
        cols=[tokens[p] for p in positions],
        text=text,
        hover=hover,
        title=title,
        x_label="position",
        y_label="layer",
        value_label="top-1 probability",
        scale="sequential",
        zmin=0.0,
        zmax=1.0,
    )


def top_k_lines(ids: list[int], probs: list[float], names: dict[int, str]) -> str:
    """``1. 'the' 0.52`` and so on: one line per prediction, the token quoted so spaces show."""
    return "\n".join(f"{i + 1}. {names[t]!r} {rounded(p)}" for i, (t, p) in enumerate(zip(ids, probs)))
