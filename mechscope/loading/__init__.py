"""From HuggingFace checkpoints to mechscope models: family tables, weights, tokenizers."""

from mechscope.loading.families import FAMILIES, supported_model_types
from mechscope.loading.pretrained import HookedTransformer, Model

__all__ = ["FAMILIES", "HookedTransformer", "Model", "supported_model_types"]
