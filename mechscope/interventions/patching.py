"""Activation patching: copy one activation from a source run into a target run, and measure.

The question a patch asks is "does this activation carry what distinguishes the two runs?".
Copy, say, head 1.4's output on the clean prompt into the corrupted run; if the metric (the
logit difference) comes back, that head's output matters. A sweep asks it of every layer ×
position, every head, every neuron.

The naive sweep runs the whole model once per patch. This engine gives the same numbers
(within float rounding) much faster, by never computing what a patch cannot change:

1. **Start at the patched layer.** Layers before the patch see the target run unchanged, so
   each patched run starts from the target's cached residual stream entering that layer.
2. **Start at the patched position.** Attention is causal: a patch at position ``p`` changes
   nothing before ``p``. The earlier positions' keys and values are taken from the target
   run's key-value cache, and only positions ``p`` onwards are computed.
3. **Batch the patches.** Many patches run as one forward pass over a batch of copies of the
   target, each copy with its own patch applied by one vectorised hook.
4. **Unembed only what the metric reads.** A :class:`~mechscope.interventions.metrics.Metric`
   says which position it reads, so the final norm and unembedding run only there.

A patch names a hook point and an index into its activation (without the batch dimension):
``Patch("blocks.3.hook_resid_pre", (5,))`` is position 5 of the residual stream entering layer
3; ``Patch("blocks.1.attn.hook_z", (slice(None), 4))`` is head 4 at every position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.interventions.metrics import Metric, MetricLike, check_position, evaluate
from mechscope.model.attention import softcap
from mechscope.model.hooks import HookNameError, HookPoint, unknown_name_message
from mechscope.model.kv_cache import KeyValueCache
from mechscope.model.names import act_name
from mechscope.model.transformer import Transformer

Index = tuple[int | slice | Sequence[int] | Tensor, ...]
Progress = bool | Callable[[int, int], None]  # a tqdm bar, or a callback given (passes done, passes in all)
DEFAULT_MAX_TOKENS = 8192  # tokens per batched forward pass: large enough to keep the matmuls busy
EMBED_HOOKS = ("hook_embed", "hook_pos_embed")
PASS_COST = 256  # the fixed cost of one forward pass, in computed tokens (launches, Python, hooks)


class PatchingError(ValueError):
    """A patch or sweep was given inputs that do not fit the model or each other."""


@dataclass(frozen=True)
class Patch:
    """Replace ``activation[:, *index]`` at hook point ``name`` with the source's values."""

    name: str
    index: Index = ()


# ------------------------------------------------------------------ planning
def query_dim(name: str) -> int:
    """Which dimension of an activation (batch excluded) runs over query positions: the
    first for everything except attention scores and patterns ``[head, query, key]``."""
    return 1 if name.endswith(("hook_attn_scores", "hook_pattern")) else 0


def start_layer(model: Transformer, point: HookPoint) -> int | None:
    """The block a patched run can start at: the hook's own layer, 0 for the embeddings, or
    None for hook points after the last block (the final norm), which need a full pass."""
    if point.layer() is not None:
        return point.layer()
    return 0 if point.name in EMBED_HOOKS else None


@dataclass
class Planned:
    """A patch with what the engine worked out about it."""

    number: int  # position in the caller's list
    patch: Patch
    shape: torch.Size  # one example's activation
    layer: int | None
    first: int  # first query position the patch changes

    def mask(self) -> Bool[Tensor, "..."]:
        """Which entries of one example's activation the patch replaces (built only when its
        pass runs: a sweep over every neuron would not fit in memory all at once)."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        mask[self.patch.index] = True
        return mask


def plan(
    model: Transformer, patches: Sequence[Patch], source: Mapping[str, Tensor], batch: int, latest_start: int
) -> list[Planned]:
    """Check every patch against the model and the source, and work out where it can start
    (never later than ``latest_start``: see :attr:`TargetRun.latest_start`)."""
    planned = []
    for number, patch in enumerate(patches):
        value = source[patch.name]
        if value.shape[0] not in (1, batch):
            raise PatchingError(
                f"source activation {patch.name!r} has batch {value.shape[0]}; the target has {batch} (or give 1)"
            )
        shape, dim = value.shape[1:], query_dim(patch.name)
        # Each entry's query position, as a broadcast view (no memory): indexing it checks the
        # index and gives the positions it touches.
        grid = torch.arange(shape[dim]).view(-1, *[1] * (len(shape) - dim - 1)).expand(shape[dim:])
        try:
            touched = grid.expand(shape)[patch.index]
        except (IndexError, TypeError) as error:
            raise PatchingError(
                f"index {patch.index} does not fit {patch.name!r}, whose activation is {tuple(shape)} "
                f"per example: {error}"
            ) from None
        first = min(int(touched.min()) if touched.numel() else 0, latest_start)
        planned.append(Planned(number, patch, shape, start_layer(model, model.hook_dict[patch.name]), first))
    return planned


def chunks(planned: list[Planned], batch: int, seq: int, max_tokens: int) -> Iterable[list[Planned]]:
    """Group patches into forward passes that start at the same layer and hook point.

    A pass computes every position from its earliest patch's first position on, for every
    patch in it, so mixing early and late patches wastes work; many small passes waste the
    fixed cost of a pass. Within each group, sorted by first position, :func:`split` chooses
    the split by dynamic programming over (computed tokens + ``PASS_COST`` per pass), with no
    pass over ``max_tokens`` tokens unless it holds a single patch.
    """
    order = sorted(planned, key=lambda p: (p.layer is None, p.layer or 0, p.patch.name, p.first))
    group: list[Planned] = []
    for item in order:
        if group and (item.layer, item.patch.name) != (group[0].layer, group[0].patch.name):
            yield from split(group, batch, seq, max_tokens)
            group = []
        group.append(item)
    if group:
        yield from split(group, batch, seq, max_tokens)


def split(group: list[Planned], batch: int, seq: int, max_tokens: int) -> list[list[Planned]]:
    """A cheap split of ``group`` (sorted by first position) into consecutive passes.

    A pass's cost depends only on its size and its first patch's position, so the dynamic
    programme tries only the pass starts that matter most: where the first position changes,
    and where the pass would be full. That keeps it linear in the patches (times the distinct
    positions); it is not proven optimal, only valid (every patch once, no pass over budget).
    """
    n = len(group)
    changes = [i for i in range(n) if i == 0 or group[i].first != group[i - 1].first]
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j patches
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        fits = max(1, max_tokens // (batch * (seq - group[j - 1].first)))  # a full pass ending at j
        candidates = {max(0, j - fits)} | {i for i in changes if i < j}
        for i in candidates:  # the last pass holds patches i .. j-1 (0-based)
            tokens = (j - i) * batch * (seq - group[i].first)
            if tokens > max_tokens and j - i > 1:
                continue
            cost = best[i] + PASS_COST + tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    passes, j = [], n
    while j > 0:
        passes.append(group[cut[j] : j])
        j = cut[j]
    return passes[::-1]


# ------------------------------------------------------------------ the target run
@dataclass
class TargetRun:
    """What every patched run reuses from the unpatched target: the residual stream entering
    each block, the final residual stream, and every layer's keys and values."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"] | None
    resid_pre: list[Float[Tensor, "batch pos d_model"]]
    resid_final: Float[Tensor, "batch pos d_model"]
    kv: KeyValueCache
    latest_start: int  # a pass may start no later: every row is real there, so no suffix is all padding

    @classmethod
    def record(cls, model: Transformer, tokens: Tensor, attention_mask: Tensor | None) -> TargetRun:
        n = model.cfg.n_layers
        names = [act_name("resid_pre", i) for i in range(n)] + [act_name("resid_post", n - 1)]
        kv = KeyValueCache(n)
        _, cache = model.run_with_cache(
            tokens, names_filter=names, attention_mask=attention_mask, past_kv_cache=kv, return_type=None
        )
        latest = tokens.shape[1] - 1
        if attention_mask is not None:  # right padding: a row's suffix must still hold a real token
            latest = int((attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)).min())
        resid = [cache[names[i]] for i in range(n)]
        return cls(tokens, attention_mask, resid, cache[names[-1]], kv, latest)

    def prefix_cache(self, copies: int, start: int, layer: int, device: torch.device) -> KeyValueCache | None:
        """Keys and values of positions before ``start`` for blocks ``layer`` onwards, repeated
        for ``copies`` copies of the batch; None when starting at position 0."""
        if start == 0:
            return None
        cache = KeyValueCache(len(self.kv.keys))
        for i in range(layer, len(self.kv.keys)):
            cache.keys[i] = self.kv.keys[i][:, :start].repeat(copies, 1, 1, 1)
            cache.values[i] = self.kv.values[i][:, :start].repeat(copies, 1, 1, 1)
        cache.padding_mask = self.kv.padding_mask[:, :start].to(device).repeat(copies, 1)
        cache.has_padding = self.attention_mask is not None
        return cache


def repeat(t: Tensor | None, copies: int) -> Tensor | None:
    return None if t is None else t.repeat(copies, *([1] * (t.ndim - 1)))


# ------------------------------------------------------------------ one batched pass
def patch_hook(group: list[Planned], source: Tensor, start: int, batch: int):
    """One hook applying each copy's own patch: ``where(mask_i, source, activation)`` on copy i.

    The activation covers query positions ``start`` onwards, so masks and source are cut to
    match along the query dimension.
    """
    dim = query_dim(group[0].patch.name)
    length = group[0].shape[dim] - start
    masks = torch.stack([p.mask().narrow(dim, start, length) for p in group])
    values = source.narrow(dim + 1, start, source.shape[dim + 1] - start)

    def hook(activation: Tensor, point: HookPoint) -> Tensor:
        copies = activation.unflatten(0, (len(group), batch))
        mask = masks.to(activation.device)[:, None]
        patched = torch.where(mask, values.to(activation.device, activation.dtype)[None], copies)
        return patched.flatten(0, 1)

    return hook


def run_group(
    model: Transformer, target: TargetRun, group: list[Planned], source: Tensor
) -> tuple[Float[Tensor, "copies_batch new d_model"], int]:
    """The final residual stream of every copy in ``group``, each with its patch applied, from
    the pass's first position on (positions before it are the target's, unchanged), and that
    first position."""
    batch = target.tokens.shape[0]
    copies, layer = len(group), group[0].layer
    start = group[0].first
    if group[0].patch.name in EMBED_HOOKS:  # from the tokens
        input, start_at = repeat(target.tokens[:, start:], copies), None
    else:  # from the residual stream entering the patched block
        input, start_at = repeat(target.resid_pre[layer][:, start:], copies), layer
    mask = None if target.attention_mask is None else repeat(target.attention_mask[:, start:], copies)
    hook = patch_hook(group, source, start, batch)
    with model.hooks(fwd_hooks=[(group[0].patch.name, hook)]):
        resid = model(
            input,
            start_at_layer=start_at,
            attention_mask=mask,
            past_kv_cache=target.prefix_cache(copies, start, layer, input.device),
            stop_at_layer=model.cfg.n_layers,
        )
    return resid, start


def final_logits(model: Transformer, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """The model's last steps: final norm, unembedding, soft-capping if the family has it."""
    logits = model.unembed(model.ln_final(resid))
    cap = model.cfg.final_softcap
    return logits if cap is None else softcap(logits, cap)


def stream_at(
    position: int | Int[Tensor, " batch"],
    resid: Float[Tensor, "copies_batch new d_model"],
    prefix: Float[Tensor, "batch start d_model"] | None,
    copies: int,
) -> Float[Tensor, "copies_batch d_model"]:
    """Each copy's final residual stream at the metric's position: from the pass when the
    position was computed, else from the unpatched target (a patch changes nothing before it)."""
    batch, start = resid.shape[0] // copies, 0 if prefix is None else prefix.shape[1]
    seq = start + resid.shape[1]
    position = torch.full((batch,), position) if isinstance(position, int) else position
    position = repeat(position.to(resid.device) % seq, copies)
    rows = torch.arange(resid.shape[0], device=resid.device)
    late = resid[rows, (position - start).clamp(min=0)]
    if prefix is None or start == 0:
        return late
    early = prefix.to(resid.device)[rows % batch, position.clamp(max=start - 1)]
    return torch.where((position >= start)[:, None], late, early)


def measure(
    model: Transformer,
    metric: MetricLike,
    resid: Float[Tensor, "copies_batch new d_model"],
    copies: int,
    prefix: Float[Tensor, "batch start d_model"] | None = None,
) -> Float[Tensor, " copies"]:
    """The batch-mean metric of each copy, from its final residual stream (``resid``, from the
    first computed position on; ``prefix``: the unpatched stream before it). A :class:`Metric`
    is unembedded at its position only; any other callable gets one copy's full logits at a time."""
    batch = resid.shape[0] // copies
    if isinstance(metric, Metric):
        at = stream_at(metric.position, resid, prefix, copies)
        return metric.score(final_logits(model, at).unflatten(0, (copies, batch))).float().mean(-1)
    values = []
    for copy in resid.split(batch):
        full = copy if prefix is None else torch.cat([prefix.to(copy.device), copy], dim=1)
        values.append(evaluate(metric, final_logits(model, full)).float().mean())
    return torch.stack(values)


def run_naive(model: Transformer, target: TargetRun, item: Planned, source: Tensor, metric: MetricLike) -> Tensor:
    """One full forward pass with one patch: for hook points after the last block."""

    def hook(activation: Tensor, point: HookPoint) -> Tensor:
        mask, value = item.mask().to(activation.device), source.to(activation.device, activation.dtype)
        return torch.where(mask, value, activation)

    logits = model.run_with_hooks(
        target.tokens, attention_mask=target.attention_mask, fwd_hooks=[(item.patch.name, hook)]
    )
    return evaluate(metric, logits).float().mean()[None]


# ------------------------------------------------------------------ the public entry points
def full_length(source: Mapping[str, Tensor], name: str, seq: int) -> Tensor:
    """The source activation at ``name`` with every position axis ``seq`` long: a length of 1
    (a mean over positions) is broadcast; any other length is refused."""
    if name not in source:
        raise PatchingError(f"the source has no activation for {name!r}")
    value = source[name]
    axes = (2, 3) if query_dim(name) == 1 else (1,)  # [head, query, key] or [pos, ...]
    shape = list(value.shape)
    for axis in axes:
        if axis >= len(shape) or shape[axis] not in (1, seq):
            raise PatchingError(
                f"source activation {name!r} has shape {tuple(value.shape)}: its position axis must have "
                f"the target's {seq} positions (or 1, for the same value at every position)"
            )
        shape[axis] = seq
    return value.expand(shape)


def check_runs(
    tokens: Tensor,
    metric: MetricLike,
    attention_mask: Tensor | None,
    other: Tensor | None = None,
    names: tuple[str, str] = ("target", "source"),
    error: type[ValueError] = PatchingError,
) -> None:
    """Refuse tokens that are not ``[batch, pos]``, a second run of another shape, a mask that
    does not fit, or a metric position outside the sequence."""
    if tokens.ndim != 2:
        raise error(f"{names[0]} tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    if other is not None and other.shape != tokens.shape:
        raise error(f"{names[0]} tokens {tuple(tokens.shape)} and {names[1]} {tuple(other.shape)} differ in shape")
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise error(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}")
    if isinstance(metric, Metric):
        check_position(metric.position, tokens.shape[0], tokens.shape[1])


def patch(
    model: Transformer,
    target: Int[Tensor, "batch pos"],
    source: Mapping[str, Tensor],
    metric: MetricLike,
    patches: Sequence[Patch],
    *,
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: Progress = False,
) -> Float[Tensor, " patch"]:
    """The metric (batch mean) of the target run with each patch applied, one value per patch.

    ``source`` maps hook names to activations ``[batch or 1, ...]``: a clean run's cache for
    activation patching, zeros or a mean for ablation. Equal, within float rounding, to running
    the model once per patch with a hook that does ``activation[:, *index] = source[:, *index]``.
    """
    check_runs(target, metric, attention_mask)
    if max_tokens < 1:
        raise PatchingError(f"max_tokens must be at least 1, got {max_tokens}")
    batch, seq = target.shape
    attention_mask = None if attention_mask is None else attention_mask.long()
    names = {p.name for p in patches}
    for name in names - model.hook_dict.keys():
        raise HookNameError(unknown_name_message(name, model.hook_dict))
    source = {name: full_length(source, name, seq) for name in names}
    results = torch.empty(len(patches))
    if not patches:
        return results
    with torch.inference_mode():
        run = TargetRun.record(model, target, attention_mask)
        planned = plan(model, patches, source, batch, run.latest_start)
        groups = list(chunks(planned, batch, seq, max_tokens))
        for done, group in enumerate(tqdm(groups, desc="patching", unit="pass", disable=progress is not True)):
            if callable(progress):
                progress(done, len(groups))
            value = source[group[0].patch.name]
            if group[0].layer is None:
                values = torch.cat([run_naive(model, run, item, value, metric) for item in group])
            else:
                resid, start = run_group(model, run, group, value)
                values = measure(model, metric, resid, len(group), run.resid_final[:, :start])
            results[[item.number for item in group]] = values.to(results.device)
    if callable(progress):
        progress(len(groups), len(groups))
    return results
