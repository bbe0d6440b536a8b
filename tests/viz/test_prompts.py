"""Prompts typed by a person: checked once, refused with a sentence that names the limit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.viz.prompts import InputError, read_prompt, same_length, single_token, top_predictions


def test_text_is_read_as_the_model_reads_it(model):
    seen = read_prompt(model, "the cat sat on the mat")
    assert torch.equal(seen.ids, model.to_tokens("the cat sat on the mat"))
    assert seen.labels == model.to_str_tokens("the cat sat on the mat")
    assert seen.decode(int(seen.ids[0, 1])) == seen.labels[1]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 319), min_size=1, max_size=20))
def test_token_ids_round_trip(gpt2_dir, ids):
    from mechscope import Model

    model = Model.from_pretrained(gpt2_dir)
    seen = read_prompt(model, torch.tensor(ids), labels=[f"t{i}" for i in ids])
    assert seen.ids.tolist() == [ids]
    assert seen.labels == [f"t{i}" for i in ids]


@pytest.mark.bad_input
@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_an_empty_prompt_is_refused(model, text):
    with pytest.raises(InputError, match="empty"):
        read_prompt(model, text)


@pytest.mark.bad_input
def test_a_long_prompt_names_the_limit(model):
    with pytest.raises(InputError, match=r"tokens long; the limit is 3 tokens"):
        read_prompt(model, "one two three four five", max_tokens=3)
    with pytest.raises(InputError, match=f"the limit is {model.cfg.n_ctx} tokens"):
        read_prompt(model, torch.zeros(model.cfg.n_ctx + 1, dtype=torch.long))


@pytest.mark.bad_input
def test_ids_outside_the_vocabulary_are_refused(model):
    with pytest.raises(InputError, match=r"vocabulary is 0\.\.319"):
        read_prompt(model, torch.tensor([1, 320]))
    with pytest.raises(InputError, match="integer token ids"):
        read_prompt(model, torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.bad_input
def test_labels_must_match_the_tokens(model):
    with pytest.raises(InputError, match="2 labels were given for a prompt of 3 tokens"):
        read_prompt(model, torch.tensor([1, 2, 3]), labels=["a", "b"])


def test_an_answer_is_one_token(model):
    word = model.to_str_tokens("the cat")[-1]
    assert single_token(model, word, "answer") == int(model.to_tokens("the cat")[0, -1])
    assert single_token(model, 7, "answer") == 7


@pytest.mark.bad_input
def test_an_answer_of_several_tokens_lists_them(model):
    with pytest.raises(InputError, match=r"tokens \(\[.*\]\); it must be exactly one"):
        single_token(model, " antidisestablishmentarianism", "answer")
    with pytest.raises(InputError, match="outside the vocabulary"):
        single_token(model, 320, "answer")


@pytest.mark.bad_input
def test_a_pair_must_have_one_length(model):
    with pytest.raises(InputError, match="patching needs the same number of tokens"):
        same_length(read_prompt(model, "a b c"), read_prompt(model, "a b c d e"))


@pytest.mark.bad_input
def test_a_model_without_a_tokenizer_needs_ids():
    from tests.conftest import random_model

    with pytest.raises(InputError, match="no tokenizer"):
        read_prompt(random_model(), "hello")


def test_top_predictions_are_the_likeliest_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    texts, probs = top_predictions(logits, lambda t: f"<{t}>", 2)
    assert texts == [["<1>", "<3>"]]
    assert torch.allclose(probs, logits.softmax(-1)[:, [1, 3]])


@pytest.mark.bad_input
def test_text_that_is_not_unicode_is_refused(model):
    with pytest.raises(InputError, match="not valid Unicode text"):
        read_prompt(model, "hello \ud800 world")
