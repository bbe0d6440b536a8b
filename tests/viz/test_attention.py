"""Attention widgets: the data carries every head's pattern in [layer][head][query][key] order,
rounded; a single head becomes a query x key heatmap on a 0..1 scale; shapes that do not match
the tokens are refused by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.viz.attention import MAX_PATTERN_VALUES, attention_heatmap, attention_patterns
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
    assert widget.data["patterns"] == numbers(pattern)
    layer, head, query = layers - 1, heads - 1, n - 1
    assert widget.data["patterns"][layer][head][query][0] == pytest.approx(pattern[layer, head, query, 0].item(), 1e-4)


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
    assert all(isinstance(w, float) for w in flat)


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
    with pytest.raises(VizError, match="tokens must be a list of strings"):
        attention_patterns("ab", causal_pattern(1, 1, 2))
    with pytest.raises(VizError, match=r"pattern must be \[query, key\] = \[2, 2\]"):
        attention_heatmap(["a", "b"], causal_pattern(1, 2))


@pytest.mark.bad_input
def test_a_pattern_too_large_to_draw_is_refused_with_a_hint():
    n = int((MAX_PATTERN_VALUES / 4) ** 0.5) + 1
    with pytest.raises(VizError, match="slice some layers or heads"):
        attention_patterns(["x"] * n, torch.zeros(2, 2, n, n))
