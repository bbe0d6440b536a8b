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

Activation = Literal["gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu"]
NormKind = Literal["layernorm", "rmsnorm", "none"]
PositionalKind = Literal["learned", "rotary", "none"]
RotaryStyle = Literal["neox", "gptj"]  # rotate halves [x1 | x2], or interleaved pairs (x0, x1), (x2, x3)...
QKNorm = Literal["none", "per_head", "all_heads"]  # RMSNorm over each head's d_head, or over all heads at once
RopeKind = Literal["default", "linear", "dynamic", "llama3"]
ROPE_KEYS = {  # what each kind of rope_scaling must give
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


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
    n_key_value_heads: int | None = None  # fewer than n_heads: grouped-query attention; 1: multi-query
    act_fn: Activation = "gelu_new"
    gated_mlp: bool = False  # W_out · (act(W_gate·x) * W_in·x): SwiGLU with silu, GeGLU with gelu
    # --- normalisation
    normalization: NormKind = "layernorm"
    eps: float = 1e-5
    norm_weight_offset: float = 0.0  # RMSNorm multiplies by (offset + w): Gemma stores w around 0, offset 1
    pre_norm: bool = True  # ln1 / ln2 before attention / MLP (GPT-2 and most models)
    post_norm: bool = False  # ln1_post / ln2_post on attention / MLP outputs (Gemma 2 both; OLMo 2 only post)
    qk_norm: QKNorm = "none"  # RMSNorm of queries and keys before the rotary (Qwen3 per head, OLMo 2 all heads)
    # --- positions
    positional_embedding: PositionalKind = "learned"
    rotary_dim: int | None = None  # rotated dimensions of each head; defaults to d_head (partial rotary: fewer)
    rotary_style: RotaryStyle = "neox"
    rotary_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "dynamic" | "llama3", "factor": ...}
    # --- attention
    attn_scale: float | None = None  # defaults to sqrt(d_head); scores are divided by it
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    sliding_window: int | None = None  # a query sees at most this many keys, itself included
    sliding_window_layers: list[int] | None = None  # the layers that use the window; None: all of them
    ungroup_grouped_query_attention: bool = False  # expand K/V to every query head before hook_k / hook_v
    # --- block shape and biases
    parallel_attn_mlp: bool = False  # resid + attn(ln1(resid)) + mlp(ln2(resid)) (GPT-J, Pythia)
    attn_bias: bool = True  # biases on Q, K and V
    attn_out_bias: bool = True  # bias on the attention output
    mlp_bias: bool = True
    attn_only: bool = False
    # --- ends
    embed_scale: float | None = None  # the token embedding is multiplied by this (Gemma: sqrt(d_model))
    unembed_bias: bool = False
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
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
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        check_positive_int("n_key_value_heads", self.n_key_value_heads)
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_key_value_heads={self.n_key_value_heads}")
        for name, kind in (
            ("act_fn", Activation),
            ("normalization", NormKind),
            ("positional_embedding", PositionalKind),
            ("rotary_style", RotaryStyle),
            ("qk_norm", QKNorm),
        ):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {get_args(kind)}")
        if self.positional_embedding == "rotary":
            self.rotary_dim = self.d_head if self.rotary_dim is None else self.rotary_dim
            if not isinstance(self.rotary_dim, int) or not 0 < self.rotary_dim <= self.d_head or self.rotary_dim % 2:
                raise ValueError(f"ModelConfig.rotary_dim must be an even integer in [2, d_head={self.d_head}]")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in get_args(RopeKind):
            raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {get_args(RopeKind)}")
        missing = [key for key in ROPE_KEYS[kind] if key not in (self.rope_scaling or {})]
        if missing:
            raise ValueError(f"rope_scaling of type {kind!r} needs {', '.join(missing)}")
        if kind == "dynamic" and self.rotary_dim is not None and self.rotary_dim <= 2:
            raise ValueError("dynamic rope scaling needs rotary_dim > 2 (its base grows as a power of d / (d - 2))")
        if self.sliding_window is not None:
            check_positive_int("sliding_window", self.sliding_window)
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"ModelConfig.dtype must be a torch.dtype (e.g. torch.float32), got {self.dtype!r}")

    @property
    def has_mlp(self) -> bool:
        return not self.attn_only and bool(self.d_mlp)

    @property
    def n_kv_heads_exposed(self) -> int:
        """How many key/value heads ``hook_k`` and ``hook_v`` show."""
        return self.n_heads if self.ungroup_grouped_query_attention else self.n_key_value_heads

    def window(self, layer: int) -> int | None:
        """The sliding-window length of ``layer``'s attention, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is None or layer in self.sliding_window_layers:
            return self.sliding_window
        return None

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
