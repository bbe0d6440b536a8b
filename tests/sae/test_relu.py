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


@given(shift=st.floats(-4, 0.5), batch=st.integers(1, 40), seed=st.integers(0, 1000), centred=st.booleans())
@settings(max_examples=15, deadline=None)
def test_the_sparse_training_path_equals_the_dense_one(shift, batch, seed, centred):
    """Through the active pairs alone (float64): the same loss terms, L0, firing and every gradient."""
    results = []
    for sparse_below in (0.0, 1.0):  # never sparse, always sparse
        sae = random_sae("relu", seed=seed, dtype="float64", l1_coefficient=0.3, apply_b_dec_to_input=centred)
        sae.sparse_below = sparse_below
        with torch.no_grad():
            sae.b_enc.add_(shift)  # from most latents active down to none
        x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        losses = sae.losses(x)
        losses.total.backward()
        results.append((losses, {name: p.grad.clone() for name, p in sae.named_parameters()}))
    (dense, dense_grads), (sparse, sparse_grads) = results
    for term in ("mse", "sparsity", "total", "l0"):
        torch.testing.assert_close(getattr(sparse, term), getattr(dense, term), rtol=1e-12, atol=1e-12)
    assert torch.equal(sparse.fired, dense.fired)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_the_sparse_path_is_taken_only_below_its_density():
    """A spy on ``reconstruct_active``: few active pairs take it, many do not."""
    sae = random_sae("relu")
    calls = []
    original = sae.reconstruct_active
    sae.reconstruct_active = lambda *args: calls.append(1) or original(*args)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    density = float((sae.encode(x) > 0).float().mean())
    sae.sparse_below = density * 0.9
    sae.losses(x)
    assert calls == []
    sae.sparse_below = density * 1.1
    sae.losses(x)
    assert calls == [1]
