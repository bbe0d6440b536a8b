"""Rotary position embeddings (RoPE): position enters attention by rotating queries and keys.

Each pair of dimensions of a query or key is rotated by the angle ``position · θ_j``, with
frequencies ``θ_j = base^(-2j / rotary_dim)``, so the score between a query at ``m`` and a key at
``n`` depends on ``m - n`` only. Two conventions pair dimensions differently: NeoX (and Llama)
rotates the first half against the second, GPT-J rotates interleaved neighbours. With a partial
rotary dimension only the first ``rotary_dim`` dimensions of each head rotate.

``rope_scaling`` stretches the frequencies for longer contexts: ``linear`` divides them by a
factor, ``dynamic`` (NTK) raises the base once a sequence outgrows the trained length, and
``llama3`` divides only the low frequencies, blending smoothly in between.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.model.config import ModelConfig

CosSin = tuple[Float[Tensor, "batch pos rotary_dim"], Float[Tensor, "batch pos rotary_dim"]]


def inverse_frequencies(cfg: ModelConfig, seq_len: int) -> Float[Tensor, " half_rotary_dim"]:
    """The rotation frequency of each dimension pair, after any ``rope_scaling``.

    ``seq_len`` (one past the largest position in this forward pass) matters only for the
    dynamic kind, which recomputes the base once the context outgrows its trained length.
    """
    dim, scaling = cfg.rotary_dim, cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    base = cfg.rotary_base
    if kind == "dynamic":
        trained = scaling["original_max_position_embeddings"]
        factor = scaling["factor"]
        seq_len = max(seq_len, trained)
        base = base * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponents)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return llama3_frequencies(inv_freq, scaling)
    return inv_freq


def llama3_frequencies(inv_freq: Tensor, scaling: dict) -> Tensor:
    """Llama 3.1's scaling: long wavelengths are divided by ``factor``, short ones kept, and the
    band between interpolated linearly in ``trained_length / wavelength``."""
    factor, trained = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > trained / low, inv_freq / factor, inv_freq)
    smooth = (trained / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelength < trained / high) & ~(wavelength > trained / low)
    return torch.where(in_band, blended, scaled)


def rotary_angles(cfg: ModelConfig, positions: Int[Tensor, "batch pos"], dtype: torch.dtype) -> CosSin:
    """cos and sin of every position's rotation angles, laid out to match the style's pairing."""
    seq_len = int(positions.max()) + 1 if (cfg.rope_scaling or {}).get("rope_type") == "dynamic" else 0
    inv_freq = inverse_frequencies(cfg, seq_len).to(positions.device)
    angles = positions.float()[..., None] * inv_freq  # [batch, pos, rotary_dim / 2]
    if cfg.rotary_style == "neox":
        angles = torch.cat([angles, angles], dim=-1)
    else:
        angles = repeat(angles, "batch pos half -> batch pos (half two)", two=2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(
    x: Float[Tensor, "batch pos head d_head"], cos_sin: CosSin, rotary_dim: int, style: str
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the first ``rotary_dim`` dimensions of every head; the rest pass through."""
    cos, sin = (rearrange(t, "batch pos d -> batch pos 1 d") for t in cos_sin)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rot * cos + quarter_turn(rot, style) * sin
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def quarter_turn(x: Float[Tensor, "... d"], style: str) -> Float[Tensor, "... d"]:
    """Each dimension pair ``(a, b)`` becomes ``(-b, a)``: the 90° rotation that sin multiplies."""
    if style == "neox":
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)
    pairs = rearrange(x, "... (half two) -> ... half two", two=2)
    return rearrange(torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1), "... half two -> ... (half two)")
