"""Text generation: pick the next token, append it, repeat — with hooks active on every step.

With the key-value cache (the default) the prompt runs once and each later step computes only
the newest token; without it every step re-runs the whole sequence. Both give the same tokens.
Rows of a batch may have different prompt lengths: they are left-padded, the padding masked,
and positions counted over real tokens, so each row generates exactly what it would alone.

Decoding: ``temperature=0`` is greedy (the most likely token); otherwise logits are divided
by the temperature, cut to the ``top_k`` most likely tokens and/or the smallest set whose
probability reaches ``top_p`` (nucleus sampling), and a token is sampled.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.model.inputs import InputError
from mechscope.model.kv_cache import KeyValueCache

if TYPE_CHECKING:
    from mechscope.model.transformer import Transformer


def next_token(
    logits: Float[Tensor, "batch d_vocab"],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """Choose each row's next token from its final-position logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None:
        logits = nucleus(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def nucleus(logits: Float[Tensor, "batch d_vocab"], top_p: float) -> Float[Tensor, "batch d_vocab"]:
    """Keep the most likely tokens until their probabilities add up to ``top_p`` (at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
    drop_sorted = before >= top_p  # the mass before this token already reached top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must lie in (0, 1], got {top_p}")


def stream_tokens(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    max_new_tokens: int = 20,
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | list[int] | None = None,
    pad_token: int | None = None,
    use_kv_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[Int[Tensor, " batch"]]:
    """Yield each step's new token for every row until ``max_new_tokens`` or every row stopped.

    A row that produced a stop token is finished: from then on it receives ``pad_token``
    (the first stop token if not given) and is not sampled.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    if tokens.shape[1] + max_new_tokens - 1 > model.cfg.n_ctx:  # the last new token is never fed back
        raise InputError(
            f"a {tokens.shape[1]}-token prompt plus max_new_tokens={max_new_tokens} exceeds the model's context "
            f"of n_ctx={model.cfg.n_ctx} tokens"
        )
    stops = torch.tensor([stop_tokens] if isinstance(stop_tokens, int) else (stop_tokens or []), device=tokens.device)
    pad = pad_token if pad_token is not None else (int(stops[0]) if len(stops) else 0)
    mask = attention_mask if attention_mask is not None else torch.ones_like(tokens)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    cache = KeyValueCache(model.cfg.n_layers) if use_kv_cache else None
    step_input, step_mask = tokens, mask
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(step_input, attention_mask=step_mask, past_kv_cache=cache)
            new = next_token(logits[:, -1], temperature, top_k, top_p, generator)
            new = torch.where(finished, torch.full_like(new, pad), new)
            yield new
            finished |= torch.isin(new, stops)
            if bool(finished.all()):
                return
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(new[:, None])], dim=1)
            step_input, step_mask = (new[:, None], None) if use_kv_cache else (tokens, mask)


def generate_tokens(model: Transformer, tokens: Int[Tensor, "batch pos"], *args, **kwargs) -> Int[Tensor, "batch _"]:
    """The prompt followed by the generated tokens (see :func:`stream_tokens` for the options)."""
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    new = list(stream_tokens(model, tokens, *args, **kwargs))
    return torch.cat([tokens, torch.stack(new, dim=1)], dim=1)
