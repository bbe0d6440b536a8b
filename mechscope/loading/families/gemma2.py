"""Gemma 2: Gemma with RMSNorms on both sides of each sublayer, attention-score and final-logit
soft-capping, ``sqrt(query_pre_attn_scalar)`` as the attention scale, and a sliding window on the
layers ``layer_types`` marks ``sliding_attention`` (every other one, from layer 0, by default)."""

from typing import Any

from mechscope.loading.families.base import Family, From, unknown_activation
from mechscope.loading.families.gemma import BIDIRECTIONAL, gemma_fields
from mechscope.loading.families.llama import (
    IGNORED,
    PREFIXES,
    head_dim,
    llama_unsupported,
    llama_weights,
    rotary_fields,
)
from mechscope.loading.families.qwen2 import LAYER_TYPES, sliding_windows


def gemma2_config(c: Any) -> dict[str, Any]:
    """transformers' Gemma 2 reads ``hidden_activation`` (``hidden_act`` may be absent), and its
    window ``kv > q - sliding_window`` is mechscope's ``0 <= q - k < sliding_window``."""
    return dict(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        d_head=head_dim(c),
        n_key_value_heads=c.num_key_value_heads,
        d_vocab=c.vocab_size,
        d_mlp=c.intermediate_size,
        act_fn=c.hidden_activation,
        gated_mlp=True,
        normalization="rmsnorm",
        eps=c.rms_norm_eps,
        mlp_bias=False,
        initializer_range=c.initializer_range,
        post_norm=True,
        attn_scale=c.query_pre_attn_scalar**0.5,
        attn_softcap=c.attn_logit_softcapping,
        final_softcap=c.final_logit_softcapping,
        **rotary_fields(c),
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
    unsupported={name: test for name, test in llama_unsupported().items() if "hidden_act" not in name}
    | BIDIRECTIONAL
    | unknown_activation("hidden_activation")
    | {
        "layer_types other than " + ", ".join(LAYER_TYPES): lambda c: any(k not in LAYER_TYPES for k in c.layer_types),
    },
)

ENTRIES = (GEMMA2,)
