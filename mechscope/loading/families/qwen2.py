"""Qwen2: Llama with biases on Q, K and V (none on the output), and a sliding window on the
layers ``layer_types`` marks ``sliding_attention`` (those from ``max_window_layers`` on)."""

from typing import Any

from mechscope.loading.families.base import Family
from mechscope.loading.families.llama import IGNORED, PREFIXES, llama_config, llama_unsupported, llama_weights

LAYER_TYPES = ("full_attention", "sliding_attention")


def sliding_windows(c: Any) -> dict[str, Any]:
    """The window and the layers it applies to; transformers turns ``use_sliding_window`` and
    ``max_window_layers`` into ``layer_types`` (and ``sliding_window`` None when it is off)."""
    layer_types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    layers = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if c.sliding_window is None or not layers:
        return dict(sliding_window=None, sliding_window_layers=None)
    return dict(sliding_window=c.sliding_window, sliding_window_layers=layers)


def unknown_layer_types() -> dict[str, Any]:
    """An ``unsupported`` entry refusing attention kinds other than full and sliding."""
    return {
        "layer_types other than " + ", ".join(LAYER_TYPES): lambda c: any(
            kind not in LAYER_TYPES for kind in getattr(c, "layer_types", None) or ()
        ),
    }


def qwen_unsupported() -> dict[str, Any]:
    return llama_unsupported() | unknown_layer_types()


QWEN2 = Family(
    model_types=("qwen2",),
    config=lambda c: llama_config(c, attn_bias=True, **sliding_windows(c)),
    weights=llama_weights(qkv_bias=True),
    prefixes=PREFIXES,
    ignored=IGNORED,
    unsupported=qwen_unsupported(),
)

ENTRIES = (QWEN2,)
