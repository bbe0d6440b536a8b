"""GPT-2: learned positions, pre-LayerNorm, fused ``c_attn`` stored as a Conv1D (``[in, out]``)."""

from mechscope.loading.families.base import (
    Family,
    From,
    fused,
    heads_to_output,
    transposed,
)

# c_attn is a Conv1D, [d_model, (q|k|v) · head · d_head]
QKV_WEIGHT = "d (part head e) -> part head d e"
QKV_BIAS = "(part head e) -> part head e"

GPT2 = Family(
    model_types=("gpt2",),
    config=lambda c: dict(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        d_mlp=c.n_inner or 4 * c.n_embd,
        act_fn=c.activation_function,
        eps=c.layer_norm_epsilon,
        attn_scale=(c.n_embd // c.n_head) ** 0.5 if c.scale_attn_weights else 1.0,
    ),
    weights={
        "embed.W_E": From("wte.weight"),
        "pos_embed.W_pos": From("wpe.weight"),
        "blocks.{i}.ln1.w": From("h.{i}.ln_1.weight"),
        "blocks.{i}.ln1.b": From("h.{i}.ln_1.bias"),
        "blocks.{i}.attn.W_Q": From("h.{i}.attn.c_attn.weight", fused(QKV_WEIGHT, 0)),
        "blocks.{i}.attn.W_K": From("h.{i}.attn.c_attn.weight", fused(QKV_WEIGHT, 1)),
        "blocks.{i}.attn.W_V": From("h.{i}.attn.c_attn.weight", fused(QKV_WEIGHT, 2)),
        "blocks.{i}.attn.b_Q": From("h.{i}.attn.c_attn.bias", fused(QKV_BIAS, 0)),
        "blocks.{i}.attn.b_K": From("h.{i}.attn.c_attn.bias", fused(QKV_BIAS, 1)),
        "blocks.{i}.attn.b_V": From("h.{i}.attn.c_attn.bias", fused(QKV_BIAS, 2)),
        "blocks.{i}.attn.W_O": From("h.{i}.attn.c_proj.weight", heads_to_output),
        "blocks.{i}.attn.b_O": From("h.{i}.attn.c_proj.bias"),
        "blocks.{i}.ln2.w": From("h.{i}.ln_2.weight"),
        "blocks.{i}.ln2.b": From("h.{i}.ln_2.bias"),
        "blocks.{i}.mlp.W_in": From("h.{i}.mlp.c_fc.weight"),
        "blocks.{i}.mlp.b_in": From("h.{i}.mlp.c_fc.bias"),
        "blocks.{i}.mlp.W_out": From("h.{i}.mlp.c_proj.weight"),
        "blocks.{i}.mlp.b_out": From("h.{i}.mlp.c_proj.bias"),
        "ln_final.w": From("ln_f.weight"),
        "ln_final.b": From("ln_f.bias"),
        "unembed.W_U": From("lm_head.weight", transposed, fallback="wte.weight"),
    },
    prefixes=("transformer.", ""),
    ignored=(r"h\.\d+\.attn\.(masked_)?bias",),
    unsupported={
        "scale_attn_by_inverse_layer_idx": lambda c: bool(c.scale_attn_by_inverse_layer_idx),
        "add_cross_attention": lambda c: bool(c.add_cross_attention),
    },
)

ENTRIES = (GPT2,)
