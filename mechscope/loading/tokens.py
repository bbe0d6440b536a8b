"""Text to token ids and back, with the conventions interpretability work relies on.

``prepend_bos``: a beginning-of-sequence token is put in front of every text (default: when the
tokenizer has one). Many heads use it as a resting place, so results change without it. Texts
are encoded *without* the tokenizer's own special tokens, so the BOS is added exactly once,
whatever the tokenizer would do by itself.

``padding_side``: a batch of texts of different lengths is padded on the right by default
(``"left"`` is also accepted). The attention mask returned marks the padding, and the model
counts positions over real tokens only, so either side gives the same logits at real tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

PaddingSide = Literal["left", "right"]


class TokenizerError(ValueError):
    """Text could not be turned into the tokens asked for."""


def require(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise TokenizerError(
            "this model has no tokenizer: pass token ids, or load a directory that includes tokenizer files"
        )
    return tokenizer


def bos_id(tokenizer: Any) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return candidate
    return 0


def encode(tokenizer: Any, text: str, prepend_bos: bool | None = None) -> list[int]:
    """One text to ids, with at most one BOS in front."""
    ids = list(require(tokenizer)(text, add_special_tokens=False)["input_ids"])
    bos = bos_id(tokenizer)
    if prepend_bos is None:
        prepend_bos = bos is not None
    if prepend_bos:
        if bos is None:
            raise TokenizerError("prepend_bos=True, but the tokenizer has neither a BOS nor an EOS token")
        ids = [bos, *ids]
    return ids


def to_tokens(
    tokenizer: Any,
    text: str | list[str],
    prepend_bos: bool | None = None,
    padding_side: PaddingSide = "right",
    max_length: int | None = None,
    truncate: bool = False,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Texts to a padded ``[batch, pos]`` id tensor and its attention mask (1 real, 0 padding).

    Texts longer than ``max_length`` are cut when ``truncate``; otherwise the model refuses them
    with an error naming its context length.
    """
    if padding_side not in ("left", "right"):
        raise TokenizerError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise TokenizerError("no text given: pass a string or a non-empty list of strings")
    sequences = [encode(tokenizer, t, prepend_bos) for t in texts]
    if truncate and max_length is not None:
        sequences = [s[:max_length] for s in sequences]
    if any(len(s) == 0 for s in sequences):
        raise TokenizerError("a text encodes to no tokens at all (empty string without a BOS)")
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        tokens[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return tokens, mask


def to_string(tokenizer: Any, tokens: Tensor | list[int]) -> str | list[str]:
    """Ids back to text: one string for ``[pos]``, a list for ``[batch, pos]``."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 2:
        return [to_string(tokenizer, row) for row in tokens]
    return require(tokenizer).decode(tokens.tolist())


def to_str_tokens(
    tokenizer: Any, input: str | list[str] | Tensor | list[int], prepend_bos: bool | None = None
) -> list[str] | list[list[str]]:
    """Each token as its own string: ``"Hello world"`` → ``["<|endoftext|>", "Hello", " world"]``."""
    if isinstance(input, str):
        ids = encode(tokenizer, input, prepend_bos)
    elif isinstance(input, list) and input and isinstance(input[0], str):
        return [to_str_tokens(tokenizer, t, prepend_bos) for t in input]
    else:
        ids = torch.as_tensor(input)
        if ids.ndim == 2:
            return [to_str_tokens(tokenizer, row) for row in ids]
        ids = ids.tolist()
    return [require(tokenizer).decode([i]) for i in ids]


def to_single_token(tokenizer: Any, string: str) -> int:
    """The id of a string that is exactly one token, e.g. ``" Mary"``; an error otherwise."""
    ids = encode(tokenizer, string, prepend_bos=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise TokenizerError(f"{string!r} is {len(ids)} tokens, not one: {pieces}")
    return ids[0]


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int, special_token: str, add_prefix_space: bool, **roles: Any
) -> Any:
    """GPT-2's scheme (byte-level BPE: words with their leading space, as bytes, merged) trained
    on ``texts`` with the ``tokenizers`` library, wrapped as a transformers fast tokenizer.

    ``roles`` name the special token's jobs (``bos_token=..., pad_token=...``) and any other
    ``PreTrainedTokenizerFast`` argument.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[special_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)
