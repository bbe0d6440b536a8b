"""Attention widgets: the data carries every head's pattern in [layer][head][query][key] order,
rounded to 4 decimal places, and only the lower triangle when the pattern is causal; the size
limit counts the values sent and attention_token_budget says how long a prompt fits; a single
head becomes a query x key heatmap on a 0..1 scale; shapes that do not match the tokens are
refused by name."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.viz import attention as module
from mechscope.viz.attention import (
    MAX_PATTERN_VALUES,
    attention_heatmap,
    attention_patterns,
    attention_token_budget,
    unpack_patterns,
)
from mechscope.viz.html import VizError, numbers


def causal_pattern(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random attention: each query's weights over keys at or before it sum to 1."""
    n = shape[-1]
    scores = torch.randn(*shape, n, generator=torch.Generator().manual_seed(seed))
    return scores.masked_fill(torch.ones(n, n).triu(1).bool(), -torch.inf).softmax(-1)


@settings(max_examples=20, deadline=None)
@given(layers=st.integers(1, 3), heads=st.integers(1, 4), n=st.integers(1, 7), seed=st.integers(0, 99))
def test_the_data_holds_every_head_in_order(layers, heads, n, seed):
    pattern = causal_pattern(layers, heads, n, seed=seed)
    tokens = [f" t{i}" for i in range(n)]
    widget = attention_patterns(tokens, pattern)
    assert widget.kind == "attention"
    assert widget.data["tokens"] == tokens
    assert widget.data["layers"] == list(range(layers))
    assert widget.data["heads"] == heads
    assert widget.data["triangular"] is True  # causal: row q sends keys 0..q only
    rows = [row for layer in widget.data["patterns"] for head in layer for row in head]
    assert [len(row) for row in rows] == list(range(1, n + 1)) * layers * heads
    assert all(w == round(w, 4) for row in rows for w in row)  # 4 decimal places
    assert torch.allclose(unpack_patterns(widget.data), pattern.double(), rtol=0, atol=5e-5 + 1e-7)
    layer, head, query = layers - 1, heads - 1, n - 1
    assert widget.data["patterns"][layer][head][query][0] == pytest.approx(
        pattern[layer, head, query, 0].item(), abs=5e-5
    )


def test_a_pattern_that_is_not_causal_sends_every_key():
    pattern = causal_pattern(2, 3, 5).transpose(-1, -2).contiguous()  # queries attend to later keys
    data = attention_patterns(list("abcde"), pattern).data
    assert data["triangular"] is False
    assert all(len(row) == 5 for layer in data["patterns"] for head in layer for row in head)
    assert torch.allclose(unpack_patterns(data), pattern.double(), atol=5e-5 + 1e-7)
    above = causal_pattern(1, 1, 3)
    above[0, 0, 0, 2] = math.nan  # NaN above the diagonal is not 0: keep every key
    nan = attention_patterns(list("abc"), above).data
    assert nan["triangular"] is False and nan["patterns"][0][0][0][2] is None


@settings(max_examples=20, deadline=None)
@given(layers=st.integers(1, 100), heads=st.integers(1, 100))
def test_the_token_budget_is_the_longest_prompt_that_fits(layers, heads):
    heads_in_all = layers * heads
    n = attention_token_budget(layers, heads)
    assert heads_in_all * n * (n + 1) // 2 <= MAX_PATTERN_VALUES < heads_in_all * (n + 1) * (n + 2) // 2
    m = attention_token_budget(layers, heads, causal=False)
    assert heads_in_all * m * m <= MAX_PATTERN_VALUES < heads_in_all * (m + 1) ** 2


def test_a_prompt_of_the_budgets_length_is_drawn_and_one_token_more_refused(monkeypatch):
    monkeypatch.setattr(module, "MAX_PATTERN_VALUES", 200)
    n = attention_token_budget(2, 3)
    assert 2 * 3 * n * (n + 1) // 2 <= 200
    assert attention_patterns(["t"] * n, causal_pattern(2, 3, n)).data["triangular"]
    with pytest.raises(VizError, match="200 a widget draws"):
        attention_patterns(["t"] * (n + 1), causal_pattern(2, 3, n + 1))


def test_layer_numbers_may_be_numpy_or_torch_integers():
    pattern = causal_pattern(2, 1, 3)
    for layers in (np.array([4, 7]), torch.tensor([4, 7]), [np.int64(4), torch.tensor(7)]):
        data = attention_patterns(list("abc"), pattern, layers=layers).data
        assert data["layers"] == [4, 7] and all(type(layer) is int for layer in data["layers"])
    json.dumps(data)  # plain ints, ready for JSON


def test_one_layer_of_heads_and_its_layer_number():
    pattern = causal_pattern(3, 4)
    widget = attention_patterns(list("abcd"), pattern, layers=[5], title="Layer 5")
    assert widget.data["layers"] == [5]
    assert widget.data["title"] == "Layer 5"
    assert len(widget.data["patterns"]) == 1 and len(widget.data["patterns"][0]) == 3


def test_patterns_with_gradients_in_half_precision_are_converted():
    pattern = causal_pattern(1, 2, 3).to(torch.bfloat16).requires_grad_()
    widget = attention_patterns(["a", "b", "c"], pattern)
    flat = [w for head in widget.data["patterns"][0] for row in head for w in row]
    assert flat and all(isinstance(w, float) for w in flat)


def test_a_single_head_is_a_query_by_key_heatmap():
    pattern = causal_pattern(5)
    tokens = ["<bos>", " The", " cat", " sat", "\n"]
    widget = attention_heatmap(tokens, pattern, title="L0H1")
    assert widget.kind == "heatmap"
    data = widget.data
    assert data["rows"] == data["cols"] == tokens
    assert (data["y_label"], data["x_label"]) == ("query", "key")
    assert (data["scale"], data["zmin"], data["zmax"]) == ("sequential", 0.0, 1.0)
    assert data["values"] == numbers(pattern)
    assert data["title"] == "L0H1"


@pytest.mark.bad_input
def test_shapes_that_do_not_match_the_tokens_are_refused():
    with pytest.raises(VizError, match="match the 3 tokens"):
        attention_patterns(["a", "b", "c"], causal_pattern(1, 2, 4))
    with pytest.raises(VizError, match=r"\[layer, head, query, key\]"):
        attention_patterns(["a", "b"], torch.rand(2, 2))
    with pytest.raises(VizError, match="layers names the 2 layer"):
        attention_patterns(["a", "b"], causal_pattern(2, 1, 2), layers=[0])
    for layers in ([0, 1.0], [True, 1], np.array([0.0, 1.0]), "01"):
        with pytest.raises(VizError, match="must be 2 integer"):
            attention_patterns(["a", "b"], causal_pattern(2, 1, 2), layers=layers)
    with pytest.raises(VizError, match="n_heads must be an integer"):
        attention_token_budget(12, 1.5)
    with pytest.raises(VizError, match="must be positive"):
        attention_token_budget(0, 12)
    with pytest.raises(VizError, match="must be positive"):
        attention_token_budget(-2, -6)
    with pytest.raises(VizError, match="tokens must be a list of strings"):
        attention_patterns("ab", causal_pattern(1, 1, 2))
    with pytest.raises(VizError, match=r"pattern must be \[query, key\] = \[2, 2\]"):
        attention_heatmap(["a", "b"], causal_pattern(1, 2))


@pytest.mark.bad_input
def test_a_pattern_too_large_to_draw_is_refused_with_a_hint():
    n = attention_token_budget(2, 2, causal=False) + 1
    with pytest.raises(VizError, match="slice some layers or heads"):
        attention_patterns(["x"] * n, torch.ones(2, 2, n, n))  # not causal: every value counts
