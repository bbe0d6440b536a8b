"""Normalisation: RMSNorm against its formula and HuggingFace's Llama and Gemma norms, LayerNorm
against its formula, the hooks on the scale, and where blocks put their norms (pre, post, none)."""

from __future__ import annotations

import pytest
import torch
from einops import einsum
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mechscope import ModelConfig
from mechscope.model.norms import LayerNorm, RMSNorm, make_norm
from tests.conftest import random_model


def norm_config(d: int = 16, **overrides) -> ModelConfig:
    return ModelConfig(**{"n_layers": 1, "d_model": d, "n_heads": 1, "d_vocab": 10, "n_ctx": 8, **overrides})


def rms_reference(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * (offset + w)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 24),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    eps=st.sampled_from([1e-6, 1e-5, 1e-2]),
    offset=st.sampled_from([0.0, 1.0]),
    magnitude=st.sampled_from([1e-3, 1.0, 100.0]),
)
def test_rmsnorm_matches_its_formula_and_records_its_scale(d, lead, eps, offset, magnitude):
    norm = RMSNorm(norm_config(eps=eps, norm_weight_offset=offset), d)
    with torch.no_grad():
        norm.w.copy_(torch.randn(d))
    x = torch.randn(*lead, d) * magnitude
    seen = {}
    handle = norm.hook_scale.add_hook(lambda s, hook: seen.setdefault("scale", s))
    out = norm(x)
    handle.remove()
    torch.testing.assert_close(out, rms_reference(x, norm.w, eps, offset), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["scale"], torch.sqrt((x**2).mean(-1, keepdim=True) + eps))
    assert torch.equal(norm(x), out)  # the unhooked path computes the same


@settings(max_examples=15, deadline=None)
@given(d=st.integers(1, 24), eps=st.sampled_from([1e-6, 1e-5]))
def test_rmsnorm_matches_llama_and_gemma(d, eps):
    """Llama multiplies by w; Gemma stores w around zero and multiplies by 1 + w."""
    x, w = torch.randn(3, 5, d), torch.randn(d)
    for offset, hf in ((0.0, LlamaRMSNorm(d, eps=eps)), (1.0, GemmaRMSNorm(d, eps=eps))):
        ours = RMSNorm(norm_config(eps=eps, norm_weight_offset=offset), d)
        with torch.no_grad():
            ours.w.copy_(w)
            hf.weight.copy_(w)
            torch.testing.assert_close(ours(x), hf(x), atol=1e-6, rtol=1e-6)


def test_half_precision_rmsnorm_matches_gemma_exactly():
    """Computed in float32 and rounded once, as Gemma does, with the raw half-precision weight."""
    x, w = torch.randn(4, 7, 16).bfloat16(), (torch.randn(16) * 0.1).bfloat16()
    ours = RMSNorm(norm_config(norm_weight_offset=1.0, dtype=torch.bfloat16, eps=1e-6), 16)
    hf = GemmaRMSNorm(16, eps=1e-6).bfloat16()
    with torch.no_grad():
        ours.w.copy_(w)
        hf.weight.copy_(w)
        out = ours(x)
        assert out.dtype == torch.bfloat16 and ours.w.dtype == torch.bfloat16
        assert torch.equal(out, hf(x))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_a_fresh_rmsnorm_only_divides_by_the_rms(offset):
    norm = RMSNorm(norm_config(norm_weight_offset=offset), 16)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(norm(x), rms_reference(x, torch.ones(16), 1e-5, 0.0))
    with torch.no_grad():
        norm.w.add_(3.0)
    norm.reset_parameters()
    torch.testing.assert_close(norm.w + offset, torch.ones(16))


def test_replacing_the_rms_scale_is_honoured():
    norm = RMSNorm(norm_config(), 16)
    x = torch.randn(2, 3, 16)
    handle = norm.hook_scale.add_hook(lambda s, hook: s * 2)
    doubled = norm(x)
    handle.remove()
    torch.testing.assert_close(doubled, norm(x) / 2)


@settings(max_examples=15, deadline=None)
@given(d=st.integers(2, 24), eps=st.sampled_from([1e-5, 1e-2]), hooked=st.booleans())
def test_layernorm_matches_its_formula(d, eps, hooked):
    norm = LayerNorm(norm_config(eps=eps), d)
    with torch.no_grad():
        norm.w.copy_(torch.randn(d))
        norm.b.copy_(torch.randn(d))
    x = torch.randn(3, 4, d) * 5 + 2
    seen = {}
    handle = norm.hook_scale.add_hook(lambda s, hook: seen.setdefault("scale", s)) if hooked else None
    out = norm(x)
    centred = x - x.mean(-1, keepdim=True)
    scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(out, centred / scale * norm.w + norm.b, atol=1e-5, rtol=1e-5)
    if handle is not None:
        handle.remove()
        torch.testing.assert_close(seen["scale"], scale)


def test_make_norm_builds_the_configured_kind():
    assert isinstance(make_norm(norm_config()), LayerNorm)
    assert isinstance(make_norm(norm_config(normalization="rmsnorm"), 8), RMSNorm)
    assert make_norm(norm_config(normalization="rmsnorm"), 8).w.shape == (8,)
    assert isinstance(make_norm(norm_config(normalization="none")), nn.Identity)


def test_models_without_norms_have_no_norm_hooks_and_rmsnorm_models_no_shift():
    bare = random_model(normalization="none")
    assert not any("ln" in name for name in bare.hook_dict)
    assert not any("ln" in name for name, _ in bare.named_parameters())
    rms = random_model(normalization="rmsnorm")
    assert "blocks.0.ln1.hook_scale" in rms.hook_dict
    assert not any(name.endswith(".b") for name, _ in rms.named_parameters())
    tokens = torch.randint(0, 50, (2, 5))
    _, cache = rms.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre", "blocks.1.ln1.hook_normalized"])
    ln1 = rms.blocks[1].ln1
    expected = rms_reference(cache["resid_pre", 1], ln1.w, ln1.eps, 0.0)
    torch.testing.assert_close(cache["blocks.1.ln1.hook_normalized"], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ where blocks put their norms
@pytest.mark.parametrize("pre_norm", [True, False], ids=["gemma2", "olmo2"])
def test_post_norms_apply_to_each_sublayer_output(pre_norm):
    """attn_out / mlp_out are the post-normed outputs; without pre-norms the sublayers read the
    residual stream itself."""
    model = random_model(normalization="rmsnorm", post_norm=True, pre_norm=pre_norm, gated_mlp=True, act_fn="silu")
    block = model.blocks[1]
    assert isinstance(block.ln1_post, RMSNorm) and isinstance(block.ln2_post, RMSNorm)
    assert isinstance(block.ln1, RMSNorm) == pre_norm and isinstance(block.ln2, RMSNorm) == pre_norm
    assert ("blocks.1.ln1_post.hook_scale" in model.hook_dict) and ("blocks.1.ln2_post.hook_scale" in model.hook_dict)
    _, cache = model.run_with_cache(torch.randint(0, 50, (2, 6)))
    attn = block.attn
    raw_attn = einsum(cache["z", 1], attn.W_O, "b p h e, h e d -> b p d") + attn.b_O
    torch.testing.assert_close(cache["attn_out", 1], block.ln1_post(raw_attn), atol=1e-5, rtol=1e-5)
    mlp = block.mlp
    raw_mlp = cache["post", 1] @ mlp.W_out + mlp.b_out
    torch.testing.assert_close(cache["mlp_out", 1], block.ln2_post(raw_mlp), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache["resid_mid", 1], cache["resid_pre", 1] + cache["attn_out", 1])
    torch.testing.assert_close(cache["resid_post", 1], cache["resid_mid", 1] + cache["mlp_out", 1])
    attn_input = block.ln1(cache["resid_pre", 1]) if pre_norm else cache["resid_pre", 1]
    expected_q = einsum(attn_input, attn.W_Q, "b p d, h d e -> b p h e") + attn.b_Q
    torch.testing.assert_close(cache["q", 1], expected_q, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cache["attn_out", 1], raw_attn, atol=1e-3)  # the post-norm did something


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_scale_multiplies_the_token_embedding_rounded_to_its_dtype(dtype):
    model = random_model(embed_scale=32**0.5, dtype=dtype)
    tokens = torch.randint(0, 50, (2, 5))
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
    scale = torch.tensor(32**0.5).to(dtype)  # Gemma: sqrt(d_model) in the weights' dtype
    assert torch.equal(cache["hook_embed"], model.W_E[tokens] * scale)
    _, unscaled = random_model(dtype=dtype).run_with_cache(tokens, names_filter="hook_embed")
    assert not torch.allclose(cache["hook_embed"].float(), unscaled["hook_embed"].float())
