"""Mistral: Llama without biases, whose ``sliding_window`` (when set) limits every layer's attention."""

from mechscope.loading.families.base import Family
from mechscope.loading.families.llama import IGNORED, PREFIXES, llama_config, llama_unsupported, llama_weights

MISTRAL = Family(
    model_types=("mistral",),
    config=lambda c: llama_config(c, sliding_window=c.sliding_window, sliding_window_layers=None),
    weights=llama_weights(),
    prefixes=PREFIXES,
    ignored=IGNORED,
    unsupported=llama_unsupported(),
)

ENTRIES = (MISTRAL,)
