from __future__ import annotations

import pytest
import torch

from mechscope.model.hooks import HookNameError
from tests.conftest import random_model


@pytest.fixture
def run():
    model = random_model()
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    logits, cache = model.run_with_cache(tokens)
    return model, tokens, logits, cache


def test_shorthand_keys(run):
    _model, _, _, cache = run
    assert cache["resid_pre", 1] is cache["blocks.1.hook_resid_pre"]
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["attn", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["resid_post", -1] is cache["blocks.2.hook_resid_post"]
    assert cache["q", -3] is cache["blocks.0.attn.hook_q"]
    assert cache["scale", 2, "ln1"] is cache["blocks.2.ln1.hook_scale"]
    assert cache["scale"] is cache["ln_final.hook_scale"]
    assert cache["pre", 1] is cache["blocks.1.mlp.hook_pre"]
    assert cache["embed"] is cache["hook_embed"]
    assert ("z", 2) in cache and ("result", 2) not in cache


def test_missing_and_unknown_keys_are_clear(run):
    _, _, _, cache = run
    with pytest.raises(HookNameError, match="was not cached"):
        cache["result", 0]
    with pytest.raises(HookNameError, match="closest valid names"):
        cache["blocks.0.hook_resid_prex"]
    with pytest.raises(IndexError):
        cache["resid_pre", -4]


def test_accumulated_resid(run):
    _model, _, _, cache = run
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    torch.testing.assert_close(stack[1], cache["resid_pre", 1])
    torch.testing.assert_close(stack[-1], cache["resid_post", 2])
    _mid, labels = cache.accumulated_resid(layer=1, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre"]
    _, labels = cache.accumulated_resid(layer=1, mlp_input=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "1_mid"]
    assert cache.accumulated_resid(pos_slice=-1).shape == (4, 2, 32)


@pytest.mark.parametrize("layer", [0, 1, 2, None])
def test_decompose_resid_sums_to_the_residual_stream(run, layer):
    _model, _, _, cache = run
    stack, labels = cache.decompose_resid(layer=layer, return_labels=True)
    target = cache["resid_post", -1] if layer is None else cache["resid_pre", layer]
    torch.testing.assert_close(stack.sum(0), target, atol=1e-5, rtol=0)
    assert labels[:2] == ["embed", "pos_embed"]
    if layer == 2:
        assert labels[2:] == ["0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]


def test_decompose_resid_mlp_input_sums_to_resid_mid(run):
    _, _, _, cache = run
    stack = cache.decompose_resid(layer=1, mlp_input=True)
    torch.testing.assert_close(stack.sum(0), cache["resid_mid", 1], atol=1e-5, rtol=0)
    attn_only = cache.decompose_resid(layer=2, mode="attn", incl_embeds=False)
    assert attn_only.shape[0] == 2


def test_stack_head_results_from_z_match_hook_result(run):
    model, tokens, _, cache = run
    _, with_result = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_result"))
    stack, labels = cache.stack_head_results(return_labels=True)
    assert labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    assert stack.shape == (12, 2, 7, 32)
    torch.testing.assert_close(stack[5], with_result["result", 1][:, :, 1], atol=1e-5, rtol=0)


def test_stack_head_results_with_remainder_sums_to_resid(run):
    _, _, _, cache = run
    stack = cache.stack_head_results(incl_remainder=True)
    torch.testing.assert_close(stack.sum(0), cache["resid_post", -1], atol=1e-5, rtol=0)


def test_apply_ln_to_stack_matches_the_model_norm(run):
    """With the norm's weight and bias applied afterwards, the scaled final stream is exactly
    the normalised stream the model computed."""
    model, _, _, cache = run
    final = cache.accumulated_resid(apply_ln=True)[-1]
    ln = model.ln_final
    torch.testing.assert_close(final * ln.w + ln.b, cache["ln_final.hook_normalized"], atol=1e-5, rtol=0)
    # the scale can also be recomputed when it was not cached
    _, partial = model.run_with_cache(torch.randint(0, 50, (2, 7)), names_filter="blocks.2.hook_resid_post")
    assert "ln_final.hook_scale" not in partial
    torch.testing.assert_close(
        partial.ln_scale(None), (partial["resid_post", 2].var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    )


def test_logit_attributions_sum_to_the_logit(run):
    model, tokens, logits, cache = run
    stack = cache.decompose_resid(pos_slice=-1)  # [component, batch, d_model]
    answer = tokens[:, 0]
    attrs = cache.logit_attrs(stack, answer, pos_slice=-1)
    assert attrs.shape == (stack.shape[0], 2)
    constant = model.ln_final.b @ model.W_U[:, answer]
    expected = logits[torch.arange(2), -1, answer]
    torch.testing.assert_close(attrs.sum(0) + constant, expected, atol=1e-4, rtol=0)


def test_logit_difference_attributions_sum_to_the_logit_difference(run):
    model, _tokens, logits, cache = run
    stack = cache.stack_head_results(incl_remainder=True, pos_slice=-1)
    attrs = cache.logit_attrs(stack, 3, incorrect_tokens=4, pos_slice=-1)
    constant = model.ln_final.b @ (model.W_U[:, 3] - model.W_U[:, 4])
    expected = logits[:, -1, 3] - logits[:, -1, 4]
    torch.testing.assert_close(attrs.sum(0) + constant, expected, atol=1e-4, rtol=0)


def test_holds_only_what_was_asked_and_counts_bytes(run):
    model, tokens, _, full = run
    _, small = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    assert len(small) == 1
    assert small.nbytes == 2 * 7 * 32 * 4
    assert full.nbytes > 20 * small.nbytes


def test_activations_are_detached(run):
    model, tokens, _, _ = run
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    assert not cache["resid_post", 0].requires_grad


def test_to_and_remove_batch_dim(run):
    model, tokens, _, cache = run
    moved = cache.to("cpu")
    assert moved["pattern", 1].device.type == "cpu"
    with pytest.raises(ValueError, match="batch of 1"):
        cache.remove_batch_dim()
    _, squeezed = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert not squeezed.has_batch_dim
    assert squeezed["resid_pre", 0].shape == (7, 32)
    assert squeezed["pattern", 0].shape == (4, 7, 7)
    stack = squeezed.decompose_resid()
    assert squeezed.apply_ln_to_stack(stack).shape == stack.shape


def test_cache_device_argument(run):
    model, tokens, _, _ = run
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed", device="cpu")
    assert cache["embed"].device.type == "cpu"


ARCHITECTURES = {
    "llama": dict(
        positional_embedding="rotary", normalization="rmsnorm", gated_mlp=True, act_fn="silu", n_key_value_heads=2
    ),
    "neox-parallel": dict(positional_embedding="rotary", rotary_dim=4, parallel_attn_mlp=True),
    "gemma2": dict(
        positional_embedding="rotary",
        normalization="rmsnorm",
        norm_weight_offset=1.0,
        post_norm=True,
        gated_mlp=True,
        embed_scale=32**0.5,
    ),
    "olmo2": dict(positional_embedding="rotary", normalization="rmsnorm", pre_norm=False, post_norm=True),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_decompositions_and_attributions_hold_for_other_architectures(arch):
    """Rotary, RMSNorm (with Gemma's offset), parallel blocks and post-norms: the residual
    decomposition still sums to the stream, the MLP input is what the MLP read, and the
    logit attributions (with the final norm's scale fixed) still sum to the logit."""
    model = random_model(**ARCHITECTURES[arch], unembed_bias=False)
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(cache.decompose_resid().sum(0), cache["resid_post", -1], atol=1e-5, rtol=0)
    mlp_in = cache.decompose_resid(layer=1, mlp_input=True).sum(0)
    expected_in = cache["resid_pre", 1] if arch == "neox-parallel" else cache["resid_mid", 1]
    torch.testing.assert_close(mlp_in, expected_in, atol=1e-5, rtol=0)
    assert (arch == "neox-parallel") == ("blocks.0.hook_resid_mid" not in model.hook_dict)
    _, labels = cache.accumulated_resid(layer=1, incl_mid=True, return_labels=True)
    assert labels == (["0_pre", "1_pre"] if arch == "neox-parallel" else ["0_pre", "0_mid", "1_pre"])
    stack = cache.decompose_resid(pos_slice=-1)
    attrs = cache.logit_attrs(stack, 5, incorrect_tokens=7, pos_slice=-1)
    constant = 0.0
    if hasattr(model.ln_final, "b"):
        constant = model.ln_final.b @ (model.W_U[:, 5] - model.W_U[:, 7])
    torch.testing.assert_close(attrs.sum(0) + constant, logits[:, -1, 5] - logits[:, -1, 7], atol=1e-4, rtol=0)
    # the norm's scale recomputed from the residual stream equals the one the model used
    _, partial = model.run_with_cache(tokens, names_filter="blocks.2.hook_resid_post")
    torch.testing.assert_close(partial.ln_scale(None), cache["ln_final.hook_scale"], atol=1e-5, rtol=1e-5)
