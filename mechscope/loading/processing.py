"""Weight processing: rewrite the weights so the model computes the same function in a form
that is easier to read.

A trained transformer has directions its computation cannot see. A norm's elementwise weight
could live in the matrices that read the norm's output; a LayerNorm ignores the mean of the
residual stream, so nothing needs to write it; softmax ignores a constant added to every logit;
an attention pattern sums to one, so a value bias passes through it unchanged. Each step below
moves the weights along one such invisible direction, so that what is left means more: after
``fold_ln`` a norm only normalises, after ``center_writing_weights`` every component writes a
mean-zero vector (so a LayerNorm's centring changes nothing), after ``center_unembed`` logits
sum to zero at each position, after ``fold_value_biases`` a head's output has no constant part.
Up to float rounding the logits (for ``center_unembed``, the log-probabilities) do not change.

Every step is opt-in, decides from the config whether it is exact for this model, and refuses
with a ``ValueError`` when it is not. Applied steps are listed in ``model.cfg.extra["processed"]``;
a listed step is not applied again. Where a step creates a bias the architecture lacked (a
LayerNorm's shift folded into ``b_Q``), the config's bias flag is switched on, so a model built
from the config has the same ``state_dict``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from einops import einsum, repeat
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.model.norms import LayerNorm, RMSNorm
from mechscope.model.transformer import Transformer

Step = Callable[[Transformer], None]
STEPS: dict[str, Step] = {}  # every step by name, in the order process_weights applies them


def process_weights(
    model: Transformer,
    *,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
) -> Transformer:
    """Apply the requested steps in place, in the order of ``STEPS``, and return ``model``.

    ``fold_ln``: pre-norm weights and biases into the matrices that read them.
    ``center_writing_weights``: zero mean over ``d_model`` for everything that writes the
    residual stream (LayerNorm models only). ``center_unembed``: zero mean over the vocabulary
    for ``W_U`` and ``b_U``. ``fold_value_biases``: ``b_V`` into ``b_O``. Each step's function
    below explains its maths. Every requested step is checked before any is applied, so a
    refused request leaves the model as it was.
    """
    wanted = {
        "fold_ln": fold_ln,
        "center_writing_weights": center_writing_weights,
        "center_unembed": center_unembed,
        "fold_value_biases": fold_value_biases,
    }
    requested = [name for name in STEPS if wanted[name]]
    for name in requested:
        refuse_if_inexact(name, model)
    for name in requested:
        STEPS[name](model)
    return model


def applied_steps(model: Transformer) -> list[str]:
    """The steps already applied to ``model`` (a list kept in its config, in order)."""
    return model.cfg.extra.setdefault("processed", [])


def why_not(name: str, model: Transformer) -> str | None:
    """Why step ``name`` would change what ``model`` computes, or None when it is exact."""
    cfg = model.cfg
    if name in ("fold_ln", "center_writing_weights", "center_unembed") and tied(model):
        return "W_U and W_E share memory (a tied embedding), so rewriting one would rewrite the other; untie them first"
    if name == "center_writing_weights":
        if cfg.normalization != "layernorm":
            return (
                f"normalization={cfg.normalization!r}: only a LayerNorm subtracts the mean of its input, "
                "so every reader of the residual stream must be one for the mean to be invisible"
            )
        if not cfg.pre_norm:
            return "pre_norm=False: attention and the MLP read the residual stream directly, not through a LayerNorm"
        if cfg.post_norm:
            return (
                "post_norm=True: each sublayer writes the output of its own norm (x̂ ⊙ w + b), "
                "whose mean no change of weights can remove"
            )
    if name == "center_unembed" and cfg.final_softcap is not None:
        return (
            f"final_softcap={cfg.final_softcap}: the logits pass through cap · tanh(logits / cap), "
            "which is not shift-invariant, so shifting every logit by the same amount changes the probabilities"
        )
    return None


def refuse_if_inexact(name: str, model: Transformer) -> None:
    reason = why_not(name, model)
    if reason is not None:
        raise ValueError(f"{name} does not apply to this model: {reason}")


def step(fn: Step) -> Step:
    """Register ``fn`` as a processing step: refuse it when inexact, skip it when already
    applied, run it without autograd, record it in the config."""
    name = fn.__name__

    @functools.wraps(fn)
    def run(model: Transformer) -> None:
        if name in applied_steps(model):
            return
        refuse_if_inexact(name, model)
        with torch.no_grad():
            fn(model)
        sync_bias_flags(model)
        applied_steps(model).append(name)

    STEPS[name] = run
    return run


# ------------------------------------------------------------------ the steps


@step
def fold_ln(model: Transformer) -> None:
    """Fold every pre-norm's elementwise weight and bias into the matrices that read it.

    A norm's output is ``y = x̂ ⊙ s + β``: ``x̂`` is the normalised input (centred and divided
    by its root-mean-square for a LayerNorm, only divided for an RMSNorm), ``s`` the learned
    scale (``w``, or ``offset + w`` for Gemma's RMSNorm) and ``β`` the LayerNorm's bias (none
    for RMSNorm). Everything that reads ``y`` is affine, ``y W + b``, and

        (x̂ ⊙ s + β) W + b  =  x̂ (diag(s) W) + (β W + b),

    so ``W ← diag(s) W`` (row ``i`` times ``s_i``) and ``b ← b + β W`` compute the same thing
    from ``x̂``; the norm is then left with ``s = 1`` and ``β = 0``. The readers are ``W_Q``,
    ``W_K``, ``W_V`` for ``ln1`` (keys and values of grouped-query attention have fewer heads;
    the fold does not care), ``W_in`` and ``W_gate`` for ``ln2`` (in parallel blocks ``ln1`` and
    ``ln2`` read the same stream, and each folds into its own readers), and ``W_U`` for
    ``ln_final``. A LayerNorm's shift creates the biases the architecture lacked.

    Post-norms (``ln1_post``, ``ln2_post``) and Q/K norms are left alone: no weight matrix
    reads their output, so ``s`` has nowhere to go. A post-norm's output is added straight to
    the residual stream (whose readers normalise the whole sum first); a Q/K norm's output is
    rotated by position and then dotted with the other side's. (Folding a pre-norm into ``W_Q`` does not
    disturb a Q/K norm, which sees the same queries as before.) A model without norms has
    nothing to fold, and the step leaves it as it is.
    """
    cfg = model.cfg
    h, kv, e, m, d = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp, cfg.d_model
    for block in model.blocks:
        if is_norm(block.ln1):
            fold_norm(block.ln1, block.attn, ["W_Q", "W_K", "W_V"], {"b_Q": (h, e), "b_K": (kv, e), "b_V": (kv, e)})
        if block.has_mlp and is_norm(block.ln2):
            if block.mlp.gated:
                fold_norm(block.ln2, block.mlp, ["W_in", "W_gate"], {"b_in": (m,), "b_gate": (m,), "b_out": (d,)})
            else:
                fold_norm(block.ln2, block.mlp, ["W_in"], {"b_in": (m,), "b_out": (d,)})
    if is_norm(model.ln_final):
        fold_norm(model.ln_final, model.unembed, ["W_U"], {"b_U": (cfg.d_vocab,)})


@step
def center_writing_weights(model: Transformer) -> None:
    """Remove the mean over ``d_model`` from everything that writes to the residual stream.

    A LayerNorm starts by subtracting its input's mean: with ``P = I - 𝟙𝟙ᵀ/d_model`` the
    projection that does so, ``LN(x) = LN(P x)``. The residual stream is a sum of writes (token
    and position embeddings, each head's ``W_O`` output, ``b_O``, each MLP's ``W_out`` output,
    ``b_out``), so replacing each write ``v`` by ``P v`` turns the stream ``x`` into ``P x``,
    which every LayerNorm reads exactly as it read ``x``. Each writing matrix is centred along
    its ``d_model`` axis: ``W ← W - mean_d(W)``.

    Exact only when every reader of the stream is a LayerNorm (the pre-norms of every block and
    ``ln_final``); an RMSNorm or an un-normed reader sees the mean. ``embed_scale`` is harmless:
    a multiple of a centred vector is centred.
    """
    writers: list[Tensor | None] = [model.embed.W_E]
    if hasattr(model, "pos_embed"):
        writers.append(model.pos_embed.W_pos)
    for block in model.blocks:
        writers += [block.attn.W_O, block.attn.b_O]
        if block.has_mlp:
            writers += [block.mlp.W_out, block.mlp.b_out]
    for W in writers:
        if W is not None:
            W.copy_(center(W))


@step
def center_unembed(model: Transformer) -> None:
    """Subtract from each row of ``W_U`` (and from ``b_U``) its mean over the vocabulary.

    Softmax is shift-invariant: ``softmax(z + c𝟙) = softmax(z)`` for any number ``c``. Centring
    ``W_U`` over the vocabulary changes the logits at a position by ``-mean_v(logits)``, the
    same amount for every token, so probabilities and log-probabilities stay put while the
    logits become comparable across positions (they now sum to zero). Not exact under a final
    soft-cap, which bends large logits more than small ones.
    """
    model.unembed.W_U.copy_(center(model.unembed.W_U))
    if model.unembed.b_U is not None:
        model.unembed.b_U.copy_(center(model.unembed.b_U))


@step
def fold_value_biases(model: Transformer) -> None:
    """Move each layer's value biases into the output bias ``b_O``.

    Head ``h`` writes ``Σ_k A[q, k] (x_k W_V[h] + b_V[h]) W_O[h]``. Each row of the attention
    pattern ``A`` sums to one (padding and windows only remove keys; every query sees itself),
    so the bias term is ``b_V[h] W_O[h]`` whatever the pattern, and the layer's output gains
    the constant ``Σ_h b_V[h] W_O[h]``. Add that to ``b_O`` and set ``b_V = 0``. With
    grouped-query attention ``b_V`` has one row per key/value head, and query head ``h`` uses
    row ``h // (n_heads / n_key_value_heads)``. A post-norm on the attention output is no
    obstacle: it reads the same sum as before.
    """
    for block in model.blocks:
        attn = block.attn
        if attn.b_V is None:
            continue
        ensure_biases(attn, {"b_O": (model.cfg.d_model,)})
        b_V = repeat(attn.b_V, "kv d_head -> (kv group) d_head", group=attn.group_size)  # row h: query head h's
        through_O = einsum(widened(b_V), widened(attn.W_O), "head d_head, head d_head d_model -> d_model")
        attn.b_O.copy_(widened(attn.b_O) + through_O)
        attn.b_V.zero_()


# ------------------------------------------------------------------ helpers


def tied(model: Transformer) -> bool:
    """Whether the unembedding is stored in the embedding's memory (HuggingFace loading copies;
    a hand-built model may share)."""
    return model.W_U.untyped_storage().data_ptr() == model.W_E.untyped_storage().data_ptr()


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (LayerNorm, RMSNorm))


def scale_and_shift(norm: LayerNorm | RMSNorm) -> tuple[Float[Tensor, " d_model"], Float[Tensor, " d_model"] | None]:
    """The elementwise map a norm applies after normalising, ``x̂ ⊙ scale + shift``, as fresh
    tensors (so resetting the norm cannot change them)."""
    scale = widened(norm.w) + getattr(norm, "offset", 0.0)
    shift = None if getattr(norm, "b", None) is None else widened(norm.b).clone()
    return scale, shift


def fold_norm(
    norm: LayerNorm | RMSNorm, reader: nn.Module, weights: list[str], biases: dict[str, tuple[int, ...]]
) -> None:
    """Fold ``norm``'s scale and shift into ``reader``'s matrices ``weights`` (each indexed
    ``[..., d_model, out]``, bias ``b_X`` beside ``W_X``), then make the norm the identity map
    on ``x̂``. ``biases`` are the reader's biases, created as zeros if the shift needs them."""
    scale, shift = scale_and_shift(norm)
    if shift is not None:
        ensure_biases(reader, biases)
    for name in weights:
        W = getattr(reader, name)
        if shift is not None:
            b = getattr(reader, "b_" + name[2:])
            b.copy_(widened(b) + einsum(shift, widened(W), "d_model, ... d_model out -> ... out"))
        W.copy_(widened(W) * scale[:, None])  # copy_ keeps the parameter's memory layout
    norm.reset_parameters()  # scale 1 (RMSNorm: w = 1 - offset), shift 0


def ensure_biases(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give ``module`` a zero bias of each shape where it has none; a zero bias changes nothing."""
    like = next(module.parameters())
    for name, shape in shapes.items():
        if getattr(module, name, None) is None:
            setattr(module, name, nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device)))


def sync_bias_flags(model: Transformer) -> None:
    """Make the config's bias switches describe the parameters the model now has."""
    cfg, attn = model.cfg, model.blocks[0].attn
    cfg.attn_bias = attn.b_Q is not None
    cfg.attn_out_bias = attn.b_O is not None
    if cfg.has_mlp:
        cfg.mlp_bias = model.blocks[0].mlp.b_in is not None
    cfg.unembed_bias = model.unembed.b_U is not None


def center(W: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
    """``W`` minus its mean along the last axis."""
    W = widened(W)
    return W - W.mean(-1, keepdim=True)


def widened(t: Tensor) -> Tensor:
    """``t`` in at least float32, so folding half-precision weights rounds only once."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
