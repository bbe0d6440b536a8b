"""OPT: pre-LayerNorm GPT-2 shape with separate Q/K/V projections, ReLU, and a learned position
table whose first two rows are never used (positions are looked up at ``position + 2``)."""

from mechscope.loading.families.base import (
    Family,
    From,
    bias_to_heads,
    linear_from_heads,
    linear_to_heads,
    rows,
    transposed,
    unknown_activation,
)

OPT = Family(
    model_types=("opt",),
    config=lambda c: dict(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        d_vocab=c.vocab_size,
        n_ctx=c.max_position_embeddings,
        d_mlp=c.ffn_dim,
        act_fn=c.activation_function,
        eps=1e-5,  # nn.LayerNorm's default; OPT has no epsilon option
        attn_bias=c.enable_bias,
        attn_out_bias=c.enable_bias,
        mlp_bias=c.enable_bias,
    ),
    weights={
        "embed.W_E": From("embed_tokens.weight"),
        "pos_embed.W_pos": From("embed_positions.weight", rows(2)),
        "blocks.{i}.ln1.w": From("layers.{i}.self_attn_layer_norm.weight"),
        "blocks.{i}.ln1.b": From("layers.{i}.self_attn_layer_norm.bias"),
        "blocks.{i}.attn.W_Q": From("layers.{i}.self_attn.q_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_K": From("layers.{i}.self_attn.k_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_V": From("layers.{i}.self_attn.v_proj.weight", linear_to_heads),
        "blocks.{i}.attn.b_Q": From("layers.{i}.self_attn.q_proj.bias", bias_to_heads),
        "blocks.{i}.attn.b_K": From("layers.{i}.self_attn.k_proj.bias", bias_to_heads),
        "blocks.{i}.attn.b_V": From("layers.{i}.self_attn.v_proj.bias", bias_to_heads),
        "blocks.{i}.attn.W_O": From("layers.{i}.self_attn.out_proj.weight", linear_from_heads),
        "blocks.{i}.attn.b_O": From("layers.{i}.self_attn.out_proj.bias"),
        "blocks.{i}.ln2.w": From("layers.{i}.final_layer_norm.weight"),
        "blocks.{i}.ln2.b": From("layers.{i}.final_layer_norm.bias"),
        "blocks.{i}.mlp.W_in": From("layers.{i}.fc1.weight", transposed),
        "blocks.{i}.mlp.b_in": From("layers.{i}.fc1.bias"),
        "blocks.{i}.mlp.W_out": From("layers.{i}.fc2.weight", transposed),
        "blocks.{i}.mlp.b_out": From("layers.{i}.fc2.bias"),
        "ln_final.w": From("final_layer_norm.weight"),
        "ln_final.b": From("final_layer_norm.bias"),
        "unembed.W_U": From("lm_head.weight", transposed, fallback="embed_tokens.weight"),
    },
    prefixes=("model.decoder.", "decoder.", ""),
    unsupported=unknown_activation("activation_function")
    | {
        # post-LayerNorm blocks (opt-350m): LN(resid + sublayer), not mechscope's pre- or post-norm
        "do_layer_norm_before=False": lambda c: not c.do_layer_norm_before,
        # opt-350m's project_in / project_out around a narrower embedding
        "word_embed_proj_dim != hidden_size": lambda c: c.word_embed_proj_dim != c.hidden_size,
        "_remove_final_layer_norm": lambda c: bool(getattr(c, "_remove_final_layer_norm", False)),
        "layer_norm_elementwise_affine=False": lambda c: not c.layer_norm_elementwise_affine,
    },
)

ENTRIES = (OPT,)
