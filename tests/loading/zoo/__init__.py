"""Tiny random HuggingFace models of every supported family, built with transformers' own
config classes. Each module of this package holds one family's ``VARIANTS``: a name mapped to
a function returning the HuggingFace config (the variants exercise the family's options)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 320  # every variant uses this vocabulary size, so one batch of token ids fits them all

# The size of a Llama-style variant (HuggingFace's field names); each adds its depth and options.
LLAMA_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    max_position_embeddings=64,
)


def _discover() -> dict[str, Callable]:
    variants: dict[str, Callable] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        variants.update(importlib.import_module(f"{__name__}.{module}").VARIANTS)
    return variants


VARIANTS: dict[str, Callable] = _discover()


def save_variant(name: str, directory: Path, seed: int = 0, noise: float = 0.05) -> Path:
    """Build variant ``name`` with random weights, perturb every norm weight and bias away from
    its 1 / 0 initialisation (so a mis-mapped one shows), and ``save_pretrained`` it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = VARIANTS[name]()
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * noise)
    hf.save_pretrained(directory)
    return directory
