"""The standard patching sweeps, each one line: every layer × position of the residual stream,
every head (at all positions or one position at a time), every neuron.

Each copies activations from the ``clean`` run into the ``corrupted`` run (denoising: which
activations are *sufficient* to restore the clean behaviour). Pass ``source=`` to patch in
something else, such as the values of :func:`mechscope.interventions.ablation.ablation_values`.
The result is a tensor with one axis per swept dimension, named in each docstring.
:func:`ablation_sweep` asks the opposite question: which components is the run *lost* without?
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.interventions.ablation import How, ablation_values
from mechscope.interventions.metrics import MetricLike
from mechscope.interventions.patching import DEFAULT_MAX_TOKENS, Patch, PatchingError, Progress, check_runs, patch
from mechscope.model.names import act_name
from mechscope.model.transformer import Transformer

RESID_HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_HOOKS = ("z", "q", "k", "v", "result", "pattern")


def clean_source(
    model: Transformer, clean: Tensor, names: list[str], attention_mask: Tensor | None
) -> dict[str, Tensor]:
    """The clean run's activations at ``names``."""
    if clean.ndim != 2:
        raise PatchingError(f"clean tokens must be [batch, pos], got shape {tuple(clean.shape)}")
    with torch.inference_mode():
        _, cache = model.run_with_cache(clean, names_filter=names, attention_mask=attention_mask, return_type=None)
    return dict(cache.items())


def sweep(
    model: Transformer,
    clean: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "batch pos"],
    metric: MetricLike,
    patches: list[Patch],
    source: Mapping[str, Tensor] | None,
    attention_mask: Tensor | None,
    max_tokens: int,
    progress: Progress,
) -> Float[Tensor, " patch"]:
    """Patch ``patches`` from the clean run (or ``source``) into the corrupted run."""
    check_runs(corrupted, metric, attention_mask, clean, names=("corrupted", "clean"))
    if source is None:
        names = sorted({p.name for p in patches})
        source = clean_source(model, clean, names, attention_mask)
    return patch(
        model,
        corrupted,
        source,
        metric,
        patches,
        attention_mask=attention_mask,
        max_tokens=max_tokens,
        progress=progress,
    )


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise PatchingError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def resid_names(model: Transformer, hook: str) -> list[str]:
    """Every layer's hook point of one residual-stream kind (parallel blocks have no resid_mid)."""
    check_choice(hook, RESID_HOOKS, "hook")
    names = [act_name(hook, i) for i in range(model.cfg.n_layers) if act_name(hook, i) in model.hook_dict]
    if not names:
        raise PatchingError(f"this model has no {hook!r} hook point (e.g. parallel blocks have no resid_mid)")
    return names


def mlp_layers(model: Transformer, layers: list[int] | None) -> list[int]:
    """The layers whose neurons to sweep (default: all), checked against the model."""
    if not model.cfg.has_mlp:
        raise PatchingError("this model has no MLPs, so no neurons to patch")
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise PatchingError(f"layers {bad} are out of range for a model with {n} layers")
    return layers


def resid_sweep(
    model: Transformer,
    clean: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "batch pos"],
    metric: MetricLike,
    hook: str = "resid_pre",
    *,
    source: Mapping[str, Tensor] | None = None,
    attention_mask: Tensor | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: Progress = False,
) -> Float[Tensor, "layer pos"]:
    """Patch one position of one layer's residual stream (or attention/MLP output) at a time."""
    names = resid_names(model, hook)
    seq = corrupted.shape[1]
    patches = [Patch(name, (p,)) for name in names for p in range(seq)]
    values = sweep(model, clean, corrupted, metric, patches, source, attention_mask, max_tokens, progress)
    return values.view(len(names), seq)


def head_sweep(
    model: Transformer,
    clean: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "batch pos"],
    metric: MetricLike,
    hook: str = "z",
    *,
    by_position: bool = False,
    source: Mapping[str, Tensor] | None = None,
    attention_mask: Tensor | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: Progress = False,
) -> Float[Tensor, "layer head *pos"]:
    """Patch one head at a time: ``[layer, head]`` over all positions, or ``[layer, head, pos]``
    one query position at a time with ``by_position``.

    ``hook`` is the head's output ``z`` (default), its query/key/value vectors, its
    ``result`` (opt-in), or its attention ``pattern``. Keys and values of grouped-query models
    have one head per key/value group.
    """
    check_choice(hook, HEAD_HOOKS, "hook")
    seq = corrupted.shape[1]
    n_heads = model.cfg.n_heads
    if hook in ("k", "v"):
        n_heads = model.cfg.n_kv_heads_exposed
    patches = []
    for layer in range(model.cfg.n_layers):
        name = act_name(hook, layer)
        for head in range(n_heads):
            if hook == "pattern":  # [head, query, key]
                indices = [(head, p) for p in range(seq)] if by_position else [(head,)]
            else:  # [pos, head, ...]
                indices = [(p, head) for p in range(seq)] if by_position else [(slice(None), head)]
            patches += [Patch(name, index) for index in indices]
    values = sweep(model, clean, corrupted, metric, patches, source, attention_mask, max_tokens, progress)
    shape = (model.cfg.n_layers, n_heads, seq) if by_position else (model.cfg.n_layers, n_heads)
    return values.view(shape)


def neuron_sweep(
    model: Transformer,
    clean: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "batch pos"],
    metric: MetricLike,
    layers: list[int] | None = None,
    *,
    source: Mapping[str, Tensor] | None = None,
    attention_mask: Tensor | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: Progress = False,
) -> Float[Tensor, "layer neuron"]:
    """Patch one MLP neuron (its activation ``mlp.hook_post``) at all positions at a time."""
    layers = mlp_layers(model, layers)
    d_mlp = model.cfg.d_mlp
    patches = [Patch(act_name("post", i), (slice(None), j)) for i in layers for j in range(d_mlp)]
    values = sweep(model, clean, corrupted, metric, patches, source, attention_mask, max_tokens, progress)
    return values.view(len(layers), d_mlp)


ABLATION_HOOKS = {"heads": "z", "neurons": "post", "attn": "attn_out", "mlp": "mlp_out"}


def ablation_sweep(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    metric: MetricLike,
    over: str = "heads",
    how: How = "mean",
    reference: Int[Tensor, "ref pos"] | None = None,
    *,
    by_position: bool = False,
    attention_mask: Tensor | None = None,
    reference_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: Progress = False,
) -> Float[Tensor, "layer component *pos"]:
    """The metric with one component ablated at a time: ``[layer, head]`` (``over="heads"``),
    ``[layer, neuron]`` (``"neurons"``), or ``[layer, 1]`` for a whole attention or MLP layer
    (``"attn"``, ``"mlp"``); with ``by_position``, one position at a time (a last axis).

    ``how`` is ``"zero"``, ``"mean"`` (over ``reference``, default ``tokens`` itself) or
    ``"resample"`` (each example gets another reference example's activation); a padded
    ``reference`` takes its own ``reference_mask``. This is the
    patching engine with the ablated values as its source, so it is as exact and as fast.
    """
    check_choice(over, tuple(ABLATION_HOOKS), "over")
    hook = ABLATION_HOOKS[over]
    if over != "heads" and not model.cfg.has_mlp and hook != "attn_out":
        raise PatchingError(f"this model has no MLPs, so nothing to ablate over {over!r}")
    names = [act_name(hook, i) for i in range(model.cfg.n_layers)]
    reference = tokens if reference is None else reference
    ref_mask = attention_mask if reference is tokens else reference_mask
    source = ablation_values(
        model, names, how, reference, attention_mask=ref_mask, batch_size=tokens.shape[0], generator=generator
    )
    options = dict(source=source, attention_mask=attention_mask, max_tokens=max_tokens, progress=progress)
    if over == "heads":
        return head_sweep(model, tokens, tokens, metric, by_position=by_position, **options)
    if over == "neurons":
        if by_position:
            raise PatchingError("by_position is not offered for neurons (layer x neuron x position is rarely wanted)")
        return neuron_sweep(model, tokens, tokens, metric, **options)
    if by_position:
        return resid_sweep(model, tokens, tokens, metric, hook=hook, **options)[:, None]
    patches = [Patch(name, ()) for name in names]  # the whole layer's output, every position
    return sweep(model, tokens, tokens, metric, patches, source, attention_mask, max_tokens, progress)[:, None]
