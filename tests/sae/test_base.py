"""The shared SAE interface: config validation, initialisation, registry, sparse/dense agreement."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.sae import SAE, SAEConfig, SAEError, SparseLatents, build_sae
from mechscope.sae.base import ARCHITECTURES, SAES, sae_class
from tests.sae import random_sae

BASE = {"d_in": 8, "d_sae": 32, "architecture": "relu", "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1}


def config(**overrides) -> SAEConfig:
    return SAEConfig(**{**BASE, **overrides})


@given(
    d_in=st.integers(1, 64),
    d_sae=st.integers(1, 256),
    architecture=st.sampled_from(ARCHITECTURES),
    layer=st.integers(0, 40),
    dtype=st.sampled_from(["float32", "float64", "bfloat16"]),
    coefficient=st.floats(0, 100),
)
@settings(max_examples=15, deadline=None)
def test_config_round_trips_through_dict(d_in, d_sae, architecture, layer, dtype, coefficient):
    k = max(1, d_sae // 3) if architecture in ("topk", "batchtopk") else None
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=architecture,
        hook_name=f"blocks.{layer}.hook_resid_pre",
        hook_layer=layer,
        k=k,
        dtype=dtype,
        l1_coefficient=coefficient,
    )
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.d_out == d_in and not cfg.is_transcoder


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"d_in": 0}, "d_in"),
        ({"d_sae": -3}, "d_sae"),
        ({"d_in": 4.0}, "d_in"),
        ({"d_in": True}, "d_in"),
        ({"d_in": None}, "d_in"),
        ({"d_sae": None}, "d_sae"),
        ({"hook_layer": None}, "hook_layer"),
        ({"architecture": "gated"}, "architecture"),
        ({"architecture": "topk"}, "k"),
        ({"architecture": "topk", "k": 33}, "k"),
        ({"architecture": "batchtopk", "k": 0}, "k"),
        ({"hook_layer": -1, "hook_name": "hook_embed"}, "hook_layer"),
        ({"hook_layer": 2}, "hook_layer"),
        ({"l1_coefficient": -1.0}, "l1_coefficient"),
        ({"l1_coefficient": float("nan")}, "l1_coefficient"),
        ({"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"jumprelu_init_threshold": -0.1}, "jumprelu_init_threshold"),
        ({"dtype": "int8"}, "dtype"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations"),
        ({"aux_k": 0}, "aux_k"),
        ({"topk_threshold_lr": 0.0}, "topk_threshold_lr"),
        ({"d_out": 5}, "d_out"),
        ({"output_hook_name": "blocks.1.hook_mlp_out"}, "apply_b_dec_to_input"),
        ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input"),
        ({"hook_name": 3}, "hook_name"),
    ],
)
def test_bad_config_fields_are_named(overrides, named):
    with pytest.raises(SAEError, match=named):
        config(**overrides)


@pytest.mark.bad_input
def test_from_dict_names_unknown_and_missing_keys():
    with pytest.raises(SAEError, match="widht"):
        SAEConfig.from_dict({**BASE, "widht": 3})
    with pytest.raises(SAEError, match="hook_layer"):
        SAEConfig.from_dict({k: v for k, v in BASE.items() if k != "hook_layer"})
    with pytest.raises(SAEError, match="dict"):
        SAEConfig.from_dict([("d_in", 3)])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_build_initialises_as_specified(architecture):
    cfg = config(architecture=architecture, k=4 if "topk" in architecture else None)
    sae = build_sae(cfg, seed=3)
    assert type(sae) is SAES[architecture] is sae_class(cfg) and sae.architecture == architecture
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(cfg.d_sae))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert torch.equal(build_sae(cfg, seed=3).W_dec, sae.W_dec)
    assert not torch.equal(build_sae(cfg, seed=4).W_dec, sae.W_dec)


def test_build_honours_dtype():
    sae = build_sae(config(dtype="float64"))
    assert all(p.dtype == torch.float64 for p in sae.parameters())
    assert sae.encode(torch.randn(3, 8)).dtype == torch.float64  # inputs are cast to the SAE's dtype


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_encode_follows_the_affine_map_and_leading_dims(architecture):
    sae = random_sae(architecture).eval()
    x = torch.randn(2, 3, 8)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.pre_activations(x), pre)
    torch.testing.assert_close(sae.encode(x), sae.encode(x.reshape(6, 8)).reshape(2, 3, 32))
    torch.testing.assert_close(sae.decode(sae.encode(x)), sae.encode(x) @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@given(batch=st.integers(1, 9), seed=st.integers(0, 1000))
@settings(max_examples=8, deadline=None)
def test_sparse_and_dense_paths_agree(architecture, batch, seed):
    sae = random_sae(architecture, seed=seed).eval()
    x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed)) * 2
    dense = sae.encode(x)
    sparse = sae.encode_sparse(x)
    assert sparse.indices.shape == sparse.values.shape and sparse.indices.shape[0] == batch
    torch.testing.assert_close(sparse.to_dense(32), dense)
    torch.testing.assert_close(sae.decode_sparse(sparse), sae.decode(dense))
    torch.testing.assert_close(sae(x), sae.decode(dense))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_losses_match_an_independent_computation(architecture):
    sae = random_sae(architecture).eval()  # eval: batchtopk uses its (fixed) threshold, like encode
    x = torch.randn(10, 8)
    losses = sae.losses(x)
    latents = sae.encode(x)
    torch.testing.assert_close(losses.mse, (sae.decode(latents) - x).pow(2).sum(-1).mean())
    torch.testing.assert_close(losses.total, losses.mse + losses.sparsity + losses.aux)
    assert torch.equal(losses.l0, (latents != 0).sum(-1).float())
    assert torch.equal(losses.fired, (latents != 0).any(0))
    assert losses.aux == 0  # no dead mask given


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_normalize_decoder_gives_unit_rows(architecture):
    sae = random_sae(architecture)
    assert not torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(32))
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))


def test_sparse_latents_to_dense():
    sparse = SparseLatents(torch.tensor([[3, 0], [1, 2]]), torch.tensor([[1.5, 2.0], [0.0, -1.0]]))
    expected = torch.tensor([[2.0, 0, 0, 1.5], [0, 0, -1.0, 0]])
    assert torch.equal(sparse.to_dense(4), expected)


def test_losses_backpropagate_to_every_weight():
    sae = random_sae("relu")
    sae.losses(torch.randn(6, 8)).total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sae.parameters())


@pytest.mark.bad_input
def test_bad_inputs_are_named():
    sae = random_sae("relu")
    with pytest.raises(SAEError, match="d_in=8"):
        sae.encode(torch.randn(3, 7))
    with pytest.raises(SAEError, match="d_in=8"):
        sae.encode(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(SAEError, match="d_sae=32"):
        sae.decode(torch.randn(3, 31))
    with pytest.raises(SAEError, match="d_sae=32"):
        sae.decode_sparse(SparseLatents(torch.tensor([[32]]), torch.tensor([[1.0]])))
    with pytest.raises(SAEError, match="long"):
        sae.decode_sparse(SparseLatents(torch.tensor([[1.0]]), torch.tensor([[1.0]])))
    with pytest.raises(SAEError, match="dead_mask"):
        sae.losses(torch.randn(3, 8), dead_mask=torch.ones(31, dtype=torch.bool))
    with pytest.raises(SAEError, match="dead_mask"):
        sae.losses(torch.randn(3, 8), dead_mask=torch.ones(32))
    with pytest.raises(SAEError, match="target"):
        sae.losses(torch.randn(3, 8), torch.randn(4, 8))
    with pytest.raises(SAEError, match="0 examples"):
        sae.losses(torch.randn(0, 8))


def test_centring_keeps_float32_precision_under_a_large_offset():
    """``(x - b_dec) @ W_enc`` as SAELens orders it: folding ``b_dec @ W_enc`` into the bias instead
    subtracts two numbers of the offset's size, losing precision in proportion to it."""
    generator = torch.Generator().manual_seed(0)
    sae = build_sae(config(d_in=256, d_sae=512), seed=0)
    offset = torch.randn(256, generator=generator) * 3000 / 16  # norm about 3,000, like GPT-2's outlier dimensions
    x = offset + torch.randn(64, 256, generator=generator)
    with torch.no_grad():
        sae.b_dec.copy_(offset)
        sae.b_enc.normal_(generator=generator)
    exact = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    folded = x @ sae.W_enc + (sae.b_enc - sae.b_dec @ sae.W_enc)
    ours = sae.pre_activations(x)
    assert (ours.double() - exact).abs().max() < 1e-4 < (folded.double() - exact).abs().max()


def test_base_class_has_no_activation():
    with pytest.raises(NotImplementedError):
        SAE(config()).encode(torch.randn(2, 8))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@given(factor=st.floats(0.01, 100), seed=st.integers(0, 1000), centred=st.booleans())
@settings(max_examples=8, deadline=None)
def test_folding_a_scaling_factor_takes_raw_activations(architecture, factor, seed, centred):
    """SAE(f·x) / f before the fold equals SAE(x) after it, with the same latents (SAELens' fold)."""
    sae = random_sae(architecture, seed=seed, dtype="float64", apply_b_dec_to_input=centred)
    sae.cfg.normalize_activations = "expected_average_only_in"
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    latents, output = sae.encode(factor * x), sae(factor * x) / factor
    sae.fold_activation_norm_scaling_factor(factor)
    torch.testing.assert_close(sae.encode(x), latents, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sae(x), output, rtol=1e-9, atol=1e-9)
    assert sae.cfg.normalize_activations == "none"
