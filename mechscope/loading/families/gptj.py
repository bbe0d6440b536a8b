"""GPT-J: rotary positions in the interleaved style on the first ``rotary_dim`` dimensions of
each head, attention and MLP in parallel off one shared LayerNorm, and a biased unembedding."""

from mechscope.loading.families.base import (
    Family,
    From,
    linear_from_heads,
    linear_to_heads,
    transposed,
    unknown_activation,
)

GPTJ = Family(
    model_types=("gptj",),
    config=lambda c: dict(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,  # HF's sin/cos table has n_positions rows
        d_mlp=c.n_inner or 4 * c.n_embd,
        act_fn=c.activation_function,
        eps=c.layer_norm_epsilon,
        positional_embedding="rotary",
        rotary_dim=c.rotary_dim or c.n_embd // c.n_head,
        rotary_style="gptj",
        rotary_base=10000.0,
        parallel_attn_mlp=True,
        attn_bias=False,
        attn_out_bias=False,
        unembed_bias=True,
    ),
    weights={
        "embed.W_E": From("wte.weight"),
        "blocks.{i}.ln1.w": From("h.{i}.ln_1.weight"),
        "blocks.{i}.ln1.b": From("h.{i}.ln_1.bias"),
        "blocks.{i}.attn.W_Q": From("h.{i}.attn.q_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_K": From("h.{i}.attn.k_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_V": From("h.{i}.attn.v_proj.weight", linear_to_heads),
        "blocks.{i}.attn.W_O": From("h.{i}.attn.out_proj.weight", linear_from_heads),
        "blocks.{i}.ln2.w": From("h.{i}.ln_1.weight"),  # the MLP reads the same ln_1 output
        "blocks.{i}.ln2.b": From("h.{i}.ln_1.bias"),
        "blocks.{i}.mlp.W_in": From("h.{i}.mlp.fc_in.weight", transposed),
        "blocks.{i}.mlp.b_in": From("h.{i}.mlp.fc_in.bias"),
        "blocks.{i}.mlp.W_out": From("h.{i}.mlp.fc_out.weight", transposed),
        "blocks.{i}.mlp.b_out": From("h.{i}.mlp.fc_out.bias"),
        "ln_final.w": From("ln_f.weight"),
        "ln_final.b": From("ln_f.bias"),
        "unembed.W_U": From("lm_head.weight", transposed, fallback="wte.weight"),
        "unembed.b_U": From("lm_head.bias"),
    },
    prefixes=("transformer.", ""),
    ignored=(r"h\.\d+\.attn\.(masked_bias|bias|embed_positions)",),
    unsupported=unknown_activation("activation_function"),
)

ENTRIES = (GPTJ,)
