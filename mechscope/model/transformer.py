"""A decoder-only transformer, written to be read.

The residual stream is the spine: token and position embeddings start it, each block reads
from it (attention, then the MLP) and adds its output back, and the final LayerNorm and the
unembedding turn it into logits. Every intermediate passes through a named
:class:`~mechscope.model.hooks.HookPoint`, so any of it can be cached or changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechscope.model import inputs
from mechscope.model.attention import Attention, AttentionContext, softcap
from mechscope.model.cache import ActivationCache
from mechscope.model.components import Embed, PosEmbed, Unembed, split_per_head
from mechscope.model.config import ModelConfig
from mechscope.model.generate import generate_tokens, stream_tokens
from mechscope.model.hooks import HookFn, HookHandle, HookPoint, NameFilter, attached, resolve
from mechscope.model.kv_cache import KeyValueCache
from mechscope.model.mlp import MLP
from mechscope.model.norms import make_norm
from mechscope.model.rotary import rotary_angles

ReturnType = Literal["logits", "loss", "both"] | None


class TransformerBlock(nn.Module):
    """Attention then MLP, each reading a normalised copy of the residual stream and adding
    its output back (pre-norm, as in GPT-2).

    The configuration varies the plumbing, not the idea: ``post_norm`` also normalises each
    sublayer's output before it is added (Gemma 2; OLMo 2 without the pre-norms), and
    ``parallel_attn_mlp`` feeds attention and MLP the same input and adds both at once
    (GPT-J, Pythia), so such blocks have no ``hook_resid_mid``.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.cfg = cfg
        self.has_mlp = cfg.has_mlp
        self.parallel = cfg.parallel_attn_mlp and self.has_mlp
        identity = nn.Identity
        # Registered in the order they run, so hook_dict lists hook points in execution order.
        self.hook_resid_pre = HookPoint()
        self.hook_attn_in = HookPoint(opt_in=True)  # [batch, pos, head, d_model]
        self.hook_q_input = HookPoint(opt_in=True)
        self.hook_k_input = HookPoint(opt_in=True)  # [batch, pos, kv_head, d_model]
        self.hook_v_input = HookPoint(opt_in=True)
        self.ln1 = make_norm(cfg) if cfg.pre_norm else identity()
        self.attn = Attention(cfg, layer)
        self.ln1_post = make_norm(cfg) if cfg.post_norm else identity()
        self.hook_attn_out = HookPoint()
        if self.has_mlp:
            if not self.parallel:
                self.hook_resid_mid = HookPoint()
            self.hook_mlp_in = HookPoint(opt_in=True)
            self.ln2 = make_norm(cfg) if cfg.pre_norm else identity()
            self.mlp = MLP(cfg)
            self.ln2_post = make_norm(cfg) if cfg.post_norm else identity()
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self, resid_pre: Float[Tensor, "batch pos d_model"], ctx: AttentionContext
    ) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.ln1_post(self.attn(*self.attention_inputs(resid_pre), ctx)))
        if not self.has_mlp:
            return self.hook_resid_post(resid_pre + attn_out)
        if self.parallel:
            return self.hook_resid_post(resid_pre + attn_out + self.mlp_out(resid_pre))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        return self.hook_resid_post(resid_mid + self.mlp_out(resid_mid))

    def mlp_out(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.hook_mlp_out(self.ln2_post(self.mlp(self.ln2(self.hook_mlp_in(resid)))))

    def attention_inputs(self, resid_pre: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised inputs for queries, keys and values.

        Normally one tensor shared by all heads. When a per-head input hook is in use, each
        head gets its own copy of the residual stream (before the norm), so patching one head's
        query input leaves every other head untouched. Keys and values get one copy per
        key/value head.
        """
        per_head_hooks = (self.hook_attn_in, self.hook_q_input, self.hook_k_input, self.hook_v_input)
        if not any(h.is_active for h in per_head_hooks):
            x = self.ln1(resid_pre)
            return x, x, x
        per_head = self.hook_attn_in(split_per_head(resid_pre, self.cfg.n_heads))
        group = self.cfg.n_heads // self.cfg.n_kv_heads_exposed
        per_kv_head = per_head if group == 1 else per_head[:, :, ::group].contiguous()  # one per key/value head
        return (
            self.ln1(self.hook_q_input(per_head)),
            self.ln1(self.hook_k_input(per_kv_head)),
            self.ln1(self.hook_v_input(per_kv_head)),
        )


class Transformer(nn.Module):
    """The hooked transformer: a config in, every activation reachable by name.

    ``Transformer(cfg)`` builds a randomly initialised model. Loading pretrained weights and
    tokenizers lives one layer up, in :class:`mechscope.Model`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        if cfg.positional_embedding == "learned":
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
        self.ln_final = make_norm(cfg)
        self.unembed = Unembed(cfg)
        self.layer_devices: list[torch.device] | None = None  # set when layers are split across devices
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ----------------------------------------------------------------- weights
    def init_weights(self) -> None:
        """GPT-2's initialisation: normal(0, initializer_range) matrices, zero biases, unit norms."""
        generator = torch.Generator().manual_seed(self.cfg.seed) if self.cfg.seed is not None else None
        with torch.no_grad():
            for name, param in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf.startswith("W_"):
                    noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                    param.copy_(noise * self.cfg.initializer_range)
                elif leaf.startswith("b_"):
                    param.zero_()
        for module in self.modules():
            if hasattr(module, "reset_parameters") and not isinstance(module, Transformer):
                module.reset_parameters()  # norms: unit scale, zero shift

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | Float[Tensor, "batch pos d_model"],
        return_type: ReturnType = "logits",
        *,
        attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
        position_ids: Int[Tensor, "#batch pos"] | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        loss_per_token: bool = False,
        past_kv_cache: KeyValueCache | None = None,
    ) -> Tensor | tuple[Tensor, Tensor] | None:
        """Run the model.

        ``input`` is a batch of token ids (or one sequence), or, with ``start_at_layer``, the
        residual stream entering that block. ``attention_mask`` marks real tokens (1) and padding
        (0); positions are then counted over real tokens only, so a left-padded prompt is
        computed exactly like the unpadded one. With ``stop_at_layer`` the residual stream entering that block
        is returned instead of logits. ``return_type`` is ``"logits"``, ``"loss"`` (mean
        next-token cross-entropy over non-padding pairs), ``"both"`` or ``None``.
        ``past_kv_cache`` holds the keys and values of earlier tokens (see ``generate``): the
        input is then only the new tokens, and the cache is extended with them.
        """
        n_layers = self.cfg.n_layers
        start = inputs.layer_index(start_at_layer, n_layers, "start_at_layer", default=0)
        stop = inputs.layer_index(stop_at_layer, n_layers, "stop_at_layer", default=n_layers)
        if start_at_layer is None:
            tokens = inputs.check_tokens(input, self.cfg, n_past=0 if past_kv_cache is None else past_kv_cache.n_seen)
            resid_shape = tokens.shape
        else:
            inputs.check_residual(input, self.cfg)
            resid_shape = input.shape[:2]
            tokens = None if tokens is None else inputs.check_tokens(tokens, self.cfg, shape=resid_shape)
        attention_mask = inputs.check_attention_mask(attention_mask, resid_shape)
        ctx, positions = self.attention_context(attention_mask, position_ids, resid_shape, input.device, past_kv_cache)

        try:
            resid = self.embed_tokens(tokens, positions) if start_at_layer is None else input
            for block in self.blocks[start:stop]:
                if self.layer_devices is not None:  # layers split across devices: follow the residual stream
                    resid = resid.to(self.layer_devices[block.layer])
                resid = block(resid, ctx)
        except BaseException:
            if past_kv_cache is not None:  # a failed step must not leave half of itself cached
                past_kv_cache.truncate(past_kv_cache.n_seen - resid_shape[1])
            raise
        if stop_at_layer is not None:
            return resid
        resid = resid.to(self.unembed.W_U.device)
        if return_type is None:
            return None
        logits = self.unembed(self.ln_final(resid))
        if self.cfg.final_softcap is not None:
            logits = softcap(logits, self.cfg.final_softcap)
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError("a loss needs the tokens: pass tokens= when starting at a layer")
        loss = next_token_loss(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def attention_context(
        self,
        attention_mask: Int[Tensor, "batch pos"] | None,
        position_ids: Int[Tensor, "#batch pos"] | None,
        shape: torch.Size,
        device: torch.device,
        cache: KeyValueCache | None,
    ) -> tuple[AttentionContext, Int[Tensor, "batch pos"]]:
        """Positions of the new tokens, and what attention needs to know for this pass: the
        padding of every key (cached ones too) and the rotary angles."""
        past_real = None if cache is None else cache.n_real()
        if past_real is not None and past_real.shape[0] != shape[0]:
            raise inputs.InputError(
                f"the key-value cache holds {past_real.shape[0]} sequences but the input has {shape[0]}"
            )
        positions = inputs.positions(attention_mask, position_ids, shape, self.cfg, device, past=past_real)
        padding = attention_mask
        if cache is not None:  # only now, with the input validated, does the cache change
            padding = cache.extend_mask(attention_mask, tuple(shape), device)
        rotary = None
        if self.cfg.positional_embedding == "rotary":
            rotary = rotary_angles(self.cfg, positions, self.W_E.dtype)
        n_key = shape[1] if cache is None else cache.n_seen
        return AttentionContext(shape[1], padding, n_key, rotary, cache), positions

    def embed_tokens(
        self, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream before the first block: token plus position embeddings."""
        resid = self.hook_embed(self.embed(tokens))
        if self.cfg.positional_embedding == "learned":
            resid = resid + self.hook_pos_embed(self.pos_embed(positions))
        return resid

    # ----------------------------------------------------------------- generation
    def generate(
        self,
        input: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
        max_new_tokens: int = 20,
        *,
        fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
        **options,
    ) -> Int[Tensor, "batch _"]:
        """The prompt followed by up to ``max_new_tokens`` generated tokens; ``fwd_hooks`` are
        active on every step. Options (``temperature`` (0: greedy, the default), ``top_k``,
        ``top_p``, ``stop_tokens``, ``attention_mask``, ``use_kv_cache``, ``generator``) are
        those of :func:`mechscope.model.generate.stream_tokens`."""
        with self.hooks(fwd_hooks):
            return generate_tokens(self, input, max_new_tokens, **options)

    def generate_stream(
        self,
        input: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
        max_new_tokens: int = 20,
        *,
        fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
        **options,
    ) -> Iterator[Int[Tensor, " batch"]]:
        """As :meth:`generate`, but yields each step's new tokens as soon as they are chosen."""
        with self.hooks(fwd_hooks):
            yield from stream_tokens(self, input, max_new_tokens, **options)

    # ----------------------------------------------------------------- hooks
    @contextmanager
    def hooks(
        self,
        fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
    ) -> Iterator[Transformer]:
        """``with model.hooks(fwd_hooks=[(name, fn)]): ...`` — hooks live for the block only."""
        with attached(self.hook_dict, fwd_hooks, bwd_hooks):
            yield self

    def run_with_hooks(
        self,
        *args,
        fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
        **kwargs,
    ):
        """One forward pass with temporary hooks; arguments as for ``forward``.

        Backward hooks stay on the graph this pass builds, so call ``.backward()`` on the
        output afterwards and they fire.
        """
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self,
        *args,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
        **kwargs,
    ) -> tuple[Tensor | tuple[Tensor, Tensor] | None, ActivationCache]:
        """One forward pass that also returns the activations selected by ``names_filter``.

        ``names_filter`` is a hook name, a list of names, a predicate on names, or None for
        every standard hook point (opt-in ones such as ``attn.hook_result`` only when named).
        Only the selected activations are stored, detached, optionally moved to ``device``;
        ``remove_batch_dim`` drops the batch dimension of a batch of one.
        """
        store: dict[str, Tensor] = {}

        def save(activation: Tensor, hook: HookPoint) -> None:
            store[hook.name] = activation.detach() if device is None else activation.detach().to(device)

        selected = [point.name for point in resolve(self.hook_dict, names_filter)]
        with self.hooks(fwd_hooks=[(selected, save)]):
            output = self(*args, **kwargs)
        cache = ActivationCache(store, self)
        return output, cache.remove_batch_dim() if remove_batch_dim else cache

    def add_hook(self, name: NameFilter, fn: HookFn, direction: Literal["fwd", "bwd"] = "fwd") -> list[HookHandle]:
        """Attach a hook until ``reset_hooks()`` (prefer the ``hooks()`` context manager)."""
        return [point.add_hook(fn, direction) for point in resolve(self.hook_dict, name)]

    def reset_hooks(self) -> None:
        for point in self.hook_dict.values():
            point.remove_hooks()

    # ----------------------------------------------------------------- weights of every layer
    # (stacked copies for reading; the parameters themselves live on each block)
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        return self.pos_embed.W_pos

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    def _stacked(self, name: str) -> Tensor:
        """One attention weight of every layer, indexed by query head (shared key/value heads
        of grouped-query attention are repeated)."""
        return torch.stack([block.attn.expanded(name) for block in self.blocks])

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stacked("W_Q")

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stacked("W_K")

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stacked("W_V")

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self._stacked("W_O")


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    per_token: bool = False,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
    """Cross-entropy of predicting token ``i + 1`` at position ``i``.

    With padding, only pairs where both positions are real tokens count. ``per_token`` returns
    the ``[batch, pos - 1]`` losses (zero at excluded pairs) instead of their mean.
    """
    if tokens.shape[-1] < 2:
        raise ValueError("a next-token loss needs at least 2 tokens per sequence")
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    losses = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    if attention_mask is None:
        return losses if per_token else losses.mean()
    counted = (attention_mask[:, :-1] * attention_mask[:, 1:]).to(losses.dtype)
    losses = losses * counted
    return losses if per_token else losses.sum() / counted.sum().clamp(min=1)
