"""Transcoders: an SAE's encoder, a decoder into another hook's space, and a separate target."""

from __future__ import annotations

import pytest
import torch

from mechscope.sae import SAEConfig, SAEError, Transcoder, build_sae, transcoder_config
from mechscope.sae.base import ARCHITECTURES, TRANSCODERS, sae_class
from mechscope.sae.jumprelu import JumpReLUSAE
from mechscope.sae.relu import ReLUSAE
from mechscope.sae.topk import BatchTopKSAE, TopKSAE
from tests.sae import random_sae

PLAIN = {"relu": ReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_build_makes_a_transcoder_of_each_architecture(architecture):
    sae = random_sae(architecture, d_out=5)
    assert isinstance(sae, Transcoder) and isinstance(sae, PLAIN[architecture])
    assert type(sae) is TRANSCODERS[architecture] is sae_class(sae.cfg)
    assert sae.cfg.is_transcoder and sae.cfg.output_hook_name == "blocks.1.hook_mlp_out"
    assert sae.W_enc.shape == (8, 32) and sae.W_dec.shape == (32, 5) and sae.b_dec.shape == (5,)
    fresh = build_sae(sae.cfg)
    torch.testing.assert_close(fresh.W_dec.norm(dim=-1), torch.ones(32))
    torch.testing.assert_close(fresh.W_enc.norm(dim=0), torch.ones(32))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_input_is_not_centred_by_b_dec(architecture):
    sae = random_sae(architecture, d_out=5).eval()
    x = torch.randn(6, 8)
    torch.testing.assert_close(sae.pre_activations(x), x @ sae.W_enc + sae.b_enc)
    before = sae.encode(x)
    with torch.no_grad():
        sae.b_dec.add_(1.0)
    torch.testing.assert_close(sae.encode(x), before)
    assert sae(x).shape == (6, 5)
    torch.testing.assert_close(sae.decode_sparse(sae.encode_sparse(x)), sae.decode(sae.encode(x)))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_losses_compare_the_prediction_with_the_target(architecture):
    sae = random_sae(architecture, d_out=5).eval()
    x, y = torch.randn(7, 8), torch.randn(7, 5)
    losses = sae.losses(x, y)
    torch.testing.assert_close(losses.mse, (sae(x) - y).pow(2).sum(-1).mean())
    torch.testing.assert_close(losses.total, losses.mse + losses.sparsity + losses.aux)


def test_a_transcoder_learns_a_map_between_hooks():
    sae = random_sae("topk", d_out=5, k=8)
    x = torch.randn(128, 8)
    y = torch.relu(x @ torch.randn(8, 5))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = float(sae.losses(x, y).mse.detach())
    for _ in range(40):
        optimizer.zero_grad()
        sae.losses(x, y).total.backward()
        optimizer.step()
        sae.normalize_decoder()
    assert float(sae.losses(x, y).mse.detach()) < 0.5 * first


def test_same_width_transcoder():
    sae = random_sae("relu", d_out=8)
    assert isinstance(sae, Transcoder)
    x = torch.randn(3, 8)
    torch.testing.assert_close(sae.pre_activations(x), x @ sae.W_enc + sae.b_enc)


@pytest.mark.bad_input
def test_transcoder_errors_are_named():
    sae = random_sae("relu", d_out=5)
    with pytest.raises(SAEError, match="target"):
        sae.losses(torch.randn(3, 8))
    with pytest.raises(SAEError, match="d_out=5"):
        sae.losses(torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(SAEError, match="apply_b_dec_to_input"):
        SAEConfig(
            d_in=8,
            d_sae=16,
            architecture="relu",
            hook_name="blocks.0.hook_mlp_in",
            hook_layer=0,
            output_hook_name="blocks.0.hook_mlp_out",
        )
    with pytest.raises(SAEError, match="d_out"):
        SAEConfig(d_in=8, d_sae=16, architecture="relu", hook_name="blocks.0.hook_mlp_in", hook_layer=0, d_out=4)
    with pytest.raises(SAEError, match="k"):
        transcoder_config(
            d_in=8,
            d_out=4,
            d_sae=16,
            architecture="topk",
            hook_name="blocks.0.hook_mlp_in",
            output_hook_name="blocks.0.hook_mlp_out",
            hook_layer=0,
        )
