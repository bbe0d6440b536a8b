"""Prompts as the report and the workbench receive them: text typed by a person, or token ids.

Everything a person types is checked here once, before any forward pass, and refused with an
:class:`InputError` whose message says what was wrong and what the limit is. The page shows
that message as it is, so it must read as a sentence, never as a stack trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.loading import tokens as tok
from mechscope.model.inputs import InputError  # the model's own error for unusable input

__all__ = ["InputError", "Prompt", "check_prompt", "read_prompt", "same_length", "single_token", "top_predictions"]


@dataclass
class Prompt:
    """A prompt as the model reads it: ids ``[1, pos]``, one display string per token, and a
    way to show any other token id (a prediction) as text."""

    ids: Int[Tensor, "1 pos"]
    labels: list[str]
    decode: Callable[[int], str]

    @property
    def length(self) -> int:
        return self.ids.shape[1]


def token_limit(model: Any, max_tokens: int | None) -> int:
    """The longest prompt accepted: the model's context, or less if the caller says so."""
    return model.cfg.n_ctx if max_tokens is None else min(max_tokens, model.cfg.n_ctx)


def decoder(model: Any) -> Callable[[int], str]:
    """Token id → display text: the tokenizer's, or ``#id`` for a model without one."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return lambda token: f"#{token}"
    return lambda token: tok.to_string(tokenizer, [int(token)])


def read_prompt(
    model: Any,
    prompt: str | Tensor,
    *,
    what: str = "prompt",
    max_tokens: int | None = None,
    labels: Sequence[str] | None = None,
) -> Prompt:
    """Text (tokenised with BOS, as the model's own ``to_tokens`` does) or ids ``[pos]`` /
    ``[1, pos]``, checked against the vocabulary and the length limit."""
    limit = token_limit(model, max_tokens)
    ids = text_ids(model, prompt, what) if isinstance(prompt, str) else tensor_ids(model, prompt, what)
    if ids.shape[1] > limit:
        raise InputError(f"the {what} is {ids.shape[1]} tokens long; the limit is {limit} tokens")
    decode = decoder(model)
    shown = [decode(t) for t in ids[0].tolist()] if labels is None else list(labels)
    if len(shown) != ids.shape[1]:
        raise InputError(f"{len(shown)} labels were given for a {what} of {ids.shape[1]} tokens")
    return Prompt(ids.to(model.W_E.device), shown, decode)


MAX_CHARACTERS = 100_000  # refuse a pasted book before spending time tokenising it


def text_ids(model: Any, text: str, what: str) -> Int[Tensor, "1 pos"]:
    if not text.strip():
        raise InputError(f"the {what} is empty; type some text")
    if len(text) > MAX_CHARACTERS:
        raise InputError(f"the {what} is {len(text):,} characters long; the limit is {MAX_CHARACTERS:,}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate: no tokenizer can read it
        raise InputError(f"the {what} is not valid Unicode text (at character {error.start})") from None
    if getattr(model, "tokenizer", None) is None:
        raise InputError(f"this model has no tokenizer, so the {what} must be given as token ids")
    return tok.to_tokens(model.tokenizer, [text], None, "right", None, False)[0]


def tensor_ids(model: Any, ids: Tensor, what: str) -> Int[Tensor, "1 pos"]:
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0 or ids.dtype.is_floating_point:
        raise InputError(f"the {what} must be integer token ids of shape [pos] or [1, pos], got {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= model.cfg.d_vocab:
        raise InputError(
            f"the {what} holds token ids from {low} to {high}; the vocabulary is 0..{model.cfg.d_vocab - 1}"
        )
    return ids.long()


def check_prompt(model: Any, text: str | Tensor, *, what: str = "prompt", max_tokens: int | None = None) -> Tensor:
    """The ids ``[1, pos]`` of a prompt, or an :class:`InputError` saying why it cannot be used."""
    return read_prompt(model, text, what=what, max_tokens=max_tokens).ids


def single_token(model: Any, token: str | int, what: str) -> int:
    """The id of an answer given as one token's text (``" Mary"``) or as an id."""
    if isinstance(token, int):
        if not 0 <= token < model.cfg.d_vocab:
            raise InputError(f"the {what} token id {token} is outside the vocabulary 0..{model.cfg.d_vocab - 1}")
        return token
    if not token:
        raise InputError(f"the {what} is empty; give one token, such as ' Mary' (mind the leading space)")
    if getattr(model, "tokenizer", None) is None:
        raise InputError(f"this model has no tokenizer, so the {what} must be a token id")
    ids = tok.encode(model.tokenizer, token, prepend_bos=False)
    if len(ids) != 1:
        pieces = [tok.to_string(model.tokenizer, [i]) for i in ids]
        raise InputError(f"the {what} {token!r} is {len(ids)} tokens ({pieces}); it must be exactly one")
    return ids[0]


def same_length(clean: Prompt, corrupted: Prompt) -> None:
    """Patching pairs positions one to one, so the two prompts must tokenise to the same length."""
    if clean.length != corrupted.length:
        raise InputError(
            f"the clean prompt is {clean.length} tokens and the corrupted one {corrupted.length}; "
            "patching needs the same number of tokens in both (swap words of one token each)"
        )


def top_predictions(logits: torch.Tensor, decode: Callable[[int], str], k: int) -> tuple[list[list[str]], torch.Tensor]:
    """The ``k`` likeliest next tokens at every position, as text, with their probabilities."""
    probs = logits.float().softmax(-1)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[decode(t) for t in row] for row in top.indices.tolist()], top.values
