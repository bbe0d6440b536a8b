"""TopK and BatchTopK SAEs, with the AuxK loss for dead latents.

TopK (Gao et al. 2024) keeps each example's k largest pre-activations (then ReLU), so sparsity is
set, not penalised. Its sparse paths work on (indices, values) pairs alone: ``encode_sparse``
takes ``topk`` of the pre-activations and ``decode_sparse`` adds up the k gathered decoder rows,
so no ``[batch, d_sae]`` latent tensor is ever filled in (the encoder's pre-activations are the
only tensor of that size, and they cannot be avoided).

AuxK: latents that have not fired for a while are "dead"; the k_aux largest of them (default
d_in // 2) are asked to reconstruct what the live latents missed, ``e = x - x̂``, weighted 1/32.

BatchTopK (Bussmann et al. 2024) keeps the batch·k largest activations over the whole batch
during training, so examples share a budget of k on average. Inference cannot depend on the
batch, so it uses a fixed threshold, an exponential moving average of the smallest activation
kept in each training batch: the model then is a JumpReLU with one threshold for every latent
(which is how it is saved in SAELens' format).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.sae.base import SAE, Reconstruction, SAEConfig, SparseLatents, register
from mechscope.sae.sparse import bag_sum, fired_latents, gathered_decode, selected_pre_activations


def topk_latents(pre: Float[Tensor, "*batch d_sae"], k: int) -> SparseLatents:
    """The k largest pre-activations of each example, after ReLU."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return SparseLatents(indices, torch.relu(values))


def auxk_loss(
    sae: SAE, pre: Float[Tensor, "batch d_sae"], residual: Float[Tensor, "batch d_out"], dead_mask: Tensor | None
) -> Float[Tensor, ""]:
    """AuxK: the top-k_aux dead latents reconstruct the residual error (no decoder bias), times its coefficient."""
    if dead_mask is None:
        return pre.new_zeros(())
    dead = int(dead_mask.sum())
    if dead == 0:
        return pre.new_zeros(())
    k_aux = min(sae.cfg.aux_k or max(sae.cfg.d_in // 2, 1), dead)
    sparse = topk_latents(pre.masked_fill(~dead_mask, float("-inf")), k_aux)
    error = gathered_decode(sae.W_dec, torch.zeros_like(sae.b_dec), sparse.indices, sparse.values)
    return sae.cfg.aux_loss_coefficient * (error - residual).pow(2).sum(-1).mean()


@register("topk")
class TopKSAE(SAE):
    """Each example keeps its k largest latents."""

    def activate(self, pre: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_sae"]:
        """Dense form of the top-k latents (``encode``; the sparse paths avoid it)."""
        sparse = topk_latents(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter(-1, sparse.indices, sparse.values)

    def encode_sparse(self, x: Float[Tensor, "*batch d_in"]) -> SparseLatents:
        """(indices, values) of the k kept latents of each example; exactly k per example."""
        return topk_latents(self.pre_activations(self._checked_input(x)), self.cfg.k)

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """Reconstruction through the sparse path."""
        sparse = self.encode_sparse(x)
        return gathered_decode(self.W_dec, self.b_dec, sparse.indices, sparse.values)

    def reconstruct(self, pre: Float[Tensor, "batch d_sae"]) -> Reconstruction:
        """Sparse training step: no dense latents, no sparsity penalty."""
        return self.reconstruct_sparse(topk_latents(pre, self.cfg.k))

    def aux_loss(
        self, pre: Float[Tensor, "batch d_sae"], residual: Float[Tensor, "batch d_out"], dead_mask: Tensor | None
    ) -> Float[Tensor, ""]:
        """AuxK (see the module note)."""
        return auxk_loss(self, pre, residual, dead_mask)

    def training_forward(
        self, x: Float[Tensor, "batch d_in"], target: Float[Tensor, "batch d_out"], dead_mask: Tensor | None
    ) -> tuple[Reconstruction, Float[Tensor, ""]]:
        """``reconstruct`` and ``aux_loss`` with gradients only through the kept latents (see ``sparse_topk``)."""
        with torch.no_grad():
            pre = self.pre_activations(x)
        sparse = sparse_topk(self, x, pre, self.cfg.k)
        step = self.reconstruct_sparse(sparse)
        if dead_mask is None or not dead_mask.any():
            return step, pre.new_zeros(())
        with torch.no_grad():
            dead_pre = pre.masked_fill_(~dead_mask, float("-inf"))  # pre is not needed any more
        k_aux = min(self.cfg.aux_k or max(self.cfg.d_in // 2, 1), int(dead_mask.sum()))
        dead = sparse_topk(self, x, dead_pre, k_aux)
        error = gathered_decode(self.W_dec, torch.zeros_like(self.b_dec), dead.indices, dead.values)
        residual = (target - step.output).detach()
        return step, self.cfg.aux_loss_coefficient * (error - residual).pow(2).sum(-1).mean()

    def reconstruct_sparse(self, sparse: SparseLatents) -> Reconstruction:
        """Training output from the kept latents: no sparsity penalty, L0 and firing from the indices."""
        active = sparse.values > 0
        output = gathered_decode(self.W_dec, self.b_dec, sparse.indices, sparse.values)
        l0 = active.sum(-1).to(sparse.values.dtype)
        fired = fired_latents(sparse.indices[active], self.cfg.d_sae)
        return Reconstruction(output, sparse.values.new_zeros(()), l0, fired)


def sparse_topk(sae: SAE, x: Float[Tensor, "batch d_in"], pre: Float[Tensor, "batch d_sae"], k: int) -> SparseLatents:
    """``topk_latents(pre, k)`` for ``pre`` computed without a graph, differentiable through the kept pairs only.

    Autograd through a dense ``pre`` would build a ``[batch, d_sae]`` gradient that is zero outside
    the kept latents and multiply it into ``W_enc``'s gradient (a full matmul); here the encoder's
    gradient is summed over the ``batch * k`` kept pairs alone (``SelectedPre``).
    """
    values, indices = pre.topk(k, dim=-1, sorted=False)
    rows = torch.arange(len(pre), device=pre.device).repeat_interleave(k)
    kept = selected_pre_activations(sae, x, rows, indices.flatten(), values.flatten())
    return SparseLatents(indices, torch.relu(kept).view_as(values))


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """The batch keeps its batch·k largest latents in training; a learned threshold at inference."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=self.W_enc.dtype))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def activate(self, pre: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_sae"]:
        """Training: batch top-k; evaluation: ``pre`` where it exceeds the threshold, else 0."""
        if self.training:
            flat = pre.reshape(-1, self.cfg.d_sae)
            rows, cols, values = self.batch_topk(flat)
            return torch.zeros_like(flat).index_put((rows, cols), values).reshape(pre.shape)
        return torch.relu(pre) * (pre > self.threshold)

    def batch_topk(
        self, pre: Float[Tensor, "batch d_sae"]
    ) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"], Float[Tensor, " n"]]:
        """(example, latent, value) of the batch·k largest ReLU'd pre-activations of the batch."""
        values, flat = torch.relu(pre).flatten().topk(min(len(pre) * self.cfg.k, pre.numel()), sorted=False)
        return flat // self.cfg.d_sae, flat % self.cfg.d_sae, values

    def encode_sparse(self, x: Float[Tensor, "*batch d_in"]) -> SparseLatents:
        """Active latents padded to the largest count (the count varies per example)."""
        return SAE.encode_sparse(self, x)

    def training_forward(
        self, x: Float[Tensor, "batch d_in"], target: Float[Tensor, "batch d_out"], dead_mask: Tensor | None
    ) -> tuple[Reconstruction, Float[Tensor, ""]]:
        """Through dense pre-activations (the batch's top-k is not per example)."""
        return SAE.training_forward(self, x, target, dead_mask)

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """Reconstruction; batch-dependent in training mode, thresholded in evaluation mode."""
        return SAE.forward(self, x)

    def reconstruct(self, pre: Float[Tensor, "batch d_sae"]) -> Reconstruction:
        """Training: batch top-k without dense latents, and a threshold update; evaluation: the threshold."""
        if not self.training:
            return SAE.reconstruct(self, pre)
        rows, cols, values = self.batch_topk(pre)
        active = values > 0
        output = bag_sum(rows, len(pre), cols, self.W_dec, values) + self.b_dec
        l0 = torch.bincount(rows[active], minlength=len(pre)).to(pre.dtype)
        self.update_threshold(values[active])
        return Reconstruction(output, pre.new_zeros(()), l0, fired_latents(cols[active], self.cfg.d_sae))

    @torch.no_grad()
    def update_threshold(self, kept: Float[Tensor, " n"]) -> None:
        """EMA of the smallest kept activation; the first batch sets it outright."""
        if kept.numel() == 0:
            return
        smallest = kept.min().to(self.threshold.dtype)
        rate = 1.0 if int(self.threshold_updates) == 0 else self.cfg.topk_threshold_lr
        self.threshold.lerp_(smallest, rate)
        self.threshold_updates += 1
