"""JumpReLU: the forward definition, and straight-through gradients checked by finite differences."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.sae import JumpReLUSAE, build_sae
from mechscope.sae.jumprelu import jumprelu, smoothed_jumprelu, smoothed_step, step
from tests.sae import random_sae


def sample(seed: int, bandwidth: float, n: int = 40, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activations near their thresholds (many inside the window), none within 2% of a window edge."""
    generator = torch.Generator().manual_seed(seed)
    threshold = torch.rand(d, generator=generator, dtype=torch.float64) * 0.5 + 0.1
    offset = (torch.rand(n, d, generator=generator, dtype=torch.float64) - 0.5) * 3 * bandwidth
    edge = ((offset.abs() - bandwidth / 2).abs() < 0.02 * bandwidth) | (offset.abs() < 0.02 * bandwidth)
    offset = torch.where(edge, offset + 0.05 * bandwidth, offset)
    return threshold + offset, threshold


def finite_difference(fn, threshold: torch.Tensor, h: float) -> torch.Tensor:
    """Central differences of the scalar ``fn(θ)`` in each coordinate of θ."""
    grads = torch.zeros_like(threshold)
    for i in range(len(threshold)):
        step_i = torch.zeros_like(threshold)
        step_i[i] = h
        grads[i] = (fn(threshold + step_i) - fn(threshold - step_i)) / (2 * h)
    return grads


@given(seed=st.integers(0, 10_000), bandwidth=st.sampled_from([0.001, 0.01, 0.05]))
@settings(max_examples=15, deadline=None)
def test_jumprelu_threshold_gradient_is_that_of_the_smoothed_definition(seed, bandwidth):
    pre, threshold = sample(seed, bandwidth)
    weights = torch.randn(pre.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    theta = threshold.clone().requires_grad_(True)
    (weights * jumprelu(pre, theta, bandwidth)).sum().backward()
    numeric = finite_difference(
        lambda t: (weights * smoothed_jumprelu(pre, t, bandwidth)).sum(), threshold, 1e-3 * bandwidth
    )
    torch.testing.assert_close(theta.grad, numeric, rtol=1e-6, atol=1e-6)
    assert theta.grad.abs().sum() > 0  # some pre-activations were inside the window


@given(seed=st.integers(0, 10_000), bandwidth=st.sampled_from([0.001, 0.01, 0.05]))
@settings(max_examples=15, deadline=None)
def test_step_threshold_gradient_is_that_of_the_smoothed_definition(seed, bandwidth):
    pre, threshold = sample(seed, bandwidth)
    weights = torch.randn(pre.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    theta = threshold.clone().requires_grad_(True)
    pre = pre.clone().requires_grad_(True)
    (weights * step(pre, theta, bandwidth)).sum().backward()
    numeric = finite_difference(
        lambda t: (weights * smoothed_step(pre.detach(), t, bandwidth)).sum(), threshold, 1e-3 * bandwidth
    )
    torch.testing.assert_close(theta.grad, numeric, rtol=1e-6, atol=1e-6)
    assert pre.grad is None or not pre.grad.any()  # the L0 term trains only the threshold


def test_smoothed_definitions_agree_with_the_exact_ones_outside_the_window():
    pre, threshold = sample(0, 0.01)
    outside = (pre - threshold).abs() >= 0.005
    exact = pre * (pre > threshold)
    assert outside.any() and (~outside).any()
    torch.testing.assert_close(smoothed_jumprelu(pre, threshold, 0.01)[outside], exact[outside])
    torch.testing.assert_close(smoothed_step(pre, threshold, 0.01)[outside], (pre > threshold).double()[outside])


def test_jumprelu_forward_and_input_gradient():
    pre, threshold = sample(3, 0.01)
    pre = pre.clone().requires_grad_(True)
    weights = torch.randn(pre.shape, dtype=torch.float64)
    out = jumprelu(pre, threshold, 0.01)
    torch.testing.assert_close(out, torch.where(pre > threshold, pre, 0.0))
    (weights * out).sum().backward()
    torch.testing.assert_close(pre.grad, weights * (pre > threshold))


def test_sae_trains_log_threshold_through_the_chain_rule():
    sae = random_sae("jumprelu", jumprelu_bandwidth=0.2, l1_coefficient=0.3).double()
    assert isinstance(sae, JumpReLUSAE)
    x = torch.randn(32, 8, dtype=torch.float64)
    sae.losses(x).total.backward()
    theta = sae.log_threshold.detach().exp().requires_grad_(True)
    pre = sae.pre_activations(x).detach()
    latents = jumprelu(pre, theta, 0.2)
    mse = (latents @ sae.W_dec.detach() + sae.b_dec.detach() - x).pow(2).sum(-1).mean()
    (mse + 0.3 * step(pre, theta, 0.2).sum(-1).mean()).backward()
    torch.testing.assert_close(sae.log_threshold.grad, theta.grad * theta.detach())
    assert sae.log_threshold.grad.abs().sum() > 0


def test_sparsity_is_the_l0_count_times_the_coefficient():
    sae = random_sae("jumprelu", l1_coefficient=0.25)
    x = torch.randn(20, 8)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    active = pre > sae.log_threshold.exp()
    torch.testing.assert_close(sae.encode(x), torch.where(active, pre, 0.0))
    torch.testing.assert_close(sae.losses(x).sparsity, 0.25 * active.sum(-1).float().mean())


def test_thresholds_start_at_the_configured_value():
    sae = build_sae(random_sae("jumprelu", jumprelu_init_threshold=0.02).cfg)
    torch.testing.assert_close(sae.threshold, torch.full((32,), 0.02))
    torch.testing.assert_close(sae.log_threshold, torch.full((32,), math.log(0.02)))
