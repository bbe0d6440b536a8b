"""The parts a transformer is built from: embeddings, LayerNorm, attention, MLP, unembedding.

Weights use TransformerLens' shapes, so that ``attn.W_Q[h]`` is head ``h``'s
``[d_model, d_head]`` query matrix and the circuit algebra of the field reads directly off
them. Some are *stored* in a different memory order than they are indexed (see
:func:`laid_out`), so that the projection of every head at once is a single matrix multiply
with no copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechscope.model.config import ModelConfig
from mechscope.model.hooks import HookPoint

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def laid_out(shape: Sequence[int], order: Sequence[int], dtype: torch.dtype) -> nn.Parameter:
    """An uninitialised parameter of ``shape`` whose memory runs in the dimension ``order``.

    ``laid_out((h, d, e), (1, 0, 2))`` is indexed ``[head, d_model, d_head]`` but stored as
    ``[d_model, head, d_head]``, so ``rearrange(W, "h d e -> d (h e)")`` is a free view.
    """
    storage = torch.empty([shape[i] for i in order], dtype=dtype)
    inverse = sorted(range(len(order)), key=lambda i: order[i])
    return nn.Parameter(storage.permute(*inverse))


def bias(*shape: int, enabled: bool, dtype: torch.dtype) -> nn.Parameter | None:
    """A zero-initialised bias of ``shape``, or None for architectures without one."""
    return nn.Parameter(torch.zeros(*shape, dtype=dtype)) if enabled else None


def affine(
    x: Float[Tensor, "... d_in"], W: Float[Tensor, "d_in d_out"], b: Float[Tensor, " d_out"] | None
) -> Float[Tensor, "... d_out"]:
    """``x @ W + b`` as one fused GEMM (``F.linear`` wants ``W`` transposed; ``.T`` is a view)."""
    return F.linear(x, W.T, b)


class Embed(nn.Module):
    """Token ids to vectors: row ``t`` of ``W_E`` is token ``t``'s embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class PosEmbed(nn.Module):
    """Learned absolute positions (GPT-2): row ``i`` of ``W_pos`` is added at position ``i``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))

    def forward(self, positions: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(positions, self.W_pos)


class LayerNorm(nn.Module):
    """Centre, divide by the root-mean-square (``hook_scale``), then scale and shift.

    One fused kernel computes the output and, on the side, the statistics, so caching the
    scale costs nothing extra. Only a hook that *replaces* the scale makes the steps run
    one by one, with the replacement.
    """

    def __init__(self, cfg: ModelConfig, d: int | None = None) -> None:
        super().__init__()
        self.d = d or cfg.d_model
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(self.d, dtype=cfg.dtype))
        self.b = nn.Parameter(torch.zeros(self.d, dtype=cfg.dtype))
        self.hook_scale = HookPoint()  # [..., 1]
        self.hook_normalized = HookPoint()  # [..., d]

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if not (self.hook_scale.is_active or self.hook_normalized.is_active):
            return F.layer_norm(x, (self.d,), self.w, self.b, self.eps)
        out, mean, rstd = torch.native_layer_norm(x, (self.d,), self.w, self.b, self.eps)
        scale = rstd.reciprocal()
        hooked_scale = self.hook_scale(scale)
        if hooked_scale is not scale:  # a hook replaced the scale: normalise by the replacement
            out = (x - mean) / hooked_scale * self.w + self.b
        return self.hook_normalized(out)


class Attention(nn.Module):
    """Multi-head causal self-attention, one hook point per intermediate.

    Each head ``h`` reads the residual stream through ``W_Q[h]``, ``W_K[h]``, ``W_V[h]``,
    mixes values across positions by its pattern, and writes back through ``W_O[h]``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.n_heads, self.d_head, self.attn_scale = h, e, cfg.attn_scale
        self.W_Q = laid_out((h, d, e), (1, 0, 2), cfg.dtype)
        self.W_K = laid_out((h, d, e), (1, 0, 2), cfg.dtype)
        self.W_V = laid_out((h, d, e), (1, 0, 2), cfg.dtype)
        self.W_O = nn.Parameter(torch.empty(h, e, d, dtype=cfg.dtype))
        self.b_Q = bias(h, e, enabled=cfg.attn_bias, dtype=cfg.dtype)
        self.b_K = bias(h, e, enabled=cfg.attn_bias, dtype=cfg.dtype)
        self.b_V = bias(h, e, enabled=cfg.attn_bias, dtype=cfg.dtype)
        self.b_O = bias(d, enabled=cfg.attn_bias, dtype=cfg.dtype)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint(opt_in=True)  # [batch, pos, head, d_model]

    def forward(
        self,
        q_input: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"],
        k_input: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"],
        v_input: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"],
        mask: Bool[Tensor, "batch 1 query_pos key_pos"] | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        q = self.hook_q(self.to_heads(q_input, self.W_Q, self.b_Q))
        k = self.hook_k(self.to_heads(k_input, self.W_K, self.b_K))
        v = self.hook_v(self.to_heads(v_input, self.W_V, self.b_V))
        if self.hook_attn_scores.is_active or self.hook_pattern.is_active:
            z = self.explicit_attention(q, k, v, mask)
        else:
            z = self.fused_attention(q, k, v, mask)
        return self.write_out(self.hook_z(z))

    def to_heads(
        self,
        x: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"],
        W: Float[Tensor, "head d_model d_head"],
        b: Float[Tensor, "head d_head"] | None,
    ) -> Float[Tensor, "batch pos head d_head"]:
        """Project the input into every head's query, key or value space."""
        if x.ndim == 4:  # a separate input per head (hook_q_input and friends are in use)
            out = einsum(x, W, "batch pos head d_model, head d_model d_head -> batch pos head d_head")
            return out if b is None else out + b
        flat_b = None if b is None else rearrange(b, "head d_head -> (head d_head)")
        out = affine(x, rearrange(W, "head d_model d_head -> d_model (head d_head)"), flat_b)
        return rearrange(out, "batch pos (head d_head) -> batch pos head d_head", head=self.n_heads)

    def explicit_attention(
        self,
        q: Float[Tensor, "batch query_pos head d_head"],
        k: Float[Tensor, "batch key_pos head d_head"],
        v: Float[Tensor, "batch key_pos head d_head"],
        mask: Bool[Tensor, "batch 1 query_pos key_pos"] | None,
    ) -> Float[Tensor, "batch query_pos head d_head"]:
        """Scores, mask, softmax and mix, step by step, so the scores and pattern can be hooked."""
        scores = einsum(q, k, "batch qpos head d, batch kpos head d -> batch head qpos kpos")
        allowed = mask if mask is not None else causal_mask(q.shape[1], k.shape[1], q.device)
        scores = scores.div_(self.attn_scale).masked_fill_(~allowed, float("-inf"))
        pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(dim=-1))
        return einsum(pattern, v, "batch head qpos kpos, batch kpos head d -> batch qpos head d")

    def fused_attention(
        self,
        q: Float[Tensor, "batch query_pos head d_head"],
        k: Float[Tensor, "batch key_pos head d_head"],
        v: Float[Tensor, "batch key_pos head d_head"],
        mask: Bool[Tensor, "batch 1 query_pos key_pos"] | None,
    ) -> Float[Tensor, "batch query_pos head d_head"]:
        """The same computation through PyTorch's fused kernel, which never builds the pattern."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0 / self.attn_scale)
        return z.transpose(1, 2)

    def write_out(self, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d_model"]:
        """Map each head's mixed values back to the residual stream and sum over heads."""
        if self.hook_result.is_active:  # materialise each head's contribution separately
            result = einsum(z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model")
            out = self.hook_result(result).sum(dim=-2)
            return out if self.b_O is None else out + self.b_O
        W_O = rearrange(self.W_O, "head d_head d_model -> (head d_head) d_model")
        return affine(rearrange(z, "batch pos head d_head -> batch pos (head d_head)"), W_O, self.b_O)


def causal_mask(n_query: int, n_key: int, device: torch.device) -> Bool[Tensor, "query_pos key_pos"]:
    """True where a query may attend: itself and earlier keys (queries are the last positions)."""
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(diagonal=n_key - n_query)


def attention_mask_from_padding(
    padding_mask: Int[Tensor, "batch key_pos"] | Bool[Tensor, "batch key_pos"],
) -> Bool[Tensor, "batch 1 query_pos key_pos"]:
    """Causal mask that also hides padding keys; every query still sees itself, so no row is
    empty (a padding query's output is then finite, and ignored)."""
    n = padding_mask.shape[-1]
    causal = causal_mask(n, n, padding_mask.device)
    real_keys = rearrange(padding_mask.bool(), "batch key -> batch 1 1 key")
    diagonal = torch.eye(n, dtype=torch.bool, device=padding_mask.device)
    return (causal & real_keys) | diagonal


class MLP(nn.Module):
    """Per-position feed-forward layer: ``W_out · act(W_in · x + b_in) + b_out``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, m = cfg.d_model, cfg.d_mlp
        self.W_in = nn.Parameter(torch.empty(d, m, dtype=cfg.dtype))
        self.W_out = nn.Parameter(torch.empty(m, d, dtype=cfg.dtype))
        self.b_in = bias(m, enabled=cfg.mlp_bias, dtype=cfg.dtype)
        self.b_out = bias(d, enabled=cfg.mlp_bias, dtype=cfg.dtype)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(affine(x, self.W_in, self.b_in))
        post = self.hook_post(self.act(pre))
        return affine(post, self.W_out, self.b_out)


class Unembed(nn.Module):
    """Residual stream to logits. ``W_U`` is indexed ``[d_model, d_vocab]`` and stored
    ``[d_vocab, d_model]``, the layout of HuggingFace's ``lm_head`` and of a tied embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_U = laid_out((cfg.d_model, cfg.d_vocab), (1, 0), cfg.dtype)
        self.b_U = bias(cfg.d_vocab, enabled=cfg.unembed_bias, dtype=cfg.dtype)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return affine(x, self.W_U, self.b_U)


def split_per_head(x: Float[Tensor, "batch pos d_model"], n_heads: int) -> Float[Tensor, "batch pos head d_model"]:
    """A separate (writable) copy of the residual stream for every head."""
    return repeat(x, "batch pos d_model -> batch pos head d_model", head=n_heads).contiguous()
