"""The per-position feed-forward layer, plain or gated.

Plain (GPT-2): ``W_out · act(W_in · x + b_in) + b_out``. Gated (SwiGLU with silu, GeGLU with
gelu; Llama, Gemma, Qwen...): a second projection ``W_gate`` goes through the activation and
multiplies the linear one elementwise, ``W_out · (act(W_gate · x) ⊙ (W_in · x))``.
Hook points: ``hook_pre`` is the activation's input (the gate, when gated), ``hook_pre_linear``
the linear branch, ``hook_post`` what ``W_out`` reads — the neurons.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.model.components import affine, bias
from mechscope.model.config import ModelConfig
from mechscope.model.hooks import HookPoint

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """Feed-forward layer; gated when ``cfg.gated_mlp``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, m = cfg.d_model, cfg.d_mlp
        self.gated = cfg.gated_mlp
        self.W_in = nn.Parameter(torch.empty(d, m, dtype=cfg.dtype))
        self.b_in = bias(m, enabled=cfg.mlp_bias, dtype=cfg.dtype)
        if self.gated:
            self.W_gate = nn.Parameter(torch.empty(d, m, dtype=cfg.dtype))
            self.b_gate = bias(m, enabled=cfg.mlp_bias, dtype=cfg.dtype)
        self.W_out = nn.Parameter(torch.empty(m, d, dtype=cfg.dtype))
        self.b_out = bias(d, enabled=cfg.mlp_bias, dtype=cfg.dtype)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        if self.gated:
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not self.gated:
            post = self.hook_post(self.act(self.hook_pre(affine(x, self.W_in, self.b_in))))
        else:
            gate = self.hook_pre(affine(x, self.W_gate, self.b_gate))
            linear = self.hook_pre_linear(affine(x, self.W_in, self.b_in))
            post = self.hook_post(self.act(gate) * linear)
        return affine(post, self.W_out, self.b_out)
