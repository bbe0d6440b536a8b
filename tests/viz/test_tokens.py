"""Coloured tokens: one value per token, a scale chosen by the values' signs unless given,
missing values carried as null, and any token text (markup, lone surrogates) carried exactly
into a page that can be written as UTF-8."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.viz.html import VizError, numbers, page
from mechscope.viz.tokens import colored_tokens

VALUES = st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=20)
# Token text as tokenizers give it: any character, lone surrogates (category Cs) and markup common
# (joined from pieces: one text() pools its alphabets and would almost never draw a surrogate).
TOKEN = st.lists(
    st.one_of(
        st.characters(categories=["Cs"]), st.sampled_from(["<", ">", "&", "/", "\n", "\u2028"]), st.text(max_size=3)
    ),
    max_size=4,
).map("".join)
DATA = re.compile(r'<script type="application/json"[^>]*>(.*?)</script>', re.DOTALL)


@settings(max_examples=20, deadline=None)
@given(VALUES)
def test_every_token_gets_its_value_and_the_scale_follows_the_signs(values):
    tokens = [f"<{i}>" for i in range(len(values))]
    widget = colored_tokens(tokens, torch.tensor(values), label="neuron 3")
    data = widget.data
    assert widget.kind == "tokens"
    assert data["tokens"] == tokens
    assert data["values"] == numbers(torch.tensor(values))
    assert data["label"] == "neuron 3"
    assert data["scale"] == ("diverging" if min(values) < 0 < max(values) else "sequential")
    assert data["zmin"] < data["zmax"]


@settings(max_examples=20, deadline=None)
@given(st.lists(TOKEN, min_size=1, max_size=8))
def test_any_token_text_reaches_the_page_exactly(tokens):
    widget = colored_tokens(tokens, torch.arange(len(tokens)) * 1.0, title="".join(tokens))
    document = page("".join(tokens), widget.to_html(bundle=False))
    document.encode("utf-8")  # writable, lone surrogates and all
    shown = json.loads(DATA.search(document).group(1))["data"]["tokens"]
    assert [utf16(token) for token in shown] == [utf16(token) for token in tokens]


def utf16(text: str) -> bytes:
    """Text as JavaScript holds it: a pair of surrogates is one character (JSON reads them back joined)."""
    return text.encode("utf-16-le", "surrogatepass")


def test_a_list_of_values_and_explicit_scale_and_bounds():
    values = [0.2, 0.9, math.nan]
    widget = colored_tokens(["a", " b", "\n"], values, title="loss", scale="sequential", zmin=0.0, zmax=2.0)
    data = widget.data
    assert data["values"][2] is None
    assert (data["scale"], data["zmin"], data["zmax"]) == ("sequential", 0.0, 2.0)
    assert data["title"] == "loss"
    assert data["tokens"][2] == "\n"


def test_values_from_a_graph_on_any_dtype():
    values = (torch.randn(4, requires_grad=True) * 3).to(torch.float16)
    widget = colored_tokens(list("abcd"), values)
    assert widget.data["values"] == numbers(values.detach().float())


@pytest.mark.bad_input
def test_values_that_do_not_match_the_tokens_are_refused():
    with pytest.raises(VizError, match=r"values must be \[pos\] = \[3\]"):
        colored_tokens(["a", "b", "c"], torch.zeros(2))
    with pytest.raises(VizError, match=r"values must be \[pos\] = \[2\]"):
        colored_tokens(["a", "b"], torch.zeros(2, 1))
    with pytest.raises(VizError, match="scale must be one of"):
        colored_tokens(["a"], torch.zeros(1), scale="hot")
