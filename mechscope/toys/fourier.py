"""The Fourier basis over Z_p and the measurements the grokking analysis makes with it.

A function of ``x ∈ {0, ..., p-1}`` is a vector of length ``p``; the orthonormal Fourier basis
writes it as a constant plus ``cos(2πkx/p)`` and ``sin(2πkx/p)`` for ``k = 1 .. (p-1)/2``. A
model that adds modulo ``p`` by rotating circles (Nanda et al. 2023) uses only a handful of
these frequencies, so its embedding and its logits are sparse in this basis.

Frequencies are indexed ``0 .. (p-1)/2``: index 0 is the constant, index ``k`` the pair
``(cos_k, sin_k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor


def n_frequencies(p: int) -> int:
    """How many frequencies an odd ``p`` has, the constant (index 0) included."""
    return (p + 1) // 2


def fourier_basis(p: int) -> Float[Tensor, "p x"]:
    """The orthonormal Fourier basis of functions on Z_p, one basis vector per row.

    Row 0 is the constant; rows ``2k - 1`` and ``2k`` are ``cos`` and ``sin`` of frequency ``k``.
    """
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, n_frequencies(p)):
        angle = 2 * torch.pi * k * x / p
        rows += [torch.cos(angle), torch.sin(angle)]
    basis = torch.stack(rows)
    return (basis / basis.norm(dim=1, keepdim=True)).float()


def frequency_energy(values: Float[Tensor, "p *rest"]) -> Float[Tensor, " freq"]:
    """Squared norm of ``values`` (a function of x ∈ Z_p, vector-valued) carried by each frequency.

    Index 0 is the constant component; index ``k`` sums the ``cos_k`` and ``sin_k`` components.
    The entries add up to the squared norm of ``values`` because the basis is orthonormal.
    """
    p = values.shape[0]
    coefficients = fourier_basis(p).to(values) @ values.reshape(p, -1)
    per_row = coefficients.pow(2).sum(dim=1)
    return torch.cat([per_row[:1], per_row[1:].reshape(-1, 2).sum(dim=1)])


def top_frequencies(energy: Float[Tensor, " freq"], k: int) -> list[int]:
    """The ``k`` non-constant frequencies carrying the most energy, in increasing order."""
    return sorted((torch.topk(energy[1:], k).indices + 1).tolist())


def energy_fraction(energy: Float[Tensor, " freq"], frequencies: Sequence[int]) -> float:
    """The share of the total energy (constant included) carried by ``frequencies``."""
    return float(energy[list(frequencies)].sum() / energy.sum())


# ----------------------------------------------------------------- logits as functions of (a, b)
def sum_index(p: int) -> Int[Tensor, "a b"]:
    """``(a + b) mod p`` for every pair."""
    x = torch.arange(p)
    return (x[:, None] + x[None, :]) % p


def by_sum(logits: Float[Tensor, "a b c"]) -> Float[Tensor, "s c"]:
    """The part of ``logits`` that depends on ``(a, b)`` only through ``s = (a + b) mod p``.

    Averaging over the ``p`` pairs with the same sum is the orthogonal projection onto
    functions of the sum, the only ones the Fourier-multiplication algorithm produces.
    """
    p = logits.shape[0]
    a = torch.arange(p)[:, None]
    s = torch.arange(p)[None, :]
    b = (s - a) % p  # the pair (a, b) with a + b = s, for every a
    return logits[a, b].mean(dim=0)


def sum_frequency_energy(logits: Float[Tensor, "a b c"]) -> Float[Tensor, " freq"]:
    """Energy of each frequency of ``cos/sin(w_k (a + b))`` in ``logits``, summed over outputs."""
    return frequency_energy(by_sum(logits))


def sum_components(logits: Float[Tensor, "a b c"], frequencies: Sequence[int]) -> Float[Tensor, "a b c"]:
    """The projection of ``logits`` onto ``cos(w_k (a + b))`` and ``sin(w_k (a + b))`` for the given
    frequencies (index 0 adds the constant, i.e. the mean over all pairs)."""
    p = logits.shape[0]
    basis = fourier_basis(p).to(logits)
    rows = sorted({row for k in frequencies for row in ((0,) if k == 0 else (2 * k - 1, 2 * k))})
    kept = basis[rows]
    filtered = kept.T @ (kept @ by_sum(logits))  # [s, c]: the kept frequencies of the sum-function
    return filtered[sum_index(p)]


def restricted_logits(logits: Float[Tensor, "a b c"], key_frequencies: Sequence[int]) -> Float[Tensor, "a b c"]:
    """Only the constant and the key frequencies of ``a + b``: what the Fourier circuit alone computes."""
    return sum_components(logits, [0, *key_frequencies])


def excluded_logits(logits: Float[Tensor, "a b c"], key_frequencies: Sequence[int]) -> Float[Tensor, "a b c"]:
    """Everything but the key frequencies of ``a + b``: what memorisation alone computes."""
    return logits - sum_components(logits, key_frequencies)


def pair_grid(values: Float[Tensor, "pair c"], p: int) -> Float[Tensor, "a b c"]:
    """Per-pair rows in the order ``pair = a * p + b`` as a ``[a, b, c]`` grid."""
    return rearrange(values, "(a b) c -> a b c", a=p, b=p)
