"""The vocabulary of the family tables: :class:`Family`, :class:`From`, and the tensor reshapes
that entries share. Each family's entry lives in its own module of this package."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

from einops import rearrange
from torch import Tensor

from mechscope.model.config import ROPE_KEYS, Activation, ModelConfig, RopeKind

Transform = Callable[[Tensor, ModelConfig], Tensor]


def unchanged(t: Tensor, cfg: ModelConfig) -> Tensor:
    return t


def transposed(t: Tensor, cfg: ModelConfig) -> Tensor:
    return t.T


def fused(pattern: str, part: int) -> Transform:
    """Part ``part`` of a fused projection, split by the einops ``pattern`` (which names the
    parts ``part`` and the heads ``head``): Q, K, V from one ``c_attn`` or ``query_key_value``."""

    def take(t: Tensor, cfg: ModelConfig) -> Tensor:
        return rearrange(t, pattern, part=3, head=cfg.n_heads)[part]

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


def unknown_rope_type() -> dict[str, Callable[[Any], bool]]:
    """An ``unsupported`` entry refusing rope scaling kinds mechscope does not implement."""
    return {f"rope_type other than {', '.join(get_args(RopeKind))}": lambda c: rope_type(c) not in get_args(RopeKind)}


def rope_parameters(c: Any) -> dict[str, Any]:
    """transformers 5 keeps every rotary setting in ``config.rope_parameters``."""
    return getattr(c, "rope_parameters", None) or {}


def rope_type(c: Any) -> str:
    return rope_parameters(c).get("rope_type", "default")


def rotary_fields(c: Any, d_head: int, partial: bool) -> dict[str, Any]:
    """The rotary ModelConfig fields (NeoX pairing) and the context length of a config.

    ``partial``: whether the family rotates only ``partial_rotary_factor`` of each head
    (GPT-NeoX, Phi-3); Llama's default rotary ignores that setting. ``n_ctx`` is
    ``max_position_embeddings``, except for dynamic NTK scaling, which exists to run past that
    length: there it is ``max_position_embeddings * factor``, the context the scaling is meant
    to reach (HuggingFace itself sets no limit on rotary models). Dynamic scaling counts from
    ``max_position_embeddings``, as HuggingFace's does.
    """
    params, kind = rope_parameters(c), rope_type(c)
    fields = dict(
        positional_embedding="rotary",
        rotary_style="neox",
        rotary_base=float(params.get("rope_theta", 10000.0)),
        rope_scaling=None,
        n_ctx=c.max_position_embeddings,
    )
    if partial:
        fields["rotary_dim"] = int(d_head * params.get("partial_rotary_factor", 1.0))
    if kind != "default":  # missing keys are reported by ModelConfig, naming them
        scaling = {"rope_type": kind} | {key: params[key] for key in ROPE_KEYS.get(kind, ()) if key in params}
        if kind == "dynamic":
            scaling["original_max_position_embeddings"] = c.max_position_embeddings
            fields["n_ctx"] = math.ceil(c.max_position_embeddings * params["factor"])
        fields["rope_scaling"] = scaling
    return fields
