"""Checks on what goes into a forward pass, with errors that name the limit that was broken.

Out-of-range token ids would otherwise fail deep inside an embedding lookup (or, on a GPU, as
an unreadable device-side assert); an over-long sequence would silently index past the
position table. Every check here runs once per forward pass on the whole batch.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.model.config import ModelConfig


class InputError(ValueError):
    """The input to a model is malformed; the message says what and which limit."""


def check_tokens(
    tokens: object, cfg: ModelConfig, shape: torch.Size | None = None, n_past: int = 0
) -> Int[Tensor, "batch pos"]:
    """Validate a batch of token ids, adding the batch dimension to a single sequence;
    ``shape`` is the ``[batch, pos]`` they must have (the residual stream's, with start_at_layer);
    ``n_past`` tokens are already in a key-value cache and count towards the context."""
    if not isinstance(tokens, Tensor):
        raise InputError(f"tokens must be a torch.Tensor of integer ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InputError(
            f"tokens must have an integer dtype, got {tokens.dtype} (to feed a residual stream, pass start_at_layer)"
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise InputError(f"tokens must have shape [batch, pos] or [pos], got {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise InputError(f"tokens are empty (shape {tuple(tokens.shape)}); give at least one token")
    if shape is not None and tuple(tokens.shape) != tuple(shape):
        raise InputError(f"tokens have shape {tuple(tokens.shape)} but the residual stream is {tuple(shape)}")
    if n_past + tokens.shape[1] > cfg.n_ctx:
        cached = f" ({n_past} cached + {tokens.shape[1]} new)" if n_past else ""
        length = n_past + tokens.shape[1]
        raise InputError(f"sequence length {length}{cached} exceeds the model's context of n_ctx={cfg.n_ctx} tokens")
    out_of_range = (tokens < 0) | (tokens >= cfg.d_vocab)
    if out_of_range.any():
        bad = tokens[out_of_range][0].item()
        raise InputError(f"token id {bad} is outside the vocabulary: ids must lie in [0, {cfg.d_vocab - 1}]")
    return tokens


def check_residual(resid: object, cfg: ModelConfig) -> None:
    """A residual stream fed in with ``start_at_layer`` must be ``[batch, pos, d_model]``."""
    if not isinstance(resid, Tensor) or not resid.dtype.is_floating_point:
        raise InputError("with start_at_layer, input must be a float residual stream [batch, pos, d_model]")
    if resid.ndim != 3 or resid.shape[-1] != cfg.d_model:
        raise InputError(
            f"with start_at_layer, input must have shape [batch, pos, {cfg.d_model}], got {tuple(resid.shape)}"
        )
    if resid.shape[1] > cfg.n_ctx:
        raise InputError(f"sequence length {resid.shape[1]} exceeds the model's context of n_ctx={cfg.n_ctx}")


def check_attention_mask(mask: Tensor | None, shape: torch.Size) -> Int[Tensor, "batch pos"] | None:
    """Normalise a padding mask to integer 0/1 of the input's shape; all-ones becomes None."""
    if mask is None:
        return None
    if mask.ndim == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(shape):
        raise InputError(f"attention_mask has shape {tuple(mask.shape)} but the input is {tuple(shape)}")
    # One host-device sync for all three facts, not one each.
    binary, nonempty, full = torch.stack(
        [((mask == 0) | (mask == 1)).all(), (mask.sum(-1) > 0).all(), mask.bool().all()]
    ).tolist()
    if not binary:
        raise InputError("attention_mask must contain only 0 (padding) and 1 (real token)")
    if not nonempty:
        raise InputError("attention_mask marks every token of some sequence as padding")
    return None if full else mask.long()


def positions(
    attention_mask: Int[Tensor, "batch pos"] | None,
    position_ids: Int[Tensor, "#batch pos"] | None,
    shape: torch.Size,
    cfg: ModelConfig,
    device: torch.device,
    past: Int[Tensor, " batch"] | None = None,
) -> Int[Tensor, "batch pos"]:
    """Position of every token: given, counted over real tokens, or simply 0, 1, 2, ...
    ``past`` is how many real tokens each row already has in a key-value cache."""
    if position_ids is not None:
        position_ids = position_ids.to(device).expand(*shape)
        low, high = torch.stack(torch.aminmax(position_ids)).tolist()  # one sync
        if low < 0 or high >= cfg.n_ctx:
            raise InputError(f"position_ids must lie in [0, {cfg.n_ctx - 1}] (n_ctx={cfg.n_ctx})")
        return position_ids
    if attention_mask is not None:
        counted = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    else:
        counted = torch.arange(shape[1], device=device).expand(*shape)
    return counted if past is None else counted + past[:, None]


def layer_index(value: int | None, n_layers: int, what: str, default: int) -> int:
    """Resolve a possibly negative layer index into ``0 ... n_layers``."""
    if value is None:
        return default
    resolved = value + n_layers if value < 0 else value
    if not 0 <= resolved <= n_layers:
        raise InputError(f"{what}={value} is out of range for a model with {n_layers} layers")
    return resolved
