"""How each HuggingFace architecture maps onto mechscope's model: one declarative entry each.

An entry says which ``model_type`` values it covers, how to read a :class:`ModelConfig` off the
HuggingFace config, which config options it cannot honour, and, for every mechscope parameter,
which HuggingFace tensor it comes from and how that tensor is reshaped. Nothing else in the
package branches on the architecture's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from einops import rearrange
from torch import Tensor

from mechscope.model.config import ModelConfig

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


@dataclass(frozen=True)
class From:
    """A mechscope parameter comes from HuggingFace tensor ``name`` (``{i}`` is the layer).

    ``fallback`` is read when ``name`` is absent, e.g. a tied unembedding saved only once.
    """

    name: str
    transform: Transform = unchanged
    fallback: str | None = None


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    config: Callable[[Any], dict[str, Any]]
    weights: dict[str, From]
    prefixes: tuple[str, ...] = ("",)  # prefixes HF checkpoints put before the tensor names
    ignored: tuple[str, ...] = ()  # HF tensors that carry no weights (buffers)
    unsupported: dict[str, Callable[[Any], bool]] = field(default_factory=dict)


GPT2 = Family(
    model_types=("gpt2",),
    config=lambda c: dict(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        d_mlp=c.n_inner or 4 * c.n_embd,
        act_fn=c.activation_function,
        eps=c.layer_norm_epsilon,
        attn_scale=(c.n_embd // c.n_head) ** 0.5 if c.scale_attn_weights else 1.0,
    ),
    weights={
        "embed.W_E": From("wte.weight"),
        "pos_embed.W_pos": From("wpe.weight"),
        "blocks.{i}.ln1.w": From("h.{i}.ln_1.weight"),
        "blocks.{i}.ln1.b": From("h.{i}.ln_1.bias"),
        "blocks.{i}.attn.W_Q": From("h.{i}.attn.c_attn.weight", fused_qkv_weight(0)),
        "blocks.{i}.attn.W_K": From("h.{i}.attn.c_attn.weight", fused_qkv_weight(1)),
        "blocks.{i}.attn.W_V": From("h.{i}.attn.c_attn.weight", fused_qkv_weight(2)),
        "blocks.{i}.attn.b_Q": From("h.{i}.attn.c_attn.bias", fused_qkv_bias(0)),
        "blocks.{i}.attn.b_K": From("h.{i}.attn.c_attn.bias", fused_qkv_bias(1)),
        "blocks.{i}.attn.b_V": From("h.{i}.attn.c_attn.bias", fused_qkv_bias(2)),
        "blocks.{i}.attn.W_O": From("h.{i}.attn.c_proj.weight", heads_to_output),
        "blocks.{i}.attn.b_O": From("h.{i}.attn.c_proj.bias"),
        "blocks.{i}.ln2.w": From("h.{i}.ln_2.weight"),
        "blocks.{i}.ln2.b": From("h.{i}.ln_2.bias"),
        "blocks.{i}.mlp.W_in": From("h.{i}.mlp.c_fc.weight"),
        "blocks.{i}.mlp.b_in": From("h.{i}.mlp.c_fc.bias"),
        "blocks.{i}.mlp.W_out": From("h.{i}.mlp.c_proj.weight"),
        "blocks.{i}.mlp.b_out": From("h.{i}.mlp.c_proj.bias"),
        "ln_final.w": From("ln_f.weight"),
        "ln_final.b": From("ln_f.bias"),
        "unembed.W_U": From("lm_head.weight", transposed, fallback="wte.weight"),
    },
    prefixes=("transformer.", ""),
    ignored=(r"h\.\d+\.attn\.(masked_)?bias",),
    unsupported={
        "scale_attn_by_inverse_layer_idx": lambda c: bool(c.scale_attn_by_inverse_layer_idx),
        "add_cross_attention": lambda c: bool(c.add_cross_attention),
    },
)

FAMILIES: tuple[Family, ...] = (GPT2,)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model_type: str) -> Family:
    """The family entry for a HuggingFace ``model_type``; an unknown one lists what is supported."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise NotImplementedError(
        f"architecture {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
    )


def config_for(family: Family, hf_config: Any, **overrides: Any) -> ModelConfig:
    """Translate a HuggingFace config, refusing options this family's entry cannot honour."""
    used = [option for option, is_set in family.unsupported.items() if is_set(hf_config)]
    if used:
        raise NotImplementedError(
            f"{hf_config.model_type} option(s) {', '.join(used)} are not supported by mechscope yet"
        )
    fields = family.config(hf_config)
    fields.update(original_architecture=hf_config.model_type, **overrides)
    if fields.get("tokenizer_name") is None:
        fields["tokenizer_name"] = getattr(hf_config, "name_or_path", None) or None
    return ModelConfig(**fields)
