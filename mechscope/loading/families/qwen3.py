"""Qwen3: Llama with an RMSNorm over each query and key head (before the rotary), biases on all
four attention projections when ``attention_bias``, and Qwen2's per-layer sliding windows."""

from mechscope.loading.families.base import Family
from mechscope.loading.families.llama import IGNORED, PREFIXES, llama_config, llama_weights
from mechscope.loading.families.qwen2 import qwen_unsupported, sliding_windows

QWEN3 = Family(
    model_types=("qwen3",),
    config=lambda c: llama_config(
        c, qk_norm="per_head", attn_bias=c.attention_bias, attn_out_bias=c.attention_bias, **sliding_windows(c)
    ),
    weights=llama_weights(qkv_bias=True, o_bias=True, qk_norm=True),
    prefixes=PREFIXES,
    ignored=IGNORED,
    unsupported=qwen_unsupported(),
)

ENTRIES = (QWEN3,)
