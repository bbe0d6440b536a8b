"""TopK and BatchTopK SAEs: the kept latents, the sparse paths, AuxK and the inference threshold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from mechscope.sae import BatchTopKSAE, TopKSAE
from mechscope.sae.sparse import gathered_decode
from tests.sae import random_sae


class DenseWatcher(TorchDispatchMode):
    """Records the operators whose output has ``size`` elements or more."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.ops = size, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.numel() >= self.size:
                self.ops.add(func.overloadpacket.__name__)
        return out


# The encoder's affine map is the one [batch, d_sae] tensor the sparse paths may create.
ENCODER_OPS = {"mm", "addmm", "add", "sub", "matmul", "view", "_unsafe_view", "t", "expand", "reshape"}


def expected_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense top-k latents computed by sorting, independently of the module."""
    out = torch.zeros_like(pre)
    order = pre.argsort(dim=-1, descending=True)[..., :k]
    return out.scatter(-1, order, pre.gather(-1, order).clamp_min(0))


@given(k=st.integers(1, 32), batch=st.integers(1, 8), seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_topk_keeps_the_k_largest_after_relu(k, batch, seed):
    sae = random_sae("topk", k=k, seed=seed)
    assert isinstance(sae, TopKSAE)
    x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.encode(x), expected_topk(pre, k))
    sparse = sae.encode_sparse(x)
    assert sparse.indices.shape == (batch, k)
    assert torch.equal(sparse.indices.sort(-1).values, pre.topk(k).indices.sort(-1).values)
    torch.testing.assert_close(sae.decode_sparse(sparse), sae.decode(sae.encode(x)))
    torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)))


def test_sparse_paths_never_fill_dense_latents():
    sae = random_sae("topk", d_sae=4096, k=3)
    x = torch.randn(5, 8)
    with DenseWatcher(5 * 4096) as watcher:
        reconstruction = sae.decode_sparse(sae.encode_sparse(x))
        sae.losses(x)
        sae(x)
    assert watcher.ops <= ENCODER_OPS, watcher.ops - ENCODER_OPS
    with DenseWatcher(5 * 4096) as control:  # the dense path does fill them: the watcher can see it
        dense = sae.decode(sae.encode(x))
    assert control.ops - ENCODER_OPS
    torch.testing.assert_close(reconstruction, dense)


def test_decode_sparse_is_the_weighted_sum_of_decoder_rows():
    sae = random_sae("topk")
    sparse = sae.encode_sparse(torch.randn(4, 8))
    expected = torch.stack(
        [sae.b_dec + sum(v * sae.W_dec[i] for i, v in zip(idx, val)) for idx, val in zip(sparse.indices, sparse.values)]
    )
    torch.testing.assert_close(sae.decode_sparse(sparse), expected)


def test_topk_losses_have_no_sparsity_term_and_exact_l0():
    sae = random_sae("topk", k=5)
    x = torch.randn(12, 8) * 3
    losses = sae.losses(x)
    assert losses.sparsity == 0
    assert torch.equal(losses.l0, (sae.encode(x) > 0).sum(-1).float())
    assert losses.l0.max() <= 5


def expected_auxk(sae, x, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK from its definition: top-k_aux dead latents (ReLU) reconstruct the residual, no bias, x 1/32."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    residual = x - sae(x)
    dead_pre = pre[:, dead]
    kept = expected_topk(dead_pre, k_aux)
    return (kept @ sae.W_dec[dead] - residual).pow(2).sum(-1).mean() / 32


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
@given(n_dead=st.integers(1, 32), seed=st.integers(0, 100))
@settings(max_examples=10, deadline=None)
def test_auxk_matches_its_definition(architecture, n_dead, seed):
    sae = random_sae(architecture, seed=seed).eval()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(seed))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[torch.randperm(32, generator=torch.Generator().manual_seed(seed))[:n_dead]] = True
    expected = expected_auxk(sae, x, dead, min(8 // 2, n_dead))
    torch.testing.assert_close(sae.losses(x, dead_mask=dead).aux, expected, rtol=1e-5, atol=1e-6)


def test_auxk_is_zero_without_dead_latents_and_honours_aux_k():
    sae = random_sae("topk", aux_k=2, aux_loss_coefficient=0.5)
    x = torch.randn(6, 8)
    assert sae.losses(x).aux == 0
    assert sae.losses(x, dead_mask=torch.zeros(32, dtype=torch.bool)).aux == 0
    dead = torch.arange(32) % 3 == 0
    torch.testing.assert_close(sae.losses(x, dead_mask=dead).aux, expected_auxk(sae, x, dead, 2) * 32 * 0.5)


def test_auxk_gradient_reaches_only_dead_encoder_columns():
    sae = random_sae("topk")
    x = torch.randn(16, 8)
    dead = torch.arange(32) >= 20
    sae.losses(x, dead_mask=dead).aux.backward()
    column_grads = sae.W_enc.grad.abs().sum(0)
    assert column_grads[dead].sum() > 0
    assert not column_grads[~dead].any()


@given(k=st.integers(1, 10), batch=st.integers(1, 8), seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_batchtopk_keeps_the_batch_k_largest_in_training(k, batch, seed):
    sae = random_sae("batchtopk", k=k, seed=seed).train()
    assert isinstance(sae, BatchTopKSAE)
    x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed)) * 2
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).clamp_min(0)
    cutoff = pre.flatten().sort(descending=True).values[batch * k - 1]
    expected = torch.where(pre >= cutoff, pre, 0.0)
    torch.testing.assert_close(sae.encode(x), expected)
    losses = sae.losses(x)
    torch.testing.assert_close(losses.l0, (expected > 0).sum(-1).float())
    mse = (sae.decode(expected) - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(losses.mse, mse)  # the sparse training step equals the dense definition


def test_batchtopk_threshold_is_an_ema_of_the_smallest_kept_activation():
    sae = random_sae("batchtopk", k=3, topk_threshold_lr=0.25).train()
    x1, x2 = torch.randn(10, 8), torch.randn(10, 8)

    def smallest_kept(x):
        pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).clamp_min(0)
        return pre.flatten().sort(descending=True).values[30 - 1]

    first, second = smallest_kept(x1), smallest_kept(x2)
    sae.losses(x1)
    torch.testing.assert_close(sae.threshold, first)
    sae.losses(x2)
    torch.testing.assert_close(sae.threshold, 0.75 * first + 0.25 * second)
    sae.eval()
    sae.losses(x1)  # evaluation leaves the threshold alone
    torch.testing.assert_close(sae.threshold, 0.75 * first + 0.25 * second)


def test_batchtopk_inference_is_a_fixed_threshold_independent_of_the_batch():
    sae = random_sae("batchtopk", k=3).train()
    for _ in range(3):
        sae.losses(torch.randn(16, 8))
    sae.eval()
    x = torch.randn(6, 8)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.encode(x), torch.where(pre > sae.threshold, pre, 0.0))
    torch.testing.assert_close(sae.encode(x[:2]), sae.encode(x)[:2])
    losses = sae.losses(x)
    torch.testing.assert_close(losses.mse, (sae(x) - x).pow(2).sum(-1).mean())


def test_gathered_decode_handles_leading_dims():
    W_dec, b_dec = torch.randn(10, 3), torch.randn(3)
    indices = torch.randint(0, 10, (2, 4, 5))
    values = torch.randn(2, 4, 5)
    dense = torch.zeros(2, 4, 10).scatter_add(-1, indices, values)
    torch.testing.assert_close(gathered_decode(W_dec, b_dec, indices, values), dense @ W_dec + b_dec)


def dense_reference_loss(sae, x, target, dead, k, k_aux):
    """TopK's training loss (MSE + AuxK) through dense latents, written out independently of the module."""
    xin = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    pre = xin @ sae.W_enc + sae.b_enc
    latents = expected_topk(pre, k)
    output = latents @ sae.W_dec + sae.b_dec
    loss = (output - target).pow(2).sum(-1).mean()
    if dead.any():
        dead_latents = expected_topk(pre.masked_fill(~dead, float("-inf")), k_aux).nan_to_num(0.0)
        residual = (target - output).detach()
        loss = loss + sae.cfg.aux_loss_coefficient * (dead_latents @ sae.W_dec - residual).pow(2).sum(-1).mean()
    return loss


@pytest.mark.parametrize("d_out", [None, 5])
@given(n_dead=st.integers(0, 32), batch=st.integers(1, 12), seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_sparse_training_gradients_equal_the_dense_computation(d_out, n_dead, batch, seed):
    sae = random_sae("topk", seed=seed, d_out=d_out, dtype="float64").train()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, generator=generator, dtype=torch.float64)
    target = None if d_out is None else torch.randn(batch, d_out, generator=generator, dtype=torch.float64)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[torch.randperm(32, generator=generator)[:n_dead]] = True
    sae.losses(x, target, dead_mask=dead).total.backward()
    ours = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    dense_reference_loss(sae, x, x if target is None else target, dead, 4, min(4, n_dead)).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-10, msg=name)
