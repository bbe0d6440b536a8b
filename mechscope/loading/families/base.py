"""The vocabulary of the family tables: :class:`Family`, :class:`From`, and the tensor reshapes
that entries share. Each family's entry lives in its own module of this package."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

from einops import rearrange
from torch import Tensor

from mechscope.model.config import Activation, ModelConfig

Transform = Callable[[Tensor, ModelConfig], Tensor]


def unchanged(t: Tensor, cfg: ModelConfig) -> Tensor:
    return t


def transposed(t: Tensor, cfg: ModelConfig) -> Tensor:
    return t.T


def fused_qkv_weight(part: int) -> Transform:
    """One of Q, K, V from a fused ``[d_model, 3·d_model]`` projection (GPT-2's ``c_attn``)."""

    def take(t: Tensor, cfg: ModelConfig) -> Tensor:
        return rearrange(t, "d (part head e) -> part head d e", part=3, head=cfg.n_heads)[part]

    return take


def fused_qkv_bias(part: int) -> Transform:
    def take(t: Tensor, cfg: ModelConfig) -> Tensor:
        return rearrange(t, "(part head e) -> part head e", part=3, head=cfg.n_heads)[part]

    return take


def heads_to_output(t: Tensor, cfg: ModelConfig) -> Tensor:
    """An output projection stored ``[head·d_head, d_model]`` as ``[head, d_head, d_model]``."""
    return rearrange(t, "(head e) d -> head e d", head=cfg.n_heads)


def linear_to_heads(t: Tensor, cfg: ModelConfig) -> Tensor:
    """An ``nn.Linear`` projection ``[head·d_head, d_model]`` into ``[head, d_model, d_head]``
    (query heads or key/value heads, whichever the tensor holds)."""
    return rearrange(t, "(head e) d -> head d e", e=cfg.d_head)


def bias_to_heads(t: Tensor, cfg: ModelConfig) -> Tensor:
    """A projection bias ``[head·d_head]`` as ``[head, d_head]``."""
    return rearrange(t, "(head e) -> head e", e=cfg.d_head)


def linear_from_heads(t: Tensor, cfg: ModelConfig) -> Tensor:
    """An ``nn.Linear`` output projection ``[d_model, head·d_head]`` as ``[head, d_head, d_model]``."""
    return rearrange(t, "d (head e) -> head e d", e=cfg.d_head)


def rows(start: int | None = None, stop: int | None = None) -> Transform:
    """Rows ``start:stop`` of a tensor, e.g. a position table stored with an offset (OPT)."""

    def take(t: Tensor, cfg: ModelConfig) -> Tensor:
        return t[start:stop]

    return take


@dataclass(frozen=True)
class From:
    """A mechscope parameter comes from HuggingFace tensor ``name`` (``{i}`` is the layer).

    ``fallback`` is read when ``name`` is absent, e.g. a tied unembedding saved only once; a
    tuple lists several, tried in order.
    """

    name: str
    transform: Transform = unchanged
    fallback: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class Family:
    """One architecture: how its HuggingFace config becomes a :class:`ModelConfig`
    (``config`` returns ModelConfig fields), and where every mechscope parameter comes from
    (``weights``, keyed by parameter name with ``{i}`` for the layer)."""

    model_types: tuple[str, ...]
    config: Callable[[Any], dict[str, Any]]
    weights: dict[str, From]
    prefixes: tuple[str, ...] = ("",)  # prefixes HF checkpoints put before the tensor names
    ignored: tuple[str, ...] = ()  # HF tensors that carry no weights (buffers)
    unsupported: dict[str, Callable[[Any], bool]] = field(default_factory=dict)


def unknown_activation(field: str) -> dict[str, Callable[[Any], bool]]:
    """An ``unsupported`` entry refusing activation functions mechscope does not implement,
    read from the HuggingFace config field ``field``."""
    return {
        f"{field} other than {', '.join(get_args(Activation))}": lambda c: getattr(c, field) not in get_args(Activation)
    }
