"""Greedy generation against HuggingFace's own greedy ``generate``, token for token, on tiny
random checkpoints of several families (learned positions, partial rotary with parallel
blocks, grouped-query attention, and Gemma 2's soft-capping with sliding windows), for a
single prompt and a left-padded batch, with and without mechscope's key-value cache."""

from __future__ import annotations

import pytest
import torch

from mechscope import Model
from tests.loading.zoo import VOCAB, save_variant

NEW_TOKENS = 10
FAMILIES = ["gpt2", "gpt_neox", "llama-gqa2", "gemma2-untied-capped"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    # Large random weights, so greedy decoding wanders instead of repeating one token.
    directory = save_variant(request.param, tmp_path_factory.mktemp(request.param), seed=3, noise=0.5)
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    return Model.from_pretrained(directory), hf


def hf_greedy(hf, tokens, mask):
    with torch.no_grad():
        return hf.generate(
            tokens,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )


def left_padded_batch():
    tokens = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return tokens.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("use_kv_cache", [True, False], ids=["cache", "no-cache"])
def test_greedy_single_prompt_matches_huggingface(pair, use_kv_cache):
    model, hf = pair
    tokens = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    ours = model.generate(tokens, NEW_TOKENS, use_kv_cache=use_kv_cache)
    assert ours.shape == (1, 7 + NEW_TOKENS)
    assert len(set(ours[0, 7:].tolist())) >= 4  # a varied continuation, so the comparison means something
    assert ours.tolist() == hf_greedy(hf, tokens, torch.ones_like(tokens)).tolist()


@pytest.mark.parametrize("use_kv_cache", [True, False], ids=["cache", "no-cache"])
def test_greedy_left_padded_batch_matches_huggingface(pair, use_kv_cache):
    model, hf = pair
    tokens, mask = left_padded_batch()
    ours = model.generate(tokens, NEW_TOKENS, attention_mask=mask, use_kv_cache=use_kv_cache)
    assert ours.tolist() == hf_greedy(hf, tokens, mask).tolist()
