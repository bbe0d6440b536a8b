"""Head scores on repeated random tokens, checked on heads whose pattern we dictate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mechscope import Model, ModelConfig
from mechscope.toys.heads import attention_scores, best_head, repeated_tokens


@given(length=st.integers(2, 12), batch=st.integers(1, 4), bos=st.sampled_from([None, 0, 5]), seed=st.integers(0, 99))
def test_repeated_tokens_repeat_a_run_without_the_bos_token(length, batch, bos, seed):
    tokens = repeated_tokens(10, length, batch, torch.Generator().manual_seed(seed), bos=bos)
    offset = 0 if bos is None else 1
    assert tokens.shape == (batch, 2 * length + offset)
    first, second = tokens[:, offset : offset + length], tokens[:, offset + length :]
    assert torch.equal(first, second)
    if bos is not None:
        assert (tokens[:, 0] == bos).all() and not (tokens[:, 1:] == bos).any()


@pytest.mark.bad_input
def test_a_run_of_one_token_is_refused():
    with pytest.raises(ValueError, match="at least 2 tokens, got length=1"):
        repeated_tokens(10, 1, 1, torch.Generator())


def dictated(pattern_for_layer):
    """A tiny model whose layer patterns are replaced by hooks: a stripe we know the score of."""
    model = Model(ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=32, d_vocab=12, attn_only=True, d_mlp=0))

    def replace(layer):
        def hook(pattern, hook):
            return pattern_for_layer(layer, pattern)

        return hook

    return model, [(f"blocks.{layer}.attn.hook_pattern", replace(layer)) for layer in range(2)]


def stripe_pattern(pattern, offset):
    """Every query attends fully to ``query - offset`` (or to position 0 if that is before the start)."""
    seq = pattern.shape[-1]
    keys = (torch.arange(seq) - offset).clamp(min=0)
    return torch.nn.functional.one_hot(keys, seq).to(pattern.dtype).expand_as(pattern).clone()


@pytest.mark.parametrize("length", [4, 9])
def test_a_perfect_previous_token_head_and_induction_head_score_one(length):
    model, hooks = dictated(lambda layer, p: stripe_pattern(p, 1 if layer == 0 else length - 1))
    tokens = repeated_tokens(12, length, 3, torch.Generator().manual_seed(0), bos=0)
    with model.hooks(fwd_hooks=hooks):
        scores = attention_scores(model, tokens)
    assert scores["previous_token"][0].tolist() == [1.0, 1.0]
    assert scores["induction"][1].tolist() == [1.0, 1.0]
    assert scores["induction"][0].max() < 0.1 and scores["previous_token"][1].max() < 0.3
    assert best_head(scores["induction"])[:2] == (1, 0)
    assert best_head(scores["previous_token"], layer=0)[2] == 1.0


def test_a_duplicate_token_head_scores_one_on_its_own_stripe():
    length = 6
    model, hooks = dictated(lambda layer, p: stripe_pattern(p, length))
    tokens = repeated_tokens(12, length, 2, torch.Generator().manual_seed(1), bos=0)
    with model.hooks(fwd_hooks=hooks):
        scores = attention_scores(model, tokens)
    assert (scores["duplicate_token"] == 1.0).all() and (scores["induction"] == 0.0).all()
