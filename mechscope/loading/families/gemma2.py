"""Gemma 2: Gemma with RMSNorms on both sides of each sublayer, attention-score and final-logit
soft-capping, ``sqrt(query_pre_attn_scalar)`` as the attention scale, and a sliding window on the
layers ``layer_types`` marks ``sliding_attention`` (every other one, from layer 0, by default)."""

from typing import Any

from mechscope.loading.families.base import Family, From
from mechscope.loading.families.gemma import BIDIRECTIONAL, gemma_fields
from mechscope.loading.families.llama import (
    IGNORED,
    PREFIXES,
    llama_config,
    llama_unsupported,
    llama_weights,
)
from mechscope.loading.families.qwen2 import sliding_windows, unknown_layer_types


def gemma2_config(c: Any) -> dict[str, Any]:
    """transformers' Gemma 2 reads ``hidden_activation`` (``hidden_act`` may be absent), and its
    window ``kv > q - sliding_window`` is mechscope's ``0 <= q - k < sliding_window``."""
    return llama_config(
        c,
        act_field="hidden_activation",
        post_norm=True,
        attn_scale=c.query_pre_attn_scalar**0.5,
        attn_softcap=c.attn_logit_softcapping,
        final_softcap=c.final_logit_softcapping,
        **gemma_fields(c),
        **sliding_windows(c),
    )


GEMMA2 = Family(
    model_types=("gemma2",),
    config=gemma2_config,
    weights=llama_weights(qkv_bias=True, o_bias=True)
    | {
        "blocks.{i}.ln1_post.w": From("layers.{i}.post_attention_layernorm.weight"),
        "blocks.{i}.ln2.w": From("layers.{i}.pre_feedforward_layernorm.weight"),
        "blocks.{i}.ln2_post.w": From("layers.{i}.post_feedforward_layernorm.weight"),
    },
    prefixes=PREFIXES,
    ignored=IGNORED,
    unsupported=llama_unsupported("hidden_activation") | BIDIRECTIONAL | unknown_layer_types(),
)

ENTRIES = (GEMMA2,)
