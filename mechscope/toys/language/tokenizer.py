"""A byte-level BPE tokenizer trained on the synthetic corpus, in HuggingFace format.

Byte-level BPE is GPT-2's scheme: text is split into words with their leading space, each word
is bytes, and frequent byte pairs are merged. Trained on our small grammar, a vocabulary of a
few hundred tokens makes every name one token (" Mary"), which the indirect-object analysis
needs: the answer is then a single next-token prediction. ``<|endoftext|>`` separates
documents and is the BOS, EOS and padding token, as in GPT-2.

The tokenizer is a function of the corpus seed alone (training BPE is deterministic), and it is
saved with the model's weights, so a checkpoint never depends on retraining it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mechscope.loading.tokens import train_byte_level_bpe
from mechscope.toys.language import grammar

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``vocab_size`` tokens (256 bytes, ``<|endoftext|>``, then merges) trained on ``texts``."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes, <|endoftext|> and one merge), got {vocab_size}")
    roles = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "unk_token": None, "model_max_length": None}
    # A prefix space makes a word at the start of a document the same token as mid-text.
    return train_byte_level_bpe(texts, vocab_size, EOS, add_prefix_space=True, **roles)


def build_tokenizer(seed: int, vocab_size: int, n_documents: int = 20_000) -> PreTrainedTokenizerFast:
    """The organism's tokenizer: BPE trained on ``n_documents`` generated from ``seed``, checked."""
    tokenizer = train_tokenizer((d.text for d in grammar.corpus(seed, n_documents)), vocab_size)
    check_single_tokens(tokenizer, [" " + name for name in grammar.NAMES])
    return tokenizer


def check_single_tokens(tokenizer: PreTrainedTokenizerFast, words: Sequence[str]) -> None:
    """Every word in ``words`` (with its leading space) must be one token; name the ones that are not."""
    split = {w: tokenizer.convert_ids_to_tokens(tokenizer.encode(w)) for w in words}
    split = {w: pieces for w, pieces in split.items() if len(pieces) != 1}
    if split:
        listing = ", ".join(f"{w!r} -> {pieces}" for w, pieces in split.items())
        raise ValueError(
            f"{len(split)} word(s) are not single tokens with vocab_size={tokenizer.vocab_size}: {listing}; "
            "raise vocab_size"
        )


def token_positions(
    tokenizer: PreTrainedTokenizerFast, text: str, offsets: Sequence[int], bos: bool = True
) -> list[int]:
    """The position of the token holding each character offset of ``text`` (e.g. a sample's
    ``first_offset``), counting the BOS that the model's ``to_tokens`` puts in front when ``bos``."""
    encoding = tokenizer(text, add_special_tokens=False)
    positions = [encoding.char_to_token(offset) for offset in offsets]
    if None in positions:
        raise ValueError(f"offsets {list(offsets)} are not all inside tokens of a text of {len(text)} characters")
    return [position + int(bos) for position in positions]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """HuggingFace format (tokenizer.json + tokenizer_config.json), loadable with ``AutoTokenizer``."""
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(directory))
