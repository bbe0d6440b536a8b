from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.model.inputs import InputError
from tests.conftest import random_model

MODEL = random_model()  # d_vocab=50, n_ctx=24, d_model=32


@settings(max_examples=30, deadline=None)
@given(bad=st.one_of(st.integers(-(2**63), -1), st.integers(50, 2**63 - 1)), where=st.integers(0, 5))
def test_token_outside_vocabulary_names_the_range(bad, where):
    tokens = torch.randint(0, 50, (2, 6))
    tokens[1, where] = bad
    with pytest.raises(InputError, match=rf"token id {bad} is outside the vocabulary.*\[0, 49\]"):
        MODEL(tokens)


@settings(max_examples=10, deadline=None)
@given(length=st.integers(25, 60))
def test_sequence_longer_than_context_names_the_limit(length):
    with pytest.raises(InputError, match=rf"sequence length {length} exceeds.*n_ctx=24"):
        MODEL(torch.zeros(1, length, dtype=torch.long))


@pytest.mark.bad_input
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_non_integer_tokens(dtype):
    with pytest.raises(InputError, match="integer dtype"):
        MODEL(torch.zeros(1, 4, dtype=dtype))


@pytest.mark.parametrize("shape", [(0,), (1, 0), (0, 5)])
def test_empty_input(shape):
    with pytest.raises(InputError, match="empty"):
        MODEL(torch.zeros(shape, dtype=torch.long))


@pytest.mark.bad_input
def test_wrong_rank_and_type():
    with pytest.raises(InputError, match=r"shape \[batch, pos\]"):
        MODEL(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(InputError, match=r"torch\.Tensor"):
        MODEL([1, 2, 3])


def test_bad_residual_stream_input():
    with pytest.raises(InputError, match=r"\[batch, pos, 32\]"):
        MODEL(torch.zeros(1, 4, 31), start_at_layer=1)
    with pytest.raises(InputError, match="float residual stream"):
        MODEL(torch.zeros(1, 4, dtype=torch.long), start_at_layer=1)


def test_bad_layer_indices():
    with pytest.raises(InputError, match="stop_at_layer=7 is out of range for a model with 3 layers"):
        MODEL(torch.zeros(1, 4, dtype=torch.long), stop_at_layer=7)
    with pytest.raises(InputError, match="start_at_layer=-4"):
        MODEL(torch.zeros(1, 4, 32), start_at_layer=-4)


@pytest.mark.bad_input
def test_attention_mask_of_the_wrong_shape():
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(InputError, match=r"attention_mask has shape \(2, 3\) but the input is \(2, 4\)"):
        MODEL(tokens, attention_mask=torch.ones(2, 3, dtype=torch.long))


def test_bad_attention_mask_values():
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(InputError, match="only 0"):
        MODEL(tokens, attention_mask=torch.full((2, 4), 2))
    with pytest.raises(InputError, match="every token of some sequence"):
        MODEL(tokens, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))


@pytest.mark.bad_input
def test_tokens_that_do_not_match_the_residual_stream():
    resid = MODEL(torch.zeros(1, 3, dtype=torch.long), stop_at_layer=1)
    with pytest.raises(InputError, match=r"tokens have shape \(2, 4\) but the residual stream is \(1, 3\)"):
        MODEL(resid, "loss", start_at_layer=1, tokens=torch.zeros(2, 4, dtype=torch.long))


def test_bad_position_ids():
    with pytest.raises(InputError, match=r"position_ids must lie in \[0, 23\]"):
        MODEL(torch.zeros(1, 4, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 24]]))


def test_good_input_still_works_at_the_limits():
    assert MODEL(torch.full((1, 24), 49)).shape == (1, 24, 50)
    assert MODEL(torch.zeros(1, dtype=torch.long)).shape == (1, 1, 50)
