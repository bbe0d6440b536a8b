"""Balanced parentheses: the generator's ground truth, the tokens, training and the findings."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mechscope.toys import TrainConfig, train
from mechscope.toys.parens import (
    BOS,
    CLOSE,
    OPEN,
    PAD,
    Brackets,
    Parentheses,
    class_logits,
    depth_profiles,
    encode,
    held_out,
    make_batch,
    near_miss,
    random_dyck,
    readout_r2,
    sample_strings,
)

brackets = st.text(alphabet="()", max_size=40)


def reduces_to_nothing(text: str) -> bool:
    """Balanced, by another road: deleting adjacent ``()`` pairs until none is left empties it."""
    while "()" in text:
        text = text.replace("()", "")
    return text == ""


# ------------------------------------------------------------------ ground truth
@given(brackets)
def test_ground_truth_matches_its_definitions(text):
    truth = Brackets.of(text)
    steps = [1 if c == "(" else -1 for c in text]
    assert list(truth.depth) == np.cumsum(steps, dtype=int).tolist()
    assert truth.final_depth == text.count("(") - text.count(")")
    negative = [i for i in range(len(text)) if text[: i + 1].count(")") > text[: i + 1].count("(")]
    assert truth.first_failure == (negative[0] if negative else None)
    assert truth.balanced == reduces_to_nothing(text)
    assert truth.balanced == (truth.first_failure is None and truth.final_depth == 0)
    assert truth.kind == ("balanced" if truth.balanced else "goes_negative" if negative else "ends_nonzero")


def test_ground_truth_rejects_other_characters():
    with pytest.raises(ValueError, match=r"only '\(' and '\)'"):
        Brackets.of("(a)")


@given(st.integers(1, 15), st.integers(0, 2**32 - 1))
def test_random_dyck_words_are_balanced_and_their_near_misses_are_not(n_pairs, seed):
    rng = np.random.default_rng(seed)
    word = random_dyck(n_pairs, rng)
    assert len(word) == 2 * n_pairs and Brackets.of(word).balanced
    miss = Brackets.of(near_miss(word, rng))
    assert not miss.balanced
    assert len(word) - 1 <= len(miss.text) <= len(word)


def test_random_dyck_words_are_uniform():
    rng = np.random.default_rng(0)
    counts = Counter(random_dyck(3, rng) for _ in range(5000))
    assert sorted(counts) == sorted(["((()))", "(()())", "(())()", "()(())", "()()()"])  # the 5 words of 3 pairs
    sigma = math.sqrt(5000 * 0.2 * 0.8)
    assert all(abs(c - 1000) < 5 * sigma for c in counts.values()), counts


def test_samples_are_half_balanced_near_misses_of_both_kinds_and_split_by_hash():
    rng = np.random.default_rng(0)
    train_strings = sample_strings(4000, 20, rng)
    kinds = Counter(s.kind for s in train_strings)
    tolerance = 5 * math.sqrt(4000 * 0.25)  # five binomial standard deviations around a half
    assert abs(kinds["balanced"] - 2000) < tolerance
    unbalanced = kinds["goes_negative"] + kinds["ends_nonzero"]
    assert min(kinds["goes_negative"], kinds["ends_nonzero"]) > 0.4 * unbalanced  # both kinds of near miss
    assert {len(s.text) for s in train_strings} == set(range(1, 21))
    assert not any(held_out(s.text) for s in train_strings)
    assert all(held_out(s.text) for s in sample_strings(200, 20, rng, evaluation=True))


# ------------------------------------------------------------------ tokens
def test_strings_are_left_padded_after_a_bos_token():
    tokens, mask = encode(["()", ")(("], max_length=5)
    assert tokens.tolist() == [[PAD, PAD, PAD, BOS, OPEN, CLOSE], [PAD, PAD, BOS, CLOSE, OPEN, OPEN]]
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="length 6 is longer than max_length=5"):
        encode(["((()))"], max_length=5)


def test_depth_profiles_line_up_with_the_left_padded_tokens():
    batch = make_batch([Brackets.of("(()"), Brackets.of(")")], max_length=4)
    assert depth_profiles(batch).tolist() == [[0, 0, 1, 2, 1], [0, 0, 0, 0, -1]]


def test_readout_r2_is_one_for_a_linear_target_and_near_zero_for_noise():
    x = torch.randn(400, 6)
    fit = torch.arange(400) < 200
    assert readout_r2(x, x @ torch.arange(6.0) + 3, fit) == pytest.approx(1.0)
    assert readout_r2(x, torch.randn(400), fit) < 0.1


def test_padding_does_not_change_the_class_logits():
    organism = Parentheses(max_length=8, n_layers=2, d_model=32)
    model = organism.build_model().eval()
    strings = [Brackets.of(t) for t in ("(())", "()(()", "(")]
    padded = class_logits(model, make_batch(strings, organism.max_length))
    for row, s in enumerate(strings):
        alone = class_logits(model, make_batch([s], len(s.text)))
        assert torch.allclose(padded[row], alone[0], atol=1e-5)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        Parentheses(max_length=1)
    with pytest.raises(ValueError, match="d_model"):
        Parentheses(d_model=0)


# ------------------------------------------------------------------ training and findings
@pytest.fixture(scope="module")
def trained():
    organism = Parentheses(max_length=8, n_layers=2, d_model=32, batch_size=128)
    config = TrainConfig(steps=300, lr=3e-3, warmup_steps=20, log_every=50, eval_every=100)
    torch.manual_seed(config.seed)  # the initial model of the run below
    before = organism.evaluate(organism.build_model())
    return organism, before, train(organism, config, progress=False)


def test_a_short_run_reduces_the_loss_and_beats_chance(trained):
    organism, before, result = trained
    last = result.metrics[-1]
    assert last["eval_loss"] < 0.5 * before["eval_loss"]
    assert last["accuracy"] > 0.75  # classes are balanced, so chance is about 0.5
    assert organism.evaluate(result.model)["accuracy"] == pytest.approx(last["accuracy"])


def test_explain_reports_accuracy_by_kind_and_length(trained):
    organism, _, result = trained
    findings = organism.explain(result.model, result.metrics)
    assert set(findings["accuracy_by_kind"]) == {"balanced", "goes_negative", "ends_nonzero"}
    assert findings["accuracy"] == pytest.approx(result.metrics[-1]["accuracy"])
    assert set(findings["accuracy_by_length"]) <= {str(n) for n in range(1, 9)}
    assert all(0 <= v <= 1 for v in findings["accuracy_by_kind"].values())
    assert len(findings["depth_r2_by_layer"]) == organism.n_layers + 1  # the embeddings, then each layer
    assert all(r2 <= 1 for r2 in [*findings["depth_r2_by_layer"], findings["final_depth_r2"]])
    assert any("held-out accuracy" in line for line in findings.lines)
    fig = organism.figures(result.model, result.metrics, findings)["parentheses_accuracy"]
    assert isinstance(fig, go.Figure) and "parentheses" in fig.layout.title.text.lower()
