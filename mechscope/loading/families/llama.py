"""Llama: rotary positions (NeoX halves), RMSNorm, SwiGLU and grouped-query attention, with
optional biases on every projection. The Llama-style helpers here also serve Mistral and Qwen."""

from __future__ import annotations

from typing import Any

from mechscope.loading.families.base import (
    Family,
    From,
    bias_to_heads,
    linear_from_heads,
    linear_to_heads,
    rope_parameters,
    rope_type,
    rotary_fields,
    transposed,
    unknown_activation,
    unknown_rope_type,
)


def head_dim(c: Any) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def llama_config(c: Any, act_field: str = "hidden_act", partial_rotary: bool = False, **fields: Any) -> dict[str, Any]:
    """ModelConfig fields shared by the Llama-style families; ``fields`` adds or overrides
    (biases, norms, sliding windows). ``act_field`` names the config's activation field (Gemma 2
    has ``hidden_activation``); ``partial_rotary`` honours ``partial_rotary_factor`` (Phi-3)."""
    return (
        dict(
            n_layers=c.num_hidden_layers,
            d_model=c.hidden_size,
            n_heads=c.num_attention_heads,
            d_head=head_dim(c),
            n_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
            d_vocab=c.vocab_size,
            d_mlp=c.intermediate_size,
            act_fn=getattr(c, act_field),
            gated_mlp=True,
            normalization="rmsnorm",
            eps=c.rms_norm_eps,
            attn_bias=False,
            attn_out_bias=False,
            mlp_bias=False,
            initializer_range=c.initializer_range,
            **rotary_fields(c, head_dim(c), partial=partial_rotary),
        )
        | fields
    )


def llama_weights(
    qkv_bias: bool = False, o_bias: bool = False, mlp_bias: bool = False, qk_norm: bool = False
) -> dict[str, From]:
    """The Llama-style state dict (``model.layers.{i}.self_attn.q_proj`` ...); the flags add the
    rules for the tensors a family can have (rules for parameters a model lacks are never read)."""
    attn, mlp = "layers.{i}.self_attn", "layers.{i}.mlp"
    weights = {
        "embed.W_E": From("embed_tokens.weight"),  # first: the tensor that finds the checkpoint prefix
        "blocks.{i}.ln1.w": From("layers.{i}.input_layernorm.weight"),
        "blocks.{i}.attn.W_Q": From(f"{attn}.q_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_K": From(f"{attn}.k_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_V": From(f"{attn}.v_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_O": From(f"{attn}.o_proj.weight", linear_from_heads),
        "blocks.{i}.ln2.w": From("layers.{i}.post_attention_layernorm.weight"),
        "blocks.{i}.mlp.W_gate": From(f"{mlp}.gate_proj.weight", transposed),
        "blocks.{i}.mlp.W_in": From(f"{mlp}.up_proj.weight", transposed),
        "blocks.{i}.mlp.W_out": From(f"{mlp}.down_proj.weight", transposed),
        "ln_final.w": From("norm.weight"),
        "unembed.W_U": From("lm_head.weight", transposed, fallback="embed_tokens.weight"),
    }
    if qkv_bias:
        for p in "QKV":
            weights[f"blocks.{{i}}.attn.b_{p}"] = From(f"{attn}.{p.lower()}_proj.bias", bias_to_heads)
    if o_bias:
        weights["blocks.{i}.attn.b_O"] = From(f"{attn}.o_proj.bias")
    if mlp_bias:
        for ours, theirs in (("b_gate", "gate_proj"), ("b_in", "up_proj"), ("b_out", "down_proj")):
            weights[f"blocks.{{i}}.mlp.{ours}"] = From(f"{mlp}.{theirs}.bias")
    if qk_norm:
        weights["blocks.{i}.attn.q_norm.w"] = From(f"{attn}.q_norm.weight")
        weights["blocks.{i}.attn.k_norm.w"] = From(f"{attn}.k_norm.weight")
    return weights


def llama_unsupported(act_field: str = "hidden_act") -> dict[str, Any]:
    """Options no Llama-style entry can honour."""
    return (
        unknown_activation(act_field)
        | unknown_rope_type()
        | {
            "rope_parameters per layer type": lambda c: (
                bool(rope_parameters(c)) and "rope_type" not in rope_parameters(c)
            ),
            # HuggingFace's default rotary ignores it; its scaled ones would rotate fewer dims than the head has
            "partial_rotary_factor with rope scaling": lambda c: (
                rope_type(c) != "default" and rope_parameters(c).get("partial_rotary_factor", 1.0) != 1.0
            ),
        }
    )


PREFIXES = ("model.", "")
IGNORED = (r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)  # a buffer older checkpoints saved

LLAMA = Family(
    model_types=("llama",),
    config=lambda c: llama_config(
        c, attn_bias=c.attention_bias, attn_out_bias=c.attention_bias, mlp_bias=bool(getattr(c, "mlp_bias", False))
    ),
    weights=llama_weights(qkv_bias=True, o_bias=True, mlp_bias=True),
    prefixes=PREFIXES,
    ignored=IGNORED,
    unsupported=llama_unsupported(),
)

ENTRIES = (LLAMA,)
