"""Causal self-attention with every intermediate hookable, and the masks it uses.

Each head ``h`` reads the residual stream through ``W_Q[h]``, ``W_K[h]``, ``W_V[h]``, mixes
values across positions by its attention pattern, and writes back through ``W_O[h]``. With
grouped-query attention several query heads share one key/value head (``n_key_value_heads``).
The pattern is only materialised when something needs it (a hook on the scores or pattern, or
soft-capping); otherwise PyTorch's fused kernel computes the same result without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechscope.model.components import affine, bias, laid_out
from mechscope.model.config import ModelConfig
from mechscope.model.hooks import HookPoint
from mechscope.model.kv_cache import KeyValueCache
from mechscope.model.norms import RMSNorm
from mechscope.model.rotary import CosSin, rotate

Mask = Bool[Tensor, "#batch 1 query_pos key_pos"]  # batch 1 when no row is padded


def causal_mask(n_query: int, n_key: int, device: torch.device) -> Bool[Tensor, "query_pos key_pos"]:
    """True where a query may attend: itself and earlier keys (queries are the last positions)."""
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(diagonal=n_key - n_query)


def attention_mask_from_padding(
    padding_mask: Int[Tensor, "batch key_pos"] | Bool[Tensor, "batch key_pos"] | None,
    n_query: int | None = None,
    window: int | None = None,
) -> Mask:
    """Causal mask that also hides padding keys and, with a sliding ``window``, keys ``window``
    or more positions back. Every query still sees itself, so no row is empty (a padding query's
    output is then finite, and ignored). Queries are the last ``n_query`` key positions."""
    n_key = padding_mask.shape[-1]
    n_query = n_key if n_query is None else n_query
    device = padding_mask.device
    query_index = torch.arange(n_key - n_query, n_key, device=device)[:, None]
    key_index = torch.arange(n_key, device=device)[None, :]
    allowed = key_index <= query_index
    if window is not None:
        allowed = allowed & (query_index - key_index < window)
    real_keys = rearrange(padding_mask.bool(), "batch key -> batch 1 1 key")
    return (allowed & real_keys) | (key_index == query_index)


@dataclass
class AttentionContext:
    """What every layer's attention needs about this forward pass, worked out once: the
    padding mask over all keys, the rotary angles of the new positions, the KV cache."""

    n_query: int
    padding_mask: Int[Tensor, "batch key_pos"] | None = None  # None: no padding anywhere
    n_key: int | None = None  # keys seen (cached and new); defaults to n_query
    rotary: CosSin | None = None
    cache: KeyValueCache | None = None
    _masks: dict[tuple[int | None, torch.device], Mask | None] = field(default_factory=dict)
    _rotary: dict[torch.device, CosSin] = field(default_factory=dict)

    def mask(self, window: int | None, device: torch.device) -> Mask | None:
        """The boolean mask for a layer with this ``window``; None means plain causal attention
        over equally many queries and keys, which the fused kernel does without a mask."""
        n_key = self.n_key or self.n_query
        if (window, device) not in self._masks:
            if self.padding_mask is None and n_key == self.n_query and (window is None or window >= n_key):
                mask = None
            else:
                padding = self.padding_mask
                if padding is None:
                    padding = torch.ones(1, n_key, dtype=torch.long, device=device)
                mask = attention_mask_from_padding(padding.to(device), self.n_query, window)
            self._masks[window, device] = mask
        return self._masks[window, device]

    def rotary_on(self, device: torch.device) -> CosSin:
        """The rotary angles, copied once to each device a layer runs on."""
        if device not in self._rotary:
            self._rotary[device] = tuple(t.to(device) for t in self.rotary)
        return self._rotary[device]


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention, one hook point per intermediate."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        h, kv, d, e = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head
        self.cfg, self.layer = cfg, layer
        self.n_heads, self.n_kv_heads, self.d_head, self.attn_scale = h, kv, e, cfg.attn_scale
        self.window = cfg.window(layer)
        self.W_Q = laid_out((h, d, e), (1, 0, 2), cfg.dtype)
        self.W_K = laid_out((kv, d, e), (1, 0, 2), cfg.dtype)
        self.W_V = laid_out((kv, d, e), (1, 0, 2), cfg.dtype)
        self.W_O = nn.Parameter(torch.empty(h, e, d, dtype=cfg.dtype))
        self.b_Q = bias(h, e, enabled=cfg.attn_bias, dtype=cfg.dtype)
        self.b_K = bias(kv, e, enabled=cfg.attn_bias, dtype=cfg.dtype)
        self.b_V = bias(kv, e, enabled=cfg.attn_bias, dtype=cfg.dtype)
        self.b_O = bias(d, enabled=cfg.attn_out_bias, dtype=cfg.dtype)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head] (every head if ungrouped)
        self.hook_v = HookPoint()
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "per_head"
            self.q_norm = RMSNorm(cfg, e if per_head else h * e)
            self.k_norm = RMSNorm(cfg, e if per_head else kv * e)
        if cfg.positional_embedding == "rotary":
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint(opt_in=True)  # [batch, pos, head, d_model]

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def forward(
        self,
        q_input: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"],
        k_input: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos kv_head d_model"],
        v_input: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos kv_head d_model"],
        ctx: AttentionContext,
    ) -> Float[Tensor, "batch pos d_model"]:
        q = self.hook_q(self.to_heads(q_input, self.W_Q, self.b_Q))
        k = self.hook_k(self.ungroup(self.to_heads(k_input, self.W_K, self.b_K)))
        v = self.hook_v(self.ungroup(self.to_heads(v_input, self.W_V, self.b_V)))
        if self.cfg.qk_norm != "none":
            q, k = self.normalise_heads(q, self.q_norm), self.normalise_heads(k, self.k_norm)
        if ctx.rotary is not None:
            angles = ctx.rotary_on(q.device)
            q = self.hook_rot_q(rotate(q, angles, self.cfg.rotary_dim, self.cfg.rotary_style))
            k = self.hook_rot_k(rotate(k, angles, self.cfg.rotary_dim, self.cfg.rotary_style))
        if ctx.cache is not None:
            k, v = ctx.cache.append(self.layer, k, v)
        mask = ctx.mask(self.window, q.device)
        needs_pattern = self.hook_attn_scores.is_active or self.hook_pattern.is_active
        if needs_pattern or self.cfg.attn_softcap is not None:
            z = self.explicit_attention(q, k, v, mask)
        else:
            z = self.fused_attention(q, k, v, mask)
        return self.write_out(self.hook_z(z))

    def to_heads(
        self,
        x: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"],
        W: Float[Tensor, "weight_head d_model d_head"],  # fewer heads than x's for ungrouped keys/values
        b: Float[Tensor, "weight_head d_head"] | None,
    ) -> Float[Tensor, "batch pos head d_head"]:
        """Project the input into every head's query, key or value space."""
        if x.ndim == 4:  # a separate input per head (hook_q_input and friends are in use)
            W, b = self.per_input_head(W, x.shape[2]), None if b is None else self.per_input_head(b, x.shape[2])
            out = einsum(x, W, "batch pos head d_model, head d_model d_head -> batch pos head d_head")
            return out if b is None else out + b
        flat_b = None if b is None else rearrange(b, "head d_head -> (head d_head)")
        out = affine(x, rearrange(W, "head d_model d_head -> d_model (head d_head)"), flat_b)
        return rearrange(out, "batch pos (head d_head) -> batch pos head d_head", d_head=self.d_head)

    def per_input_head(self, t: Tensor, n_inputs: int) -> Tensor:
        """Key/value weights repeated for each query head when per-head inputs are ungrouped."""
        return t if t.shape[0] == n_inputs else t.repeat_interleave(n_inputs // t.shape[0], dim=0)

    def ungroup(self, x: Float[Tensor, "batch pos kv_head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        """With ``ungroup_grouped_query_attention``, give every query head its own key/value copy."""
        if not self.cfg.ungroup_grouped_query_attention or x.shape[2] == self.n_heads:
            return x
        return x.repeat_interleave(self.group_size, dim=2)

    def normalise_heads(self, x: Float[Tensor, "batch pos head d_head"], norm: RMSNorm) -> Tensor:
        """Q/K normalisation, over each head (Qwen3) or over all heads at once (OLMo 2).

        Ungrouped keys hold ``group`` copies of every key head; each copy is normalised with the
        copies of the other key heads it was made alongside, so editing one copy (hook_k)
        changes only the query heads that read it."""
        if self.cfg.qk_norm == "per_head":
            return norm(x)
        n_norm_heads = norm.d // self.d_head
        copies = rearrange(x, "batch pos (head copy) d_head -> batch pos copy (head d_head)", head=n_norm_heads)
        return rearrange(
            norm(copies), "batch pos copy (head d_head) -> batch pos (head copy) d_head", head=n_norm_heads
        )

    def explicit_attention(
        self,
        q: Float[Tensor, "batch query_pos head d_head"],
        k: Float[Tensor, "batch key_pos kv_head d_head"],
        v: Float[Tensor, "batch key_pos kv_head d_head"],
        mask: Mask | None,
    ) -> Float[Tensor, "batch query_pos head d_head"]:
        """Scores, soft-cap, mask, softmax and mix, step by step, so scores and pattern can be
        hooked. Grouped queries are matched to their shared key head without copying keys."""
        groups = q.shape[2] // k.shape[2]
        q = rearrange(q, "batch qpos (kv group) d -> batch qpos kv group d", group=groups)
        scores = einsum(q, k, "batch qpos kv group d, batch kpos kv d -> batch kv group qpos kpos")
        scores = rearrange(scores, "batch kv group qpos kpos -> batch (kv group) qpos kpos") / self.attn_scale
        if self.cfg.attn_softcap is not None:
            scores = softcap(scores, self.cfg.attn_softcap)
        allowed = mask if mask is not None else causal_mask(q.shape[1], k.shape[1], q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(dim=-1, dtype=torch.float32).to(v.dtype))
        pattern = rearrange(pattern, "batch (kv group) qpos kpos -> batch kv group qpos kpos", group=groups)
        z = einsum(pattern, v, "batch kv group qpos kpos, batch kpos kv d -> batch qpos kv group d")
        return rearrange(z, "batch qpos kv group d -> batch qpos (kv group) d")

    def fused_attention(
        self,
        q: Float[Tensor, "batch query_pos head d_head"],
        k: Float[Tensor, "batch key_pos kv_head d_head"],
        v: Float[Tensor, "batch key_pos kv_head d_head"],
        mask: Mask | None,
    ) -> Float[Tensor, "batch query_pos head d_head"]:
        """The same computation through PyTorch's fused kernel, which never builds the pattern."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
        z = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=1.0 / self.attn_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return z.transpose(1, 2)

    def write_out(self, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d_model"]:
        """Map each head's mixed values back to the residual stream and sum over heads."""
        if self.hook_result.is_active:  # materialise each head's contribution separately
            result = einsum(z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model")
            out = self.hook_result(result).sum(dim=-2)
            return out if self.b_O is None else out + self.b_O
        W_O = rearrange(self.W_O, "head d_head d_model -> (head d_head) d_model")
        return affine(rearrange(z, "batch pos head d_head -> batch pos (head d_head)"), W_O, self.b_O)

    # ------------------------------------------------------------ weights per query head
    def expanded(self, name: str) -> Tensor | None:
        """``W_K``/``W_V``/``b_K``/``b_V`` repeated so that index ``h`` is query head ``h``'s."""
        t = getattr(self, name)
        return t if t is None or t.shape[0] == self.n_heads else repeat(t, "kv ... -> (kv g) ...", g=self.group_size)


def softcap(x: Tensor, cap: float) -> Tensor:
    """Squash values smoothly into ``(-cap, cap)``: ``cap · tanh(x / cap)`` (Gemma 2)."""
    return torch.tanh(x / cap) * cap
