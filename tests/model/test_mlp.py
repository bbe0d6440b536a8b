"""The feed-forward layer, plain and gated, against its formula with HuggingFace's activation
functions; its hook points; and where a block feeds it from (sequential or parallel blocks)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.activations import ACT2FN

from mechscope import ModelConfig
from mechscope.model.mlp import ACTIVATIONS, MLP
from tests.conftest import random_model

activations = st.sampled_from(sorted(ACTIVATIONS))


def random_mlp(act_fn: str, gated: bool, bias: bool) -> MLP:
    cfg = ModelConfig(
        n_layers=1, d_model=8, n_heads=1, d_vocab=10, n_ctx=4, d_mlp=12, act_fn=act_fn, gated_mlp=gated, mlp_bias=bias
    )
    mlp = MLP(cfg)
    with torch.no_grad():
        for param in mlp.parameters():
            param.copy_(torch.randn_like(param))
    return mlp


def test_every_activation_matches_transformers():
    x = torch.linspace(-6, 6, 101)
    assert set(ACTIVATIONS) == {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu"}
    for name, fn in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](x), atol=1e-6, rtol=1e-6, msg=name)


@settings(max_examples=20, deadline=None)
@given(act_fn=activations, bias=st.booleans(), batch=st.integers(1, 3), length=st.integers(1, 6))
def test_gated_mlp_is_w_out_of_act_gate_times_linear(act_fn, bias, batch, length):
    mlp = random_mlp(act_fn, gated=True, bias=bias)
    x = torch.randn(batch, length, 8)
    act = ACT2FN[act_fn]
    b_in, b_gate, b_out = (0, 0, 0) if not bias else (mlp.b_in, mlp.b_gate, mlp.b_out)
    assert (mlp.b_gate is None) == (not bias)
    expected = (act(x @ mlp.W_gate + b_gate) * (x @ mlp.W_in + b_in)) @ mlp.W_out + b_out
    torch.testing.assert_close(mlp(x), expected, atol=1e-4, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(act_fn=activations, bias=st.booleans())
def test_plain_mlp_is_w_out_of_act_w_in(act_fn, bias):
    mlp = random_mlp(act_fn, gated=False, bias=bias)
    x = torch.randn(2, 5, 8)
    b_in, b_out = (0, 0) if not bias else (mlp.b_in, mlp.b_out)
    expected = ACT2FN[act_fn](x @ mlp.W_in + b_in) @ mlp.W_out + b_out
    torch.testing.assert_close(mlp(x), expected, atol=1e-4, rtol=1e-4)
    assert not hasattr(mlp, "W_gate") and not hasattr(mlp, "hook_pre_linear")


def test_gated_hooks_see_the_gate_the_linear_branch_and_the_neurons():
    model = random_model(gated_mlp=True, act_fn="silu", normalization="rmsnorm")
    assert "blocks.0.mlp.hook_pre_linear" in model.hook_dict
    assert "blocks.0.mlp.hook_pre_linear" not in random_model().hook_dict
    names = ["blocks.1.ln2.hook_normalized"] + [f"blocks.1.mlp.hook_{n}" for n in ("pre", "pre_linear", "post")]
    _, cache = model.run_with_cache(torch.randint(0, 50, (2, 5)), names_filter=names)
    mlp, x = model.blocks[1].mlp, cache[names[0]]
    gate, linear = cache["pre", 1], cache["pre_linear", 1]
    assert gate.shape == linear.shape == (2, 5, 128)
    torch.testing.assert_close(gate, x @ mlp.W_gate + mlp.b_gate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear, x @ mlp.W_in + mlp.b_in, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache["post", 1], torch.nn.functional.silu(gate) * linear, atol=1e-6, rtol=1e-6)


def test_patching_the_linear_branch_reaches_the_output():
    model = random_model(gated_mlp=True, act_fn="gelu")
    tokens = torch.randint(0, 50, (1, 4))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.2.hook_mlp_out")
    with model.hooks(fwd_hooks=[("blocks.2.mlp.hook_pre_linear", lambda x, hook: torch.zeros_like(x))]):
        _, patched = model.run_with_cache(tokens, names_filter="blocks.2.hook_mlp_out")
    mlp_out = patched["mlp_out", 2]
    torch.testing.assert_close(mlp_out, model.blocks[2].mlp.b_out.expand_as(mlp_out))
    assert not torch.allclose(cache["mlp_out", 2], mlp_out)


# ------------------------------------------------------------------ where the MLP reads from
@pytest.mark.parametrize("positional_embedding", ["learned", "rotary"])
def test_parallel_blocks_add_attention_and_mlp_read_from_the_same_stream(positional_embedding):
    model = random_model(parallel_attn_mlp=True, positional_embedding=positional_embedding)
    assert not any("hook_resid_mid" in name for name in model.hook_dict)
    tokens = torch.randint(0, 50, (2, 6))
    names = lambda n: "hook_resid" in n or n.endswith(("_out", "hook_mlp_in", "ln2.hook_normalized"))  # noqa: E731
    _, cache = model.run_with_cache(tokens, names_filter=names)
    for layer in range(3):
        resid_pre = cache["resid_pre", layer]
        expected = resid_pre + cache["attn_out", layer] + cache["mlp_out", layer]
        torch.testing.assert_close(cache["resid_post", layer], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(cache["mlp_in", layer], resid_pre)  # not resid_pre + attn_out
        torch.testing.assert_close(cache[f"blocks.{layer}.ln2.hook_normalized"], model.blocks[layer].ln2(resid_pre))
    sequential = random_model(positional_embedding=positional_embedding)
    sequential.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(sequential(tokens), model(tokens), atol=1e-4)


def test_attention_only_blocks_have_no_mlp_even_when_parallel():
    model = random_model(attn_only=True, parallel_attn_mlp=True)
    assert model.cfg.d_mlp == 0 and not model.cfg.has_mlp
    assert not any("mlp" in name for name in model.hook_dict)
    _, cache = model.run_with_cache(torch.randint(0, 50, (1, 4)))
    torch.testing.assert_close(cache["resid_post", 0], cache["resid_pre", 0] + cache["attn_out", 0])
