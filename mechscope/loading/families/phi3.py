"""Phi-3: Llama with one fused ``qkv_proj`` (queries, keys, values at their GQA sizes, in that
order) and one fused ``gate_up_proj`` (gate rows first), partial rotary, and an optional sliding
window on every layer."""

from einops import rearrange
from torch import Tensor

from mechscope.loading.families.base import Family, From, Transform, linear_to_heads
from mechscope.loading.families.llama import IGNORED, PREFIXES, llama_config, llama_unsupported, llama_weights
from mechscope.model.config import ModelConfig


def fused_qkv(part: int) -> Transform:
    """Q (0), K (1) or V (2) heads from ``qkv_proj.weight`` ``[(n_heads + 2·n_kv)·d_head, d_model]``."""

    def take(t: Tensor, cfg: ModelConfig) -> Tensor:
        q, kv = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
        start = (0, q, q + kv)[part]
        return linear_to_heads(t[start : start + (q if part == 0 else kv)], cfg)

    return take


def fused_gate_up(part: int) -> Transform:
    """Gate (0) or up (1) from ``gate_up_proj.weight`` ``[2·d_mlp, d_model]``, as ``[d_model, d_mlp]``."""

    def take(t: Tensor, cfg: ModelConfig) -> Tensor:
        return rearrange(t, "(part m) d -> part d m", part=2)[part]

    return take


QKV, GATE_UP = "layers.{i}.self_attn.qkv_proj.weight", "layers.{i}.mlp.gate_up_proj.weight"

PHI3 = Family(
    model_types=("phi3",),
    # transformers applies sliding_window (when set) to every layer
    config=lambda c: llama_config(c, partial_rotary=True, sliding_window=c.sliding_window),  # Phi-3 honours it
    weights=llama_weights()
    | {
        "blocks.{i}.attn.W_Q": From(QKV, fused_qkv(0)),
        "blocks.{i}.attn.W_K": From(QKV, fused_qkv(1)),
        "blocks.{i}.attn.W_V": From(QKV, fused_qkv(2)),
        "blocks.{i}.mlp.W_gate": From(GATE_UP, fused_gate_up(0)),
        "blocks.{i}.mlp.W_in": From(GATE_UP, fused_gate_up(1)),
    },
    prefixes=PREFIXES,
    ignored=IGNORED,
    # longrope (spelt "su" or "yarn" in older Phi-3 configs) is refused there: its frequency
    # table switches with the sequence length
    unsupported=llama_unsupported(),
)

ENTRIES = (PHI3,)
