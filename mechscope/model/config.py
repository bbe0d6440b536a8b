"""The architecture-neutral description of a transformer.

One dataclass holds every number and switch that distinguishes one decoder-only transformer
from another. A model is built from it alone, so toys and tests can make random models
without HuggingFace, and the loaders only have to translate a HuggingFace config into it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

Activation = Literal["gelu", "gelu_new", "gelu_fast", "relu", "silu"]
NormKind = Literal["layernorm", "none"]
PositionalKind = Literal["learned", "none"]


@dataclass
class ModelConfig:
    """Everything needed to build a :class:`mechscope.Model` with random weights."""

    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int
    n_ctx: int
    d_head: int | None = None  # defaults to d_model // n_heads
    d_mlp: int | None = None  # defaults to 4 * d_model; 0 means attention-only
    act_fn: Activation = "gelu_new"
    normalization: NormKind = "layernorm"
    positional_embedding: PositionalKind = "learned"
    eps: float = 1e-5
    attn_scale: float | None = None  # defaults to sqrt(d_head); scores are divided by it
    attn_bias: bool = True  # biases on Q, K, V and O
    mlp_bias: bool = True
    unembed_bias: bool = False
    attn_only: bool = False
    original_architecture: str | None = None  # the HuggingFace model_type it came from
    tokenizer_name: str | None = None
    initializer_range: float = 0.02
    seed: int | None = None
    dtype: torch.dtype = torch.float32
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific notes, kept for display

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx"):
            check_positive_int(name, getattr(self, name))
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; give d_head explicitly"
                )
            self.d_head = self.d_model // self.n_heads
        check_positive_int("d_head", self.d_head)
        if self.attn_only:
            self.d_mlp = 0
        elif self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.attn_scale is None:
            self.attn_scale = float(self.d_head) ** 0.5
        for name, kind in (
            ("act_fn", Activation),
            ("normalization", NormKind),
            ("positional_embedding", PositionalKind),
        ):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {get_args(kind)}")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"ModelConfig.dtype must be a torch.dtype (e.g. torch.float32), got {self.dtype!r}")

    @property
    def has_mlp(self) -> bool:
        return not self.attn_only and bool(self.d_mlp)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (dtype as its name)."""
        out = dataclasses.asdict(self)
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        data = dict(data)
        if isinstance(data.get("dtype"), str):
            data["dtype"] = getattr(torch, data["dtype"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
