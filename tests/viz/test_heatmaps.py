"""Heatmaps: labelled grids whose shapes must agree with their labels; patching results on a
symmetric diverging scale; the logit lens showing each layer's top prediction, its probability
and the top k on hover; labels and cell text of any characters (lone surrogates included) carried
exactly; and a clear refusal of grids too large to draw."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.analysis.lens import logit_lens
from mechscope.viz.heatmaps import MAX_CELLS, heatmap, logit_lens_heatmap, patching_heatmap
from mechscope.viz.html import VizError, json_for_script, numbers, page, rounded
from tests.conftest import random_model

# Labels with lone surrogates (category Cs) and markup common, joined from pieces (see test_tokens).
TEXT = st.lists(
    st.one_of(
        st.characters(categories=["Cs"]), st.sampled_from(["<", ">", "&", "/", "\n", "\u2028"]), st.text(max_size=3)
    ),
    max_size=4,
).map("".join)


def decode(token: int) -> str:
    return f" tok{token}"


@settings(max_examples=20, deadline=None)
@given(labels=st.lists(TEXT, min_size=1, max_size=4), title=TEXT)
def test_labels_and_cell_text_of_any_characters_are_carried_exactly(labels, title):
    n = len(labels)
    widget = heatmap(torch.rand(n, n), rows=labels, cols=labels, text=[labels] * n, hover=[labels] * n, title=title)
    assert (widget.data["rows"], widget.data["text"], widget.data["title"]) == (labels, [labels] * n, title)
    page(title, widget.to_html(bundle=False)).encode("utf-8")
    hover = json.loads(json_for_script(widget.to_json()))["data"]["hover"]
    assert [[utf16(cell) for cell in row] for row in hover] == [[utf16(label) for label in labels]] * n


def utf16(text: str) -> bytes:
    """Text as JavaScript holds it: a pair of surrogates is one character (JSON reads them back joined)."""
    return text.encode("utf-16-le", "surrogatepass")


@settings(max_examples=20, deadline=None)
@given(n_rows=st.integers(1, 6), n_cols=st.integers(1, 9), seed=st.integers(0, 99))
def test_a_heatmap_carries_its_grid_and_labels(n_rows, n_cols, seed):
    values = torch.randn(n_rows, n_cols, generator=torch.Generator().manual_seed(seed))
    rows, cols = [f"L{r}" for r in range(n_rows)], [f" c{c}" for c in range(n_cols)]
    widget = heatmap(values, rows=rows, cols=cols, title="T", x_label="x", y_label="y", value_label="v")
    data = widget.data
    assert widget.kind == "heatmap"
    assert (data["rows"], data["cols"]) == (rows, cols)
    assert data["values"] == numbers(values)
    assert (data["title"], data["x_label"], data["y_label"], data["value_label"]) == ("T", "x", "y", "v")
    assert data["text"] is None and data["hover"] is None
    assert data["zmin"] <= values.min().item() + 1e-4 and values.max().item() - 1e-4 <= data["zmax"]


def test_cell_text_and_hover_lines_are_kept_per_cell():
    values = torch.rand(2, 3)
    text = [["a", "b", "c"], ["d", "<e>", "f"]]
    hover = [["1", "2", "3"], ["4", "5", "6\nseven"]]
    data = heatmap(values, rows=["r0", "r1"], cols=["x", "y", "z"], text=text, hover=hover, scale="sequential").data
    assert data["text"] == text and data["hover"] == hover
    assert data["scale"] == "sequential"


@settings(max_examples=20, deadline=None)
@given(layers=st.integers(1, 5), width=st.integers(1, 8), scale=st.floats(0.01, 100))
def test_patching_results_are_diverging_and_symmetric(layers, width, scale):
    values = (torch.rand(layers, width, generator=torch.Generator().manual_seed(width)) - 0.3) * scale
    cols = [f"p{i}" for i in range(width)]
    data = patching_heatmap(values, cols=cols, metric="logit difference", title="Residual stream").data
    assert data["rows"] == [f"L{layer}" for layer in range(layers)]
    assert data["scale"] == "diverging"
    assert data["zmin"] == -data["zmax"]
    assert data["zmax"] == rounded(values.abs().max().item())
    assert (data["value_label"], data["x_label"], data["y_label"]) == ("logit difference", "position", "layer")


def test_patching_by_head_with_named_rows():
    values = torch.randn(2, 4)
    data = patching_heatmap(values, cols=list("0123"), rows=["a", "b"], metric="m", x_label="head").data
    assert data["rows"] == ["a", "b"] and data["x_label"] == "head"


def test_the_logit_lens_shows_each_layers_top_prediction():
    model = random_model()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    result = logit_lens(model, tokens, top_k=3)
    names = [f"<{i}>" for i in range(6)]
    data = logit_lens_heatmap(result, names, decode, batch=1).data
    assert data["rows"] == result.labels
    assert data["cols"] == names
    assert data["values"] == numbers(result.top_probs[:, 1, :, 0])
    assert data["text"] == [[decode(t) for t in layer] for layer in result.top_tokens[:, 1, :, 0].tolist()]
    assert (data["scale"], data["zmin"], data["zmax"]) == ("sequential", 0.0, 1.0)
    ids, probs = result.top_tokens[-1, 1, 2].tolist(), result.top_probs[-1, 1, 2].tolist()
    lines = data["hover"][-1][2].split("\n")  # the final layer, position 2: the top 3, most likely first
    assert lines == [f"{k + 1}. {decode(ids[k])!r} {rounded(probs[k])}" for k in range(3)]


def test_the_logit_lens_at_kept_positions_and_with_padding():
    model = random_model()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # the second row is two tokens shorter, right-padded
    result = logit_lens(model, tokens, attention_mask=mask, positions=[1, 3, 5], top_k=2)
    names = [f"<{i}>" for i in range(6)]
    padded = logit_lens_heatmap(result, names, decode, batch=1).data
    assert padded["cols"] == ["<1>", "<3>", "<5>"]
    assert all(row[2] is None and text[2] == "" for row, text in zip(padded["values"], padded["text"]))
    assert all(row[0] is not None for row in padded["values"])
    full = logit_lens_heatmap(result, names, decode, batch=0).data
    assert all(value is not None for row in full["values"] for value in row)


@pytest.mark.bad_input
def test_shapes_that_do_not_match_the_labels_are_refused():
    with pytest.raises(VizError, match=r"values must be \[row, col\] = \[2, 3\]"):
        heatmap(torch.zeros(3, 2), rows=["a", "b"], cols=["x", "y", "z"])
    with pytest.raises(VizError, match=r"values must be \[row, col\], got shape \[4\]"):
        heatmap(torch.zeros(4), rows=["a"], cols=["x"])
    with pytest.raises(VizError, match=r"text must be \[row\]\[col\] = \[1\]\[2\]"):
        heatmap(torch.zeros(1, 2), rows=["a"], cols=["x", "y"], text=[["only one"]])
    with pytest.raises(VizError, match="cols must be a list of strings"):
        patching_heatmap(torch.zeros(1, 2), cols="xy")
    with pytest.raises(VizError, match=r"values must be \[layer, pos\] or \[layer, head\]"):
        patching_heatmap(torch.zeros(1, 2, 3), cols=["x", "y"])


@pytest.mark.bad_input
def test_a_heatmap_too_large_to_draw_suggests_slicing():
    with pytest.raises(VizError, match=r"100,001 values.*slice it"):
        heatmap(torch.zeros(1, MAX_CELLS + 1), rows=["a"], cols=["x"] * (MAX_CELLS + 1))


@pytest.mark.bad_input
def test_the_logit_lens_refuses_a_missing_row_or_too_few_tokens():
    model = random_model()
    result = logit_lens(model, torch.randint(0, model.cfg.d_vocab, (1, 5)), top_k=2)
    with pytest.raises(VizError, match=r"batch must be an integer in \[0, 0\]"):
        logit_lens_heatmap(result, list("abcde"), decode, batch=1)
    with pytest.raises(VizError, match="reads position 4, but only 3 tokens"):
        logit_lens_heatmap(result, list("abc"), decode)
