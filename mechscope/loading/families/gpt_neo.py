"""GPT-Neo: GPT-2's layout with separate Q/K/V projections, unscaled attention scores, and
``local`` layers that see only the last ``window_size`` positions."""

from mechscope.loading.families.base import (
    Family,
    From,
    linear_from_heads,
    linear_to_heads,
    transposed,
    unknown_activation,
)


def local_layers(c) -> list[int]:
    return [i for i, kind in enumerate(c.attention_layers) if kind == "local"]


GPT_NEO = Family(
    model_types=("gpt_neo",),
    config=lambda c: dict(
        n_layers=c.num_layers,
        d_model=c.hidden_size,
        n_heads=c.num_heads,
        d_vocab=c.vocab_size,
        n_ctx=c.max_position_embeddings,
        d_mlp=c.intermediate_size or 4 * c.hidden_size,
        act_fn=c.activation_function,
        eps=c.layer_norm_epsilon,
        attn_scale=1.0,  # GPT-Neo never divides scores by sqrt(d_head)
        attn_bias=False,
        sliding_window=c.window_size if local_layers(c) else None,
        sliding_window_layers=local_layers(c) or None,
    ),
    weights={
        "embed.W_E": From("wte.weight"),
        "pos_embed.W_pos": From("wpe.weight"),
        "blocks.{i}.ln1.w": From("h.{i}.ln_1.weight"),
        "blocks.{i}.ln1.b": From("h.{i}.ln_1.bias"),
        "blocks.{i}.attn.W_Q": From("h.{i}.attn.attention.q_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_K": From("h.{i}.attn.attention.k_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_V": From("h.{i}.attn.attention.v_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_O": From("h.{i}.attn.attention.out_proj.weight", linear_from_heads),
        "blocks.{i}.attn.b_O": From("h.{i}.attn.attention.out_proj.bias"),
        "blocks.{i}.ln2.w": From("h.{i}.ln_2.weight"),
        "blocks.{i}.ln2.b": From("h.{i}.ln_2.bias"),
        "blocks.{i}.mlp.W_in": From("h.{i}.mlp.c_fc.weight", transposed),
        "blocks.{i}.mlp.b_in": From("h.{i}.mlp.c_fc.bias"),
        "blocks.{i}.mlp.W_out": From("h.{i}.mlp.c_proj.weight", transposed),
        "blocks.{i}.mlp.b_out": From("h.{i}.mlp.c_proj.bias"),
        "ln_final.w": From("ln_f.weight"),
        "ln_final.b": From("ln_f.bias"),
        "unembed.W_U": From("lm_head.weight", transposed, fallback="wte.weight"),
    },
    prefixes=("transformer.", ""),
    ignored=(r"h\.\d+\.attn\.attention\.(masked_)?bias",),
    unsupported=unknown_activation("activation_function"),
)

ENTRIES = (GPT_NEO,)
