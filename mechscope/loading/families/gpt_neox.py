"""GPT-NeoX and Pythia: a fused ``query_key_value`` laid out per head as ``[head, (q|k|v), d_head]``,
NeoX-style rotary on a fraction of each head, and (by default) parallel attention and MLP
with separate LayerNorms."""

import math
from typing import Any, get_args

from einops import rearrange
from torch import Tensor

from mechscope.loading.families.base import (
    Family,
    From,
    Transform,
    linear_from_heads,
    transposed,
    unknown_activation,
)
from mechscope.model.config import ModelConfig, RopeKind


def per_head_qkv_weight(part: int) -> Transform:
    """One of Q, K, V from ``query_key_value.weight`` ``[head·(q|k|v)·d_head, d_model]``."""

    def take(t: Tensor, cfg: ModelConfig) -> Tensor:
        return rearrange(t, "(head part e) d -> part head d e", part=3, head=cfg.n_heads)[part]

    return take


def per_head_qkv_bias(part: int) -> Transform:
    def take(t: Tensor, cfg: ModelConfig) -> Tensor:
        return rearrange(t, "(head part e) -> part head e", part=3, head=cfg.n_heads)[part]

    return take


# the rope_parameters keys mechscope's rotary reads for each scaling kind
ROPE_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_scaling(c) -> dict[str, Any] | None:
    """The scaling part of HF's ``rope_parameters``; dynamic NTK counts from ``max_position_embeddings``."""
    params = c.rope_parameters
    kind = params.get("rope_type", "default")
    if kind not in ROPE_KEYS:
        return None
    scaling = {"rope_type": kind, **{key: params[key] for key in ROPE_KEYS[kind]}}
    if kind == "dynamic":
        scaling["original_max_position_embeddings"] = c.max_position_embeddings
    return scaling


def context(c) -> int:
    """Rotary has no table to run off; dynamic NTK is meant to stretch the trained length ``factor`` times."""
    params = c.rope_parameters
    if params.get("rope_type") == "dynamic":
        return math.ceil(c.max_position_embeddings * params["factor"])
    return c.max_position_embeddings


def config(c) -> dict[str, Any]:
    d_head = c.hidden_size // c.num_attention_heads
    return dict(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        d_vocab=c.vocab_size,
        n_ctx=context(c),
        d_mlp=c.intermediate_size,
        act_fn=c.hidden_act,
        eps=c.layer_norm_eps,
        positional_embedding="rotary",
        rotary_dim=int(d_head * c.rope_parameters.get("partial_rotary_factor", 1.0)),
        rotary_style="neox",
        rotary_base=float(c.rope_parameters["rope_theta"]),
        rope_scaling=rope_scaling(c),
        parallel_attn_mlp=c.use_parallel_residual,
        attn_bias=c.attention_bias,
        attn_out_bias=c.attention_bias,
    )


GPT_NEOX = Family(
    model_types=("gpt_neox",),
    config=config,
    weights={
        "embed.W_E": From("embed_in.weight"),
        "blocks.{i}.ln1.w": From("layers.{i}.input_layernorm.weight"),
        "blocks.{i}.ln1.b": From("layers.{i}.input_layernorm.bias"),
        "blocks.{i}.attn.W_Q": From("layers.{i}.attention.query_key_value.weight", per_head_qkv_weight(0)),
        "blocks.{i}.attn.W_K": From("layers.{i}.attention.query_key_value.weight", per_head_qkv_weight(1)),
        "blocks.{i}.attn.W_V": From("layers.{i}.attention.query_key_value.weight", per_head_qkv_weight(2)),
        "blocks.{i}.attn.b_Q": From("layers.{i}.attention.query_key_value.bias", per_head_qkv_bias(0)),
        "blocks.{i}.attn.b_K": From("layers.{i}.attention.query_key_value.bias", per_head_qkv_bias(1)),
        "blocks.{i}.attn.b_V": From("layers.{i}.attention.query_key_value.bias", per_head_qkv_bias(2)),
        "blocks.{i}.attn.W_O": From("layers.{i}.attention.dense.weight", linear_from_heads),
        "blocks.{i}.attn.b_O": From("layers.{i}.attention.dense.bias"),
        "blocks.{i}.ln2.w": From("layers.{i}.post_attention_layernorm.weight"),
        "blocks.{i}.ln2.b": From("layers.{i}.post_attention_layernorm.bias"),
        "blocks.{i}.mlp.W_in": From("layers.{i}.mlp.dense_h_to_4h.weight", transposed),
        "blocks.{i}.mlp.b_in": From("layers.{i}.mlp.dense_h_to_4h.bias"),
        "blocks.{i}.mlp.W_out": From("layers.{i}.mlp.dense_4h_to_h.weight", transposed),
        "blocks.{i}.mlp.b_out": From("layers.{i}.mlp.dense_4h_to_h.bias"),
        "ln_final.w": From("final_layer_norm.weight"),
        "ln_final.b": From("final_layer_norm.bias"),
        # saved checkpoints name the head embed_out, a loaded HF model's state dict lm_head;
        # a tied checkpoint saves only the embedding
        "unembed.W_U": From("embed_out.weight", transposed, fallback=("lm_head.weight", "embed_in.weight")),
    },
    prefixes=("gpt_neox.", ""),
    ignored=(r"layers\.\d+\.attention\.(masked_)?bias", r"(.*\.)?rotary_emb\.inv_freq"),
    unsupported=unknown_activation("hidden_act")
    | {
        "rope_type other than " + ", ".join(get_args(RopeKind)): lambda c: (
            c.rope_parameters.get("rope_type", "default") not in get_args(RopeKind)
        ),
    },
)

ENTRIES = (GPT_NEOX,)
