"""Attribution bars (averaged or one example, the largest kept, the total carried) and top-k
prediction tables (one row per position, each prediction with its probability)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.analysis.attribution import Attribution, direct_logit_attribution
from mechscope.viz.html import VizError, numbers, rounded
from mechscope.viz.tables import attribution_bars, ordinal, top_k_table
from tests.conftest import random_model


def an_attribution(n_components: int = 4, n_batch: int = 3, seed: int = 0) -> Attribution:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n_components, n_batch, generator=generator)
    return Attribution(values, [f"c{i}" for i in range(n_components)], torch.randn(n_batch, generator=generator))


def test_bars_average_the_examples_and_carry_the_total():
    attribution = an_attribution()
    widget = attribution_bars(attribution)
    data = widget.data
    assert widget.kind == "bars"
    assert data["labels"] == attribution.labels
    assert data["values"] == numbers(attribution.values.mean(-1))
    assert data["total"] == rounded(attribution.total.mean().item())
    assert (data["title"], data["value_label"]) == ("Direct logit attribution", "logit difference")


def test_bars_of_one_example():
    attribution = an_attribution()
    data = attribution_bars(attribution, batch=2).data
    assert data["values"] == numbers(attribution.values[:, 2])
    assert data["total"] == rounded(attribution.total[2].item())


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), top=st.integers(1, 15), seed=st.integers(0, 99))
def test_top_keeps_the_largest_in_absolute_value_largest_first(n, top, seed):
    attribution = an_attribution(n_components=n, seed=seed)
    data = attribution_bars(attribution, top=top).data
    magnitudes = [abs(v) for v in data["values"]]
    assert len(data["labels"]) == min(n, top)
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert [label for label, _ in attribution.top(top)] == data["labels"]


def test_bars_from_labels_and_values_have_no_total():
    data = attribution_bars((["embed", "L0", "L1"], [0.5, -1.0, 2.0]), value_label="logit").data
    assert data["labels"] == ["embed", "L0", "L1"]
    assert data["values"] == [0.5, -1.0, 2.0]
    assert data["total"] is None and data["value_label"] == "logit"


def test_bars_of_a_models_direct_logit_attribution():
    model = random_model()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    attribution = direct_logit_attribution(model, tokens, answer=torch.tensor([1, 2]), wrong=torch.tensor([3, 4]))
    data = attribution_bars(attribution, top=3).data
    assert len(data["labels"]) == 3 and set(data["labels"]) <= set(attribution.labels)


def test_a_top_k_table_has_one_row_per_position():
    tokens = ["<bos>", " The", "\n"]
    top_tokens = [[" a", " b"], ["<img src=x>", " d"], [" e", " f"]]
    probs = torch.tensor([[0.6, 0.3], [0.9, 0.05], [0.5, 0.25]])
    widget = top_k_table(tokens, top_tokens, probs)
    data = widget.data
    assert widget.kind == "table"
    assert data["columns"] == ["#", "token", "1st", "2nd"]
    assert [row[:2] for row in data["rows"]] == [[0, "<bos>"], [1, " The"], [2, "\n"]]
    assert data["rows"][1][2] == {"text": "<img src=x>", "value": rounded(0.9)}
    assert data["rows"][2][3] == {"text": " f", "value": rounded(0.25)}


def test_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "101st",
        "111th",
    ]


@pytest.mark.bad_input
def test_bad_bars_are_refused_by_name():
    attribution = an_attribution(n_batch=3)
    with pytest.raises(VizError, match=r"batch must be an integer in \[0, 2\]"):
        attribution_bars(attribution, batch=3)
    with pytest.raises(VizError, match="top must be a positive integer"):
        attribution_bars(attribution, top=0)
    with pytest.raises(VizError, match=r"values must have shape \[label\] = \[2\]"):
        attribution_bars((["a", "b"], [1.0, 2.0, 3.0]))
    with pytest.raises(VizError, match="an Attribution or a \\(labels, values\\) pair"):
        attribution_bars([1.0, 2.0])


@pytest.mark.bad_input
def test_bad_tables_are_refused_by_name():
    with pytest.raises(VizError, match=r"top_probs must be \[pos, k\] with pos = 2"):
        top_k_table(["a", "b"], [["x"], ["y"]], torch.rand(3, 1))
    with pytest.raises(VizError, match=r"top_tokens must be \[pos\]\[k\] = \[2\]\[2\]"):
        top_k_table(["a", "b"], [["x", "y"], ["z"]], torch.rand(2, 2))
