"""Attribution bars (averaged or one example, the largest kept and the rest summed, the constant
shown, so the bars add up to the total carried) and top-k prediction tables (one row per
position, each prediction with its probability)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.analysis.attribution import Attribution, direct_logit_attribution
from mechscope.viz.html import VizError, numbers, rounded
from mechscope.viz.tables import CONSTANT, attribution_bars, ordinal, top_k_table
from tests.conftest import random_model


def an_attribution(n_components: int = 4, n_batch: int = 3, seed: int = 0, constant: bool = True) -> Attribution:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n_components, n_batch, generator=generator)
    constants = torch.randn(n_batch, generator=generator) if constant else torch.zeros(n_batch)
    return Attribution(values, [f"c{i}" for i in range(n_components)], constants)


def adds_up(data: dict) -> bool:
    """The bars sum to the total shown, up to rounding each number to 5 significant digits."""
    tolerance = 1e-4 * (sum(abs(v) for v in data["values"]) + abs(data["total"]))
    return abs(sum(data["values"]) - data["total"]) <= tolerance


def test_bars_average_the_examples_and_carry_the_total():
    attribution = an_attribution()
    widget = attribution_bars(attribution)
    data = widget.data
    assert widget.kind == "bars"
    assert data["labels"] == [*attribution.labels, CONSTANT]
    assert data["values"] == numbers(torch.cat([attribution.values.mean(-1), attribution.constant.mean()[None]]))
    assert data["total"] == rounded(attribution.total.mean().item())
    assert (data["title"], data["value_label"]) == ("Direct logit attribution", "logit difference")
    assert adds_up(data)


def test_bars_of_one_example():
    attribution = an_attribution()
    data = attribution_bars(attribution, batch=2).data
    assert data["values"] == numbers(torch.cat([attribution.values[:, 2], attribution.constant[2:]]))
    assert data["total"] == rounded(attribution.total[2].item())
    assert adds_up(data)


def test_no_constant_bar_when_the_constant_is_zero():
    attribution = an_attribution(constant=False)
    data = attribution_bars(attribution).data
    assert data["labels"] == attribution.labels
    assert adds_up(data)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), top=st.integers(1, 15), seed=st.integers(0, 99), batch=st.sampled_from([None, 0, 2]))
def test_top_keeps_the_largest_and_sums_the_rest_so_the_bars_add_up(n, top, seed, batch):
    attribution = an_attribution(n_components=n, seed=seed)
    data = attribution_bars(attribution, top=top, batch=batch).data
    values = (attribution.values.mean(-1) if batch is None else attribution.values[:, batch]).tolist()
    order = sorted(range(n), key=lambda i: -abs(values[i]))
    kept = min(n, top)
    assert data["labels"][:kept] == [f"c{i}" for i in order[:kept]]
    magnitudes = [abs(v) for v in data["values"][:kept]]
    assert magnitudes == sorted(magnitudes, reverse=True)
    dropped = [values[i] for i in order[kept:]]
    if dropped:
        s = "s" if len(dropped) > 1 else ""
        assert data["labels"][kept] == f"other ({len(dropped)} component{s})"
        assert data["values"][kept] == pytest.approx(sum(dropped), abs=1e-4)
    assert data["labels"][-1] == CONSTANT
    assert len(data["labels"]) == kept + bool(dropped) + 1
    assert adds_up(data)


def test_top_without_a_constant_keeps_the_other_bar_last():
    data = attribution_bars((["a", "b", "c", "d"], [0.5, -2.0, 0.25, 1.0]), top=2).data
    assert data["labels"] == ["b", "d", "other (2 components)"]
    assert data["values"] == [-2.0, 1.0, 0.75]
    assert data["total"] is None


def test_bars_from_labels_and_values_have_no_total():
    data = attribution_bars((["embed", "L0", "L1"], [0.5, -1.0, 2.0]), value_label="logit").data
    assert data["labels"] == ["embed", "L0", "L1"]
    assert data["values"] == [0.5, -1.0, 2.0]
    assert data["total"] is None and data["value_label"] == "logit"


def test_bars_of_a_models_direct_logit_attribution():
    model = random_model()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    attribution = direct_logit_attribution(model, tokens, answer=torch.tensor([1, 2]), wrong=torch.tensor([3, 4]))
    data = attribution_bars(attribution, top=3, batch=1).data
    assert len(data["labels"]) == 5 and set(data["labels"][:3]) <= set(attribution.labels)
    assert data["labels"][3:] == [f"other ({len(attribution.labels) - 3} components)", CONSTANT]
    assert adds_up(data)
    logits = model(tokens)[1, -1]
    assert data["total"] == pytest.approx((logits[2] - logits[4]).item(), abs=1e-3)  # the model's own answer


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
