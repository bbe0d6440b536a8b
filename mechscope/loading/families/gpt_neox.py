"""GPT-NeoX and Pythia: a fused ``query_key_value`` laid out per head as ``[head, (q|k|v), d_head]``,
NeoX-style rotary on a fraction of each head, and (by default) parallel attention and MLP
with separate LayerNorms."""

from typing import Any

from mechscope.loading.families.base import (
    Family,
    From,
    fused,
    linear_from_heads,
    rotary_fields,
    transposed,
    unknown_activation,
    unknown_rope_type,
)

# query_key_value is laid out per head: [head · (q|k|v) · d_head, d_model]
QKV_WEIGHT = "(head part e) d -> part head d e"
QKV_BIAS = "(head part e) -> part head e"


def config(c) -> dict[str, Any]:
    d_head = c.hidden_size // c.num_attention_heads
    return dict(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        d_vocab=c.vocab_size,
        d_mlp=c.intermediate_size,
        act_fn=c.hidden_act,
        eps=c.layer_norm_eps,
        **rotary_fields(c, d_head, partial=True),
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
        "blocks.{i}.attn.W_Q": From("layers.{i}.attention.query_key_value.weight", fused(QKV_WEIGHT, 0)),
        "blocks.{i}.attn.W_K": From("layers.{i}.attention.query_key_value.weight", fused(QKV_WEIGHT, 1)),
        "blocks.{i}.attn.W_V": From("layers.{i}.attention.query_key_value.weight", fused(QKV_WEIGHT, 2)),
        "blocks.{i}.attn.b_Q": From("layers.{i}.attention.query_key_value.bias", fused(QKV_BIAS, 0)),
        "blocks.{i}.attn.b_K": From("layers.{i}.attention.query_key_value.bias", fused(QKV_BIAS, 1)),
        "blocks.{i}.attn.b_V": From("layers.{i}.attention.query_key_value.bias", fused(QKV_BIAS, 2)),
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
    unsupported=unknown_activation("hidden_act") | unknown_rope_type(),
)

ENTRIES = (GPT_NEOX,)
