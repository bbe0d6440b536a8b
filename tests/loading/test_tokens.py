from __future__ import annotations

import pytest
import torch

from mechscope.loading.tokens import TokenizerError
from mechscope.model.inputs import InputError
from tests.conftest import random_model

PROMPT = "When Mary and John went to the store, John gave a bag to"


def test_to_tokens_prepends_bos_once(model):
    bos = model.tokenizer.bos_token_id
    tokens = model.to_tokens(PROMPT)
    assert tokens.shape[0] == 1 and tokens[0, 0] == bos and (tokens[0, 1:] != bos).all()
    without = model.to_tokens(PROMPT, prepend_bos=False)
    torch.testing.assert_close(without, tokens[:, 1:])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_side_and_mask(model, side):
    tokens, mask = model.to_tokens([PROMPT, " Mary"], padding_side=side, return_attention_mask=True)
    assert tokens.shape == mask.shape
    lengths = mask.sum(-1)
    assert lengths[0] == tokens.shape[1] and lengths[1] == 2  # BOS + " Mary"
    assert mask[1, 0 if side == "right" else -1] == 1
    assert mask[1, -1 if side == "right" else 0] == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_text_batches_give_the_logits_of_single_prompts(model, side):
    logits = model([PROMPT, "Mary gave"], padding_side=side)
    alone = model("Mary gave")
    real = model.to_tokens([PROMPT, "Mary gave"], padding_side=side, return_attention_mask=True)[1][1].bool()
    torch.testing.assert_close(logits[1, real], alone[0], atol=1e-5, rtol=0)


def test_round_trips(model):
    tokens = model.to_tokens(PROMPT, prepend_bos=False)
    assert model.to_string(tokens[0]) == PROMPT
    assert model.to_string(tokens) == [PROMPT]
    pieces = model.to_str_tokens(PROMPT)
    assert pieces[0] == "<|endoftext|>" and "".join(pieces[1:]) == PROMPT
    assert model.to_str_tokens(tokens[0]) == pieces[1:]
    assert model.to_str_tokens([PROMPT, " Mary"])[1] == ["<|endoftext|>", " Mary"]


def test_to_single_token(model):
    token = model.to_single_token(" Mary")
    assert model.to_string([token]) == " Mary"
    with pytest.raises(TokenizerError, match="not one"):
        model.to_single_token("When Mary and John")


def test_too_long_text_is_refused_or_truncated(model):
    text = " ".join(["Mary"] * 100)
    with pytest.raises(InputError, match="exceeds the model's context of n_ctx=64"):
        model(text)
    assert model.to_tokens(text, truncate=True).shape[1] == 64


def test_models_without_tokenizer_say_so():
    from mechscope import Model

    model = Model(random_model().cfg)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        model.to_tokens("hello")


@pytest.mark.bad_input
def test_bad_padding_side(model):
    with pytest.raises(TokenizerError, match="padding_side"):
        model.to_tokens(["a", "b c"], padding_side="middle")
    with pytest.raises(TokenizerError, match="no text"):
        model.to_tokens([])
