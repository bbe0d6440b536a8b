"""JumpReLU SAE with straight-through threshold gradients (Rajamanoharan et al. 2024, "Jumping Ahead").

    f_i = pre_i · H(pre_i - θ_i),   θ = exp(log_threshold),   loss = ||x̂ - x||² + λ Σ_i H(pre_i - θ_i)

The step H has zero derivative in θ almost everywhere, so θ would never learn. The paper's
straight-through estimators replace ∂/∂θ by a kernel density estimate with a rectangle kernel
K(u) = 1[|u| < 1/2] of bandwidth ε:

    ∂/∂θ H(z - θ)     ≈ -(1/ε) K((z - θ)/ε)
    ∂/∂θ z·H(z - θ)   ≈ -(θ/ε) K((z - θ)/ε)

These are the exact θ-derivatives of the smoothed functions ``smoothed_step`` and
``smoothed_jumprelu`` below (the jump spread over a window of width ε), which is what the tests
check by finite differences. Gradients to ``pre`` are the true ones (H(z - θ) for the output,
none for the L0 term), as in the paper.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.sae.base import SAE, Reconstruction, SAEConfig, dense_reconstruction, register


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel 1[|u| < 1/2]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to_threshold(grad: Tensor) -> Tensor:
    """Sum a [..., d_sae] gradient over the leading dims (θ is shared by every example)."""
    return grad.reshape(-1, grad.shape[-1]).sum(0)


class _Thresholded(torch.autograd.Function):
    """What both functions keep for their straight-through backward: the inputs and the bandwidth."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, float], output: Tensor) -> None:
        pre, threshold, bandwidth = inputs
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth


class _JumpReLU(_Thresholded):
    @staticmethod
    def forward(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        window = rectangle((pre - threshold) / ctx.bandwidth)
        grad_threshold = _sum_to_threshold(-(threshold / ctx.bandwidth) * window * grad)
        return (pre > threshold).to(grad.dtype) * grad, grad_threshold, None


class _Step(_Thresholded):
    @staticmethod
    def forward(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        window = rectangle((pre - threshold) / ctx.bandwidth)
        return None, _sum_to_threshold(-(1.0 / ctx.bandwidth) * window * grad), None


def jumprelu(
    pre: Float[Tensor, "*batch d_sae"], threshold: Float[Tensor, " d_sae"], bandwidth: float
) -> Float[Tensor, "*batch d_sae"]:
    """``pre · H(pre - θ)`` with the straight-through θ-gradient of bandwidth ``bandwidth``."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(
    pre: Float[Tensor, "*batch d_sae"], threshold: Float[Tensor, " d_sae"], bandwidth: float
) -> Float[Tensor, "*batch d_sae"]:
    """``H(pre - θ)`` with the straight-through θ-gradient (for the L0 penalty)."""
    return _Step.apply(pre, threshold, bandwidth)


def smoothed_step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(pre - θ) with the jump spread linearly over |pre - θ| < ε/2: its θ-derivative is the STE's."""
    return ((pre - threshold) / bandwidth + 0.5).clamp(0.0, 1.0)


def smoothed_jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """pre · H(pre - θ) with the jump of height θ spread over the window: its θ-derivative is the STE's."""
    low = pre - bandwidth / 2
    inside = torch.minimum(torch.maximum(threshold, low), pre + bandwidth / 2)
    return pre - (inside**2 - low**2) / (2 * bandwidth)


@register("jumprelu")
class JumpReLUSAE(SAE):
    """Latents pass when they exceed a learned per-latent threshold; sparsity is an L0 penalty."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.W_enc.dtype))

    def init_extra(self) -> None:
        """Every threshold starts at ``jumprelu_init_threshold``."""
        self.log_threshold.fill_(math.log(self.cfg.jumprelu_init_threshold))

    @property
    def threshold(self) -> Float[Tensor, " d_sae"]:
        """θ = exp(log_threshold): positive by construction."""
        return self.log_threshold.exp()

    def activate(self, pre: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_sae"]:
        """JumpReLU (with straight-through θ-gradients)."""
        return jumprelu(pre, self.threshold, self.cfg.jumprelu_bandwidth)

    def reconstruct(self, pre: Float[Tensor, "batch d_sae"]) -> Reconstruction:
        """Dense latents and the L0 penalty, both with straight-through θ-gradients."""
        threshold, bandwidth = self.threshold, self.cfg.jumprelu_bandwidth
        l0 = step(pre, threshold, bandwidth).sum(-1).mean()
        return dense_reconstruction(self, jumprelu(pre, threshold, bandwidth), self.cfg.l1_coefficient * l0)
