"""Static figures with plotly: curves, scatter plots and labelled images, for reports and notebooks.

Every figure has a title and labelled axes. :func:`figure_html` turns one into an HTML fragment
that needs no network: plotly.js is either inlined or loaded from a relative path that
:func:`write_plotly_js` filled from the installed plotly package.

Plotly reads every string it draws (titles, tick labels, legend names, hover text) as a little
markup language: ``<b>``, ``<br>`` and ``<a href>`` become bold text, line breaks and links. Token
strings are untrusted, so every string is passed through :func:`markup`, which escapes it (plotly
decodes ``&lt;``, ``&gt;`` and ``&amp;`` back for display) and makes lone surrogates U+FFFD.

    fig = line(steps, {"train": train_loss, "test": test_loss}, title="Loss", x_label="step",
               y_label="loss", log_y=True)
    write_plotly_js(out / "assets")
    body = figure_html(fig, plotly_js="assets/plotly.min.js")
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.offline
from jaxtyping import Float
from torch import Tensor

from mechscope.viz.colours import PLOTLY_SCALES, Scale, value_range
from mechscope.viz.html import VizError, as_tensor, escape, numbers, strings

PLOTLY_FILE = "plotly.min.js"
CONFIG = {"displaylogo": False, "responsive": True}  # no logo: it links to plotly's website
HEIGHT = 420
Numbers = Sequence[float] | Sequence[int] | Tensor | np.ndarray  # a curve's values, however they come
MARGIN = {"l": 60, "r": 20, "t": 50, "b": 50}


def markup(text: str) -> str:
    """``text`` as plotly shows it literally: its pseudo-HTML escaped, lone surrogates made U+FFFD."""
    return escape(str(text), quote=False)


def layout(fig: go.Figure, title: str, x_label: str, y_label: str) -> go.Figure:
    fig.update_layout(
        title=markup(title),
        xaxis_title=markup(x_label),
        yaxis_title=markup(y_label),
        template="plotly_white",
        height=HEIGHT,
        margin=MARGIN,
    )
    return fig


def series(values: Numbers, name: str, length: int | None = None) -> list[float | None]:
    """A 1-D list of numbers, of ``length`` if given."""
    flat = as_tensor(values, name)
    if flat.ndim != 1 or (length is not None and flat.shape[0] != length):
        expected = f"[{length}] (one per x)" if length is not None else "one-dimensional"
        raise VizError(f"{name} must be {expected}, got shape {list(flat.shape)}")
    return numbers(flat)


def line(
    x: Numbers,
    ys: Mapping[str, Numbers],
    *,
    title: str,
    x_label: str,
    y_label: str,
    log_y: bool = False,
) -> go.Figure:
    """One line per entry of ``ys`` (its key is the legend), all over the same ``x``."""
    xs = series(x, "x")
    if not isinstance(ys, Mapping) or not ys:
        raise VizError("ys must be a non-empty mapping from a curve's name to its values")
    curves = [go.Scatter(x=xs, y=series(y, f"ys[{name!r}]", len(xs)), name=markup(name)) for name, y in ys.items()]
    fig = go.Figure(curves)
    if log_y:
        fig.update_yaxes(type="log")
    return layout(fig, title, x_label, y_label)


def scatter(
    x: Numbers,
    y: Numbers,
    *,
    text: Sequence[str] | None = None,
    title: str,
    x_label: str,
    y_label: str,
) -> go.Figure:
    """Points at (x, y); ``text`` labels each point on hover."""
    xs = series(x, "x")
    ys = series(y, "y", len(xs))
    labels = None if text is None else [markup(label) for label in strings(text, "text")]
    if labels is not None and len(labels) != len(xs):
        raise VizError(f"text must have one label per point ({len(xs)}), got {len(labels)}")
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="markers", text=labels, hoverinfo="x+y+text" if labels else "x+y"))
    return layout(fig, title, x_label, y_label)


def imshow(
    values: Float[Tensor, "row col"],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_ticks: Sequence[str] | None = None,
    y_ticks: Sequence[str] | None = None,
    scale: Scale | None = None,
) -> go.Figure:
    """A [row, col] image, row 0 at the top; diverging colours with white at 0 for signed data."""
    grid = as_tensor(values, "values")
    if grid.ndim != 2:
        raise VizError(f"values must be [row, col], got shape {list(grid.shape)}")
    x = ticks(x_ticks, grid.shape[1], "x_ticks")
    y = ticks(y_ticks, grid.shape[0], "y_ticks")
    scale, zmin, zmax = value_range(grid, scale=scale)
    trace = go.Heatmap(z=numbers(grid), x=x, y=y, colorscale=PLOTLY_SCALES[scale], zmin=zmin, zmax=zmax)
    fig = go.Figure(trace)
    fig.update_yaxes(autorange="reversed")
    if x_ticks is not None:
        fig.update_xaxes(type="category")
    if y_ticks is not None:
        fig.update_yaxes(type="category")
    return layout(fig, title, x_label, y_label)


def ticks(labels: Sequence[str] | None, count: int, name: str) -> list[str] | None:
    """Axis labels, escaped; duplicates (repeated tokens) get their index so plotly keeps every one."""
    if labels is None:
        return None
    shown = [markup(label) for label in strings(labels, name)]
    if len(shown) != count:
        raise VizError(f"{name} must have one label per column/row ({count}), got {len(shown)}")
    if len(set(shown)) == len(shown):
        return shown
    return [f"{label} ({i})" for i, label in enumerate(shown)]


def figure_html(fig: go.Figure, *, plotly_js: str = "inline") -> str:
    """A ``<div>`` and ``<script>`` that draw ``fig``: with plotly.js inlined (``"inline"``, works
    alone), or without it, for a page that loads ``plotly_js`` (a relative path) once itself."""
    if plotly_js != "inline" and not is_relative_path(plotly_js):
        example = f"assets/{PLOTLY_FILE}"
        raise VizError(f"plotly_js must be 'inline' or a relative path such as {example!r}, got {plotly_js!r}")
    return fig.to_html(
        full_html=False,
        include_plotlyjs=plotly_js == "inline",
        include_mathjax=False,
        config=CONFIG,
        default_height=f"{fig.layout.height or HEIGHT}px",
    )


def is_relative_path(path: str) -> bool:
    """No scheme, host or absolute path: the file travels with the page."""
    return bool(path) and ":" not in path and not path.startswith(("/", "\\")) and '"' not in path


def plotly_script(path: str = f"assets/{PLOTLY_FILE}") -> str:
    """The one ``<script src>`` a page needs before fragments made with ``figure_html(plotly_js=path)``."""
    if not is_relative_path(path):
        raise VizError(f"path must be relative, such as 'assets/{PLOTLY_FILE}', got {path!r}")
    return f'<script src="{html.escape(path)}"></script>\n'


def write_plotly_js(directory: str | Path) -> Path:
    """Write plotly.js from the installed plotly package into ``directory``; returns its path."""
    target = Path(directory) / PLOTLY_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(plotly.offline.get_plotlyjs(), encoding="utf-8")
    return target
