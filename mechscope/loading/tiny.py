"""Tiny random HuggingFace checkpoints, built locally with transformers' own classes.

Nothing here downloads anything: the model is a random ``GPT2LMHeadModel`` and the tokenizer a
byte-level BPE trained in a second on sentences generated here. ``save_tiny_gpt2`` writes both
with ``save_pretrained``, so loading them exercises exactly the code path of a hub model. Used
by the test suite.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from mechscope.loading.tokens import train_byte_level_bpe

BOS = "<|endoftext|>"
NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna", "Sam", "Kate"]
PLACES = ["store", "park", "school", "garden", "station", "market"]
OBJECTS = ["bag", "book", "ball", "apple", "letter", "key"]
VERBS = ["gave", "handed", "passed", "threw", "showed"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """Simple English-like sentences, enough to train a small tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        place, obj, verb = rng.choice(PLACES), rng.choice(OBJECTS), rng.choice(VERBS)
        out.append(f"When {a} and {b} went to the {place}, {b} {verb} a {obj} to {a}.")
    return out


def train_tokenizer(vocab_size: int = 320, seed: int = 0) -> Any:
    """A GPT-2-style byte-level BPE tokenizer as a transformers ``PreTrainedTokenizerFast``."""
    return train_byte_level_bpe(
        sentences(2000, seed), vocab_size, BOS, add_prefix_space=False, bos_token=BOS, eos_token=BOS, unk_token=BOS
    )


def tiny_gpt2(seed: int = 0, **overrides: Any) -> Any:
    """A random ``GPT2LMHeadModel`` with small widths (any ``GPT2Config`` field can be overridden)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()

    fields = dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=320, bos_token_id=0, eos_token_id=0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**fields))
    with torch.no_grad():  # random LayerNorm parameters, so that tests see them
        for name, param in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def save_tiny_gpt2(directory: str | Path, seed: int = 0, with_tokenizer: bool = True, **overrides: Any) -> Path:
    """Write a tiny random GPT-2 checkpoint (and tokenizer) to ``directory`` and return it."""
    directory = Path(directory)
    tiny_gpt2(seed, **overrides).save_pretrained(directory)
    if with_tokenizer:
        train_tokenizer(overrides.get("vocab_size", 320), seed).save_pretrained(directory)
    return directory
