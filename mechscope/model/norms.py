"""Normalisation layers: LayerNorm (centre, then scale) and RMSNorm (scale only).

Both expose ``hook_scale`` (the divisor, ``[..., 1]``) and ``hook_normalized`` (the output,
after the learned weight), so direct logit attribution can treat the norm as the linear map it
is once the scale is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.model.config import ModelConfig
from mechscope.model.hooks import HookPoint


class LayerNorm(nn.Module):
    """Centre, divide by the root-mean-square (``hook_scale``), then scale and shift.

    One fused kernel computes the output and, on the side, the statistics, so caching the
    scale costs nothing extra. Only a hook that *replaces* the scale makes the steps run
    one by one, with the replacement.
    """

    def __init__(self, cfg: ModelConfig, d: int | None = None) -> None:
        super().__init__()
        self.d = d or cfg.d_model
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(self.d, dtype=cfg.dtype))
        self.b = nn.Parameter(torch.zeros(self.d, dtype=cfg.dtype))
        self.hook_scale = HookPoint()  # [..., 1]
        self.hook_normalized = HookPoint()  # [..., d]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w.fill_(1.0)
            self.b.zero_()

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if not (self.hook_scale.is_active or self.hook_normalized.is_active):
            return F.layer_norm(x, (self.d,), self.w, self.b, self.eps)
        out, mean, rstd = torch.native_layer_norm(x, (self.d,), self.w, self.b, self.eps)
        scale = rstd.reciprocal()
        hooked_scale = self.hook_scale(scale)
        if hooked_scale is not scale:  # a hook replaced the scale: normalise by the replacement
            out = (x - mean) / hooked_scale * self.w + self.b
        return self.hook_normalized(out)


class RMSNorm(nn.Module):
    """Divide by the root-mean-square (``hook_scale``), then multiply by ``offset + w``.

    Computed in float32 whatever the weights' dtype, as HuggingFace does. Gemma stores its
    weight around zero and multiplies by ``1 + w`` (``norm_weight_offset=1``); the weight is
    kept as the checkpoint has it, so half-precision checkpoints lose nothing to rounding.
    """

    def __init__(self, cfg: ModelConfig, d: int | None = None) -> None:
        super().__init__()
        self.d = d or cfg.d_model
        self.eps = cfg.eps
        self.offset = cfg.norm_weight_offset
        self.w = nn.Parameter(torch.full((self.d,), 1.0 - self.offset, dtype=cfg.dtype))
        self.hook_scale = HookPoint()  # [..., 1]
        self.hook_normalized = HookPoint()  # [..., d]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w.fill_(1.0 - self.offset)

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        x32 = x.float()
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        out = x32 / scale * (self.w.float() + self.offset)
        return self.hook_normalized(out.to(x.dtype))


def make_norm(cfg: ModelConfig, d: int | None = None) -> nn.Module:
    """The configured normalisation over the last ``d`` dimensions (identity when there is none)."""
    if cfg.normalization == "layernorm":
        return LayerNorm(cfg, d)
    if cfg.normalization == "rmsnorm":
        return RMSNorm(cfg, d)
    return nn.Identity()
