"""Gemma: Llama with RMSNorm multiplying by ``1 + w`` (w stored around 0, loaded raw), the token
embedding scaled by ``sqrt(d_model)``, a GeGLU MLP, and ``head_dim`` independent of ``d_model``."""

from typing import Any

from mechscope.loading.families.base import Family
from mechscope.loading.families.llama import IGNORED, PREFIXES, llama_config, llama_unsupported, llama_weights


def gemma_fields(c: Any) -> dict[str, Any]:
    """What Gemma and Gemma 2 add to a Llama config. HuggingFace casts the embedding scale to
    the weights' dtype before multiplying (sqrt(3072) becomes 55.5 in bfloat16)."""
    return dict(
        norm_weight_offset=1.0,
        embed_scale=c.hidden_size**0.5,
        attn_bias=c.attention_bias,
        attn_out_bias=c.attention_bias,
    )


BIDIRECTIONAL = {"use_bidirectional_attention": lambda c: bool(getattr(c, "use_bidirectional_attention", None))}

GEMMA = Family(
    model_types=("gemma",),
    # GemmaConfig has already turned the legacy hidden_act "gelu" into "gelu_pytorch_tanh";
    # transformers reads hidden_act, never hidden_activation, for Gemma 1
    config=lambda c: llama_config(c, **gemma_fields(c)),
    weights=llama_weights(qkv_bias=True, o_bias=True),
    prefixes=PREFIXES,
    ignored=IGNORED,
    unsupported=llama_unsupported() | BIDIRECTIONAL,
)

ENTRIES = (GEMMA,)
