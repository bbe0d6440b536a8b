"""OLMo 2: no norms before the sublayers but RMSNorms on the attention and MLP outputs, and an
RMSNorm over the whole query and key projections (all heads at once) before the rotary."""

from mechscope.loading.families.base import Family, From
from mechscope.loading.families.llama import IGNORED, PREFIXES, llama_config, llama_unsupported, llama_weights

OLMO2 = Family(
    model_types=("olmo2",),
    config=lambda c: llama_config(
        c,
        pre_norm=False,
        post_norm=True,
        qk_norm="all_heads",
        attn_bias=c.attention_bias,
        attn_out_bias=c.attention_bias,
    ),
    weights={
        name: rule
        for name, rule in llama_weights(qkv_bias=True, o_bias=True, qk_norm=True).items()
        if name not in ("blocks.{i}.ln1.w", "blocks.{i}.ln2.w")
    }
    | {
        "blocks.{i}.ln1_post.w": From("layers.{i}.post_attention_layernorm.weight"),
        "blocks.{i}.ln2_post.w": From("layers.{i}.post_feedforward_layernorm.weight"),
    },
    prefixes=PREFIXES,
    ignored=IGNORED,
    unsupported=llama_unsupported(),
)

ENTRIES = (OLMO2,)
