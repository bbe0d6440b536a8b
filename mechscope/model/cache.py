"""The activations one forward pass stored, and the standard ways of slicing the residual
stream into parts (by layer, by component, by head) and reading them through the unembedding.

The cache holds exactly what ``run_with_cache`` was asked for. Methods that need something
missing say which hook names to cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from einops import einsum, rearrange
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.model.hooks import HookNameError, unknown_name_message
from mechscope.model.names import act_name

if TYPE_CHECKING:
    from mechscope.model.transformer import Transformer

PosSlice = int | slice | list[int] | Tensor | None
Labelled = Tensor | tuple[Tensor, list[str]]


def slice_dim(t: Tensor, index: PosSlice, dim: int) -> Tensor:
    """Index one dimension; an int removes it, as in TransformerLens' ``Slice``."""
    if index is None:
        return t
    if isinstance(index, list):
        index = torch.tensor(index, device=t.device)
    return t[(slice(None),) * (dim % t.ndim) + (index,)]


class ActivationCache(Mapping[str, Tensor]):
    """Dict-like access to cached activations: ``cache["blocks.0.attn.hook_pattern"]``,
    ``cache["pattern", 0]``, ``cache["resid_post", -1]``, ``cache["scale", 2, "ln1"]``."""

    def __init__(self, store: dict[str, Tensor], model: Transformer, has_batch_dim: bool = True) -> None:
        self._store = store
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ------------------------------------------------------------ mapping
    def _full_name(self, key: str | tuple) -> str:
        n_layers = self.model.cfg.n_layers
        if isinstance(key, tuple):
            return act_name(*key, n_layers=n_layers)
        return key if key in self._store else act_name(key, n_layers=n_layers)

    def __getitem__(self, key: str | tuple) -> Tensor:
        name = self._full_name(key)
        if name not in self._store:
            if name in self.model.hook_dict:
                raise HookNameError(
                    f"{name!r} was not cached: name it in run_with_cache's names_filter (and run its layer)"
                )
            raise HookNameError(unknown_name_message(name, self.model.hook_dict))
        return self._store[name]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, tuple)) and self._full_name(key) in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, {self.nbytes / 2**20:.1f} MiB: {list(self._store)[:4]}...)"

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self._store.values())

    def to(self, device: torch.device | str) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._store.items()}, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> ActivationCache:
        """The same cache for a batch of one, with the batch dimension dropped everywhere."""
        if not self.has_batch_dim:
            return self
        sizes = {v.shape[0] for v in self._store.values()}
        if sizes - {1}:
            raise ValueError(f"remove_batch_dim needs a batch of 1, but the cache has batch sizes {sorted(sizes)}")
        return ActivationCache({k: v[0] for k, v in self._store.items()}, self.model, has_batch_dim=False)

    # ------------------------------------------------------------ residual stream
    def _layer(self, layer: int | None) -> int:
        n = self.model.cfg.n_layers
        if layer is None:
            return n
        resolved = layer + n if layer < 0 else layer
        if not 0 <= resolved <= n:
            raise IndexError(f"layer {layer} is out of range for {n} layers")
        return resolved

    def _stacked(
        self,
        parts: list[tuple[str, Tensor]],
        pos_slice: PosSlice,
        return_labels: bool,
        apply_ln: bool,
        layer: int,
        mlp_input: bool = False,
    ) -> Labelled:
        """Stack labelled components along a new first dimension, optionally through the norm
        that reads them at ``layer`` (the tail every decomposition method shares)."""
        stack = torch.stack([slice_dim(t, pos_slice, -2) for _, t in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, [label for label, _ in parts]) if return_labels else stack

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Labelled:
        """The residual stream as it stood before each layer up to ``layer`` (None: all, plus the
        final stream), stacked as ``[component, batch, pos, d_model]`` — the logit lens' input."""
        layer = self._layer(layer)
        n = self.model.cfg.n_layers
        parts = []
        for i in range(layer):
            parts.append((f"{i}_pre", self["resid_pre", i]))
            if incl_mid and self._has_mid(i):
                parts.append((f"{i}_mid", self["resid_mid", i]))
        if mlp_input and layer < n:
            parts.append((f"{layer}_pre", self["resid_pre", layer]))
            if self._has_mid(layer):
                parts.append((f"{layer}_mid", self["resid_mid", layer]))
        elif layer == n:
            parts.append(("final_post", self["resid_post", n - 1]))
        else:
            parts.append((f"{layer}_pre", self["resid_pre", layer]))
        return self._stacked(parts, pos_slice, return_labels, apply_ln, layer, mlp_input)

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Labelled:
        """The residual stream entering ``layer`` (None: the final stream) split into what each
        component wrote: embeddings, then every attention and MLP output. The parts sum to it."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer(layer)
        parts = []
        if incl_embeds:
            parts.append(("embed", self["hook_embed"]))
            if "hook_pos_embed" in self.model.hook_dict:
                parts.append(("pos_embed", self["hook_pos_embed"]))
        mlp_reads_attn = mlp_input and layer < self.model.cfg.n_layers and self._has_mid(layer)
        for i in range(layer + (1 if mlp_reads_attn else 0)):
            if mode != "mlp":
                parts.append((f"{i}_attn_out", self["attn_out", i]))
            if mode != "attn" and i < layer and self.model.blocks[i].has_mlp:
                parts.append((f"{i}_mlp_out", self["mlp_out", i]))
        return self._stacked(parts, pos_slice, return_labels, apply_ln, layer, mlp_input)

    def _has_mid(self, layer: int) -> bool:
        """Whether block ``layer`` has a residual stream between attention and MLP (parallel
        blocks and attention-only blocks do not: their MLP, if any, reads ``resid_pre``)."""
        block = self.model.blocks[layer]
        return block.has_mlp and not block.parallel

    def head_results(self, layer: int) -> Float[Tensor, "batch pos head d_model"]:
        """What each head of ``layer`` wrote: the cached ``hook_result``, or computed from the
        cached ``hook_z`` and ``W_O`` (without the output bias, which belongs to no head)."""
        if ("result", layer) in self:
            return self["result", layer]
        if ("z", layer) not in self:
            raise HookNameError(f"per-head results of layer {layer} need 'blocks.{layer}.attn.hook_z' in the cache")
        W_O = self.model.blocks[layer].attn.W_O.to(self["z", layer].device)
        return einsum(self["z", layer], W_O, "... head d_head, head d_head d_model -> ... head d_model")

    def stack_head_results(
        self,
        layer: int | None = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: PosSlice = None,
        apply_ln: bool = False,
    ) -> Labelled:
        """Every head's output in layers before ``layer``, as ``[layer·head, batch, pos, d_model]``
        labelled ``L{layer}H{head}``. With ``incl_remainder``, one more component holds the rest of
        the residual stream, so the stack sums to it."""
        layer = self._layer(layer)
        parts = []
        for i in range(layer):
            per_head = rearrange(self.head_results(i), "... head d_model -> head ... d_model")
            parts += [(f"L{i}H{h}", per_head[h]) for h in range(per_head.shape[0])]
        if incl_remainder:
            total = self["resid_post", -1] if layer == self.model.cfg.n_layers else self["resid_pre", layer]
            heads = sum(t for _, t in parts) if parts else torch.zeros_like(total)
            parts.append(("remainder", total - heads))
        return self._stacked(parts, pos_slice, return_labels, apply_ln, layer)

    # ------------------------------------------------------------ through the norm and unembed
    def ln_scale(self, layer: int | None = None, mlp_input: bool = False) -> Float[Tensor, "... 1"]:
        """The norm's scale at ``layer`` (None: the final norm), cached or recomputed from the
        cached residual stream that the norm read."""
        layer = self._layer(layer)
        n = self.model.cfg.n_layers
        if layer == n:
            scale_name, input_name = "ln_final.hook_scale", act_name("resid_post", n - 1)
        elif mlp_input:
            stream = "resid_mid" if self._has_mid(layer) else "resid_pre"
            scale_name, input_name = act_name("scale", layer, "ln2"), act_name(stream, layer)
        else:
            scale_name, input_name = act_name("scale", layer, "ln1"), act_name("resid_pre", layer)
        if scale_name in self._store:
            return self._store[scale_name]
        if input_name not in self._store:
            raise HookNameError(f"applying the norm needs {scale_name!r} or {input_name!r} in the cache")
        x = self._store[input_name]
        if self.model.cfg.normalization == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        return (x.float().pow(2).mean(-1, keepdim=True) + self.model.cfg.eps).sqrt().to(x.dtype)

    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "... d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: PosSlice = None,
        batch_slice: PosSlice = None,
        has_batch_dim: bool = True,
    ) -> Float[Tensor, "... d_model"]:
        """Centre each component (LayerNorm; RMSNorm does not centre) and divide by the norm's
        scale from this forward pass.

        The norm is not linear, but with the scale fixed to its value on the full residual
        stream it is, so the normalised components still sum to the normalised stream. The
        norm's weight and bias are not applied (fold them into the weights, or see
        :meth:`logit_attrs`, which applies the final norm's weight).
        """
        if self.model.cfg.normalization == "none":
            return residual_stack
        scale = self.ln_scale(layer, mlp_input)
        if self.has_batch_dim:
            scale = slice_dim(scale, batch_slice, 0)
        scale = slice_dim(scale, pos_slice, -2)
        if not has_batch_dim:
            scale = scale[0] if self.has_batch_dim else scale
        if self.model.cfg.normalization == "layernorm":
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        return residual_stack / scale

    def unembed_directions(self, tokens: int | str | Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
        """The direction in the (normalised) residual stream that a token's logit reads:
        its unembedding column times the final norm's weight (``offset + w`` for RMSNorm)."""
        if isinstance(tokens, str):
            tokens = self.model.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.model.W_U.device)
        directions = rearrange(self.model.W_U[:, tokens], "d_model ... -> ... d_model")
        w = getattr(self.model.ln_final, "w", None)
        return directions if w is None else directions * (w + getattr(self.model.ln_final, "offset", 0.0))

    def logit_attrs(
        self,
        residual_stack: Float[Tensor, "... d_model"],
        tokens: int | str | Int[Tensor, "..."],
        incorrect_tokens: int | str | Int[Tensor, "..."] | None = None,
        pos_slice: PosSlice = None,
        batch_slice: PosSlice = None,
        has_batch_dim: bool = True,
    ) -> Float[Tensor, "..."]:
        """Direct logit attribution: each component's contribution to the logit of ``tokens``
        (minus that of ``incorrect_tokens``, when given).

        ``residual_stack`` is ``[component, ...]`` as returned by the stack methods, *before*
        the norm is applied (this method applies it). On an unprocessed model, the
        contributions plus the constant ``ln_final.b · W_U[:, t] + b_U[t]`` sum to the logit
        (before any final soft-capping, which is not linear: Gemma 2).
        """
        scaled = self.apply_ln_to_stack(
            residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
        )
        directions = self.unembed_directions(tokens)
        if incorrect_tokens is not None:
            directions = directions - self.unembed_directions(incorrect_tokens)
        return (scaled * directions.to(scaled.device)).sum(-1)
