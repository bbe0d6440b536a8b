"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, "Circuits Updates", April 2024).

    f = ReLU(pre)        loss = ||x̂ - x||² + λ Σ_i f_i · ||W_dec[i]||

Weighting each latent's L1 by its decoder row norm makes the penalty invariant to moving scale
between a latent and its decoder row, so the decoder need not be renormalised during training:
``normalize_decoder`` is a no-op here (``fold_decoder_norms`` moves the norms into the encoder
exactly when unit rows are wanted, for export or comparison).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.sae.base import SAE, Reconstruction, dense_reconstruction, register


@register("relu")
class ReLUSAE(SAE):
    """Standard SAE (SAELens "standard"): ReLU latents, norm-weighted L1 sparsity."""

    def activate(self, pre: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_sae"]:
        """ReLU."""
        return torch.relu(pre)

    def reconstruct(self, pre: Float[Tensor, "batch d_sae"]) -> Reconstruction:
        """Dense latents and their decoder-norm-weighted L1 penalty."""
        latents = torch.relu(pre)
        l1 = (latents * self.W_dec.norm(dim=-1)).sum(-1).mean()
        return dense_reconstruction(self, latents, self.cfg.l1_coefficient * l1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """No-op: the L1 term is weighted by decoder norms instead (see the module note)."""

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Unit decoder rows with the same function: latent i is scaled by ||W_dec[i]||, its row by the inverse."""
        norms = self.W_dec.norm(dim=-1).clamp_min(1e-12)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms)
        self.b_enc.mul_(norms)
