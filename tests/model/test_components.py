from __future__ import annotations

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.model.attention import attention_mask_from_padding, causal_mask
from mechscope.model.components import laid_out
from tests.conftest import random_model


def pattern_cached(model, tokens, **kwargs):
    """Logits computed with the explicit attention path (caching the pattern forces it)."""
    logits, _ = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"), **kwargs)
    return logits


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 24), seed=st.integers(0, 10_000))
def test_fused_and_explicit_attention_agree(batch, length, seed):
    model = random_model()
    tokens = torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), pattern_cached(model, tokens), atol=1e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 16), min_size=1, max_size=4), left=st.booleans())
def test_fused_and_explicit_attention_agree_with_padding(lengths, left):
    model = random_model()
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, width - n :] = 1
        else:
            mask[row, :n] = 1
    tokens = torch.randint(0, 50, mask.shape)
    with torch.no_grad():
        fused = model(tokens, attention_mask=mask)
        explicit = pattern_cached(model, tokens, attention_mask=mask)
    assert torch.isfinite(fused).all() and torch.isfinite(explicit).all()
    real = mask.bool()
    torch.testing.assert_close(fused[real], explicit[real], atol=1e-5, rtol=0)


def test_layernorm_fused_and_explicit_agree():
    model = random_model()
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        fused = model(tokens)
        explicit, cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_scale" in n)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    assert cache["scale"].shape == (2, 9, 1)
    assert (cache["scale"] > 0).all()


def test_pattern_is_causal_and_normalised():
    model = random_model()
    _, cache = model.run_with_cache(torch.randint(0, 50, (2, 10)), names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["pattern", 0]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 10))
    assert (pattern.triu(diagonal=1) == 0).all()


def test_padding_keys_get_no_attention():
    model = random_model()
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    _, cache = model.run_with_cache(
        torch.randint(0, 50, (2, 5)), attention_mask=mask, names_filter="blocks.1.attn.hook_pattern"
    )
    pattern = cache["pattern", 1]
    assert (pattern[0, :, 2:, :2] == 0).all()


def test_causal_mask_with_fewer_queries_than_keys():
    mask = causal_mask(2, 4, torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_padding_mask_keeps_the_diagonal():
    mask = attention_mask_from_padding(torch.tensor([[0, 1, 1]]))
    assert mask.shape == (1, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 0, 1)])
def test_laid_out_parameters_index_and_store_as_promised(order):
    shape = (2, 3, 4)
    param = laid_out(shape, order, torch.float32)
    assert param.shape == shape
    storage_shape = [shape[i] for i in order]
    assert param.permute(*order).is_contiguous()
    assert list(param.permute(*order).shape) == storage_shape


def test_query_weights_flatten_without_a_copy():
    model = random_model()
    W_Q = model.blocks[0].attn.W_Q
    flat = rearrange(W_Q, "head d_model d_head -> d_model (head d_head)")
    assert flat.data_ptr() == W_Q.data_ptr() and flat.is_contiguous()


def test_replacing_the_norm_scale_changes_the_output():
    """The scale is read off the fused kernel, but a hook that replaces it is honoured."""
    model = random_model()
    tokens = torch.randint(0, 50, (2, 6))
    doubled = model.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_scale", lambda s, h: s * 2)])
    _, cache = model.run_with_cache(tokens, names_filter=["ln_final.hook_normalized", "blocks.2.hook_resid_post"])
    resid = cache["resid_post", 2]
    ln = model.ln_final
    centred = resid - resid.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    torch.testing.assert_close(cache["ln_final.hook_normalized"], centred / scale * ln.w + ln.b, atol=1e-5, rtol=0)
    expected = model.unembed(centred / (2 * scale) * ln.w + ln.b)
    torch.testing.assert_close(doubled, expected, atol=1e-5, rtol=0)
