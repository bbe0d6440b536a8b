"""mechscope: a microscope for transformer language models."""

from mechscope import zoo
from mechscope.loading import HookedTransformer, Model
from mechscope.model import ActivationCache, HookPoint, ModelConfig, Transformer, act_name

__version__ = "0.1.0"
__all__ = [
    "ActivationCache",
    "HookPoint",
    "HookedTransformer",
    "Model",
    "ModelConfig",
    "Transformer",
    "act_name",
    "zoo",
]
