"""Plotly figures: every figure carries its title and axis labels and the data it was given,
every string escaped so that plotly shows it literally instead of reading it as markup;
figure_html either inlines plotly.js or leaves it to one relative <script src>, and never
points at another host."""

from __future__ import annotations

import re

import plotly.offline
import pytest
import torch

from mechscope.viz.colours import PLOTLY_SCALES
from mechscope.viz.figures import (
    PLOTLY_FILE,
    figure_html,
    imshow,
    line,
    markup,
    plotly_script,
    scatter,
    write_plotly_js,
)
from mechscope.viz.html import VizError

PLOTLY_HEADER = re.compile(r"plotly\.js v\d")
URL = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.IGNORECASE)
LINK = '<a href="https://example.com/x">l</a>'
LONE = "\udce2"  # a byte-level token's lone surrogate


def labels(fig) -> tuple[str, str, str]:
    return fig.layout.title.text, fig.layout.xaxis.title.text, fig.layout.yaxis.title.text


def test_a_line_per_curve_over_the_same_x():
    fig = line(
        [0, 1, 2],
        {"train": [3.0, 2.0, 1.5], "test": torch.tensor([3.5, 2.5, 2.0])},
        title="Loss",
        x_label="step",
        y_label="loss",
        log_y=True,
    )
    assert labels(fig) == ("Loss", "step", "loss")
    assert [trace.name for trace in fig.data] == ["train", "test"]
    assert list(fig.data[1].y) == [3.5, 2.5, 2.0]
    assert list(fig.data[0].x) == [0.0, 1.0, 2.0]
    assert fig.layout.yaxis.type == "log"


def test_a_scatter_with_a_label_per_point():
    fig = scatter([1, 2], [3, 4], text=["<a>", "b"], title="S", x_label="x", y_label="y")
    assert labels(fig) == ("S", "x", "y")
    assert list(fig.data[0].text) == ["&lt;a&gt;", "b"]  # plotly shows "<a>"
    assert fig.data[0].mode == "markers"


def test_every_string_plotly_draws_is_escaped():
    fig = imshow(
        torch.rand(2, 2),
        title="<b>T</b>",
        x_label="a&b",
        y_label="<br>",
        x_ticks=[LINK, "<i>x</i>"],
        y_ticks=["q", LONE],
    )
    assert labels(fig) == ("&lt;b&gt;T&lt;/b&gt;", "a&amp;b", "&lt;br&gt;")
    assert list(fig.data[0].x) == [markup(LINK), "&lt;i&gt;x&lt;/i&gt;"]
    assert list(fig.data[0].y) == ["q", "\ufffd"]
    curves = line([0, 1], {LINK: [1, 2], "plain": [2, 3]}, title="t", x_label="x", y_label="y")
    assert [trace.name for trace in curves.data] == [markup(LINK), "plain"]
    points = scatter([1, 2], [3, 4], text=[LINK, LONE], title="<s>", x_label="x", y_label="y")
    assert list(points.data[0].text) == [markup(LINK), "\ufffd"] and points.layout.title.text == "&lt;s&gt;"
    for figure in (fig, curves, points):
        figure_html(figure).encode("utf-8")  # no lone surrogate reaches the page
    assert markup(LINK) == '&lt;a href="https://example.com/x"&gt;l&lt;/a&gt;'


def test_ticks_that_become_the_same_when_shown_stay_apart():
    fig = imshow(torch.rand(1, 2), title="t", x_label="x", y_label="y", x_ticks=["\udce2", "\udc80"])
    assert len(set(fig.data[0].x)) == 2


def test_imshow_picks_the_scale_and_keeps_repeated_ticks_apart():
    values = torch.tensor([[-1.0, 2.0], [0.5, 0.0]])
    fig = imshow(values, title="I", x_label="key", y_label="query", x_ticks=[" a", " a"], y_ticks=["q0", "q1"])
    heat = fig.data[0]
    assert labels(fig) == ("I", "key", "query")
    assert [list(step) for step in heat.colorscale] == PLOTLY_SCALES["diverging"]
    assert heat.zmin == -heat.zmax == -2.0
    assert len(set(heat.x)) == 2 and list(heat.y) == ["q0", "q1"]
    assert fig.layout.yaxis.autorange == "reversed"  # row 0 on top, as in a matrix
    positive = imshow(values.abs(), title="I", x_label="k", y_label="q")
    assert [list(step) for step in positive.data[0].colorscale] == PLOTLY_SCALES["sequential"]


def test_figure_html_inlines_plotly_or_leaves_it_to_the_page():
    fig = line([0, 1], {"a": [1, 2]}, title="t", x_label="x", y_label="y")
    inline = figure_html(fig)
    linked = figure_html(fig, plotly_js=f"assets/{PLOTLY_FILE}")
    assert PLOTLY_HEADER.search(inline) and not PLOTLY_HEADER.search(linked)
    assert "Plotly.newPlot" in linked and "<script src" not in linked
    assert URL.search(linked) is None  # the fragment itself names no host
    assert plotly_script("assets/plotly.min.js") == '<script src="assets/plotly.min.js"></script>\n'


def test_write_plotly_js_copies_the_installed_library(tmp_path):
    path = write_plotly_js(tmp_path / "assets")
    assert path == tmp_path / "assets" / PLOTLY_FILE
    assert path.read_text(encoding="utf-8") == plotly.offline.get_plotlyjs()


@pytest.mark.bad_input
def test_bad_figures_are_refused_by_name():
    with pytest.raises(VizError, match=r"ys\['b'\] must be \[2\] \(one per x\)"):
        line([0, 1], {"a": [1, 2], "b": [1, 2, 3]}, title="t", x_label="x", y_label="y")
    with pytest.raises(VizError, match="ys must be a non-empty mapping"):
        line([0, 1], {}, title="t", x_label="x", y_label="y")
    with pytest.raises(VizError, match="text must have one label per point"):
        scatter([1, 2], [3, 4], text=["a"], title="t", x_label="x", y_label="y")
    with pytest.raises(VizError, match="x_ticks must have one label per column/row"):
        imshow(torch.zeros(2, 3), title="t", x_label="x", y_label="y", x_ticks=["a"])
    for address in ("https://cdn.plot.ly/plotly.js", "//cdn.example/plotly.js", "/abs/plotly.js"):
        with pytest.raises(VizError, match="relative"):
            figure_html(line([0], {"a": [1]}, title="t", x_label="x", y_label="y"), plotly_js=address)
        with pytest.raises(VizError, match="relative"):
            plotly_script(address)
