"""ReLU SAE: ReLU latents and the decoder-norm-weighted L1 penalty."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.sae import ReLUSAE
from tests.sae import random_sae


def test_latents_are_relu_of_the_pre_activations():
    sae = random_sae("relu")
    assert isinstance(sae, ReLUSAE)
    x = torch.randn(7, 8)
    latents = sae.encode(x)
    torch.testing.assert_close(latents, ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).clamp_min(0))
    assert (latents == 0).any() and (latents > 0).any()


@given(coefficient=st.floats(0, 10), seed=st.integers(0, 100))
@settings(max_examples=15, deadline=None)
def test_sparsity_is_l1_weighted_by_decoder_norms(coefficient, seed):
    sae = random_sae("relu", seed=seed, l1_coefficient=coefficient)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
    latents = sae.encode(x).detach()
    norms = torch.stack([row.norm() for row in sae.W_dec.detach()])
    expected = coefficient * sum(float(latents[b] @ norms) for b in range(5)) / 5
    torch.testing.assert_close(sae.losses(x).sparsity, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_folding_decoder_norms_keeps_the_function_and_the_penalty():
    sae = random_sae("relu", l1_coefficient=0.7)
    x = torch.randn(9, 8)
    before_out, before = sae(x), sae.losses(x)
    sae.fold_decoder_norms()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))
    torch.testing.assert_close(sae(x), before_out)
    after = sae.losses(x)
    torch.testing.assert_close(after.sparsity, before.sparsity)
    torch.testing.assert_close(after.mse, before.mse)


def test_normalize_decoder_is_a_no_op():
    sae = random_sae("relu")
    W_dec = sae.W_dec.detach().clone()
    sae.normalize_decoder()
    assert torch.equal(sae.W_dec, W_dec)


def test_training_steps_lower_the_loss():
    sae = random_sae("relu", l1_coefficient=0.01)
    x = torch.randn(64, 8)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = float(sae.losses(x).total.detach())
    for _ in range(30):
        optimizer.zero_grad()
        sae.losses(x).total.backward()
        optimizer.step()
    assert float(sae.losses(x).total.detach()) < first
