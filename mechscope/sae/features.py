"""What each SAE feature does, measured in one pass over a batch of tokens, for dashboards.

For every selected feature :func:`feature_statistics` keeps, without storing every activation:

- the ``top`` activating examples: a running top-N over all positions (merged batch by batch
  with ``topk``), each with the token window around it and the feature's activation on every
  token of that window;
- examples from activation intervals: the range ``(0, max]`` split into ``quantiles`` nearly
  equal intervals, ``per_quantile`` examples drawn uniformly at random from each (a reservoir:
  every firing gets a random key and each cell keeps the smallest keys);
- a histogram of its non-zero activations, its firing frequency and mean activation;
- its direct effect on the logits (below): the tokens it promotes and suppresses.

The maximum is not known until the pass ends, so the histogram and the intervals live on grids
of equal cells whose width doubles (merging neighbouring cells, which is exact) whenever an
activation falls past the last cell; at the end, neighbouring cells are grouped into at most
``bins`` histogram bins and exactly ``quantiles`` intervals (fewer when fewer cells are used).

The logit effect is ``(P W_dec[f] ⊙ s) @ W_U``: the final norm's linear part (its scale ``s``; ``P``
removes the mean for a LayerNorm), then the unembedding, as :func:`mechscope.analysis.circuits.unembedding`
reads it. Left out: the norm's division by the residual's size (a positive factor per token, changing no
ranking) and its bias (the same for every feature). Folding the norm into ``W_U`` changes no number.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.analysis.circuits import read_through
from mechscope.sae.activations import check_hook, stop_layer
from mechscope.sae.base import SAE, SAEError
from mechscope.sae.evaluation import check_tokens, kept_positions

# Hooks whose activations are added to the residual stream as they are, so W_U reads them.
RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
CELLS_PER_BIN = 8  # histogram cells per requested bin; the final bins are groups of cells


@dataclass
class Example:
    """A window of tokens around one position, with the feature's activation on each token."""

    row: int  # which sequence of ``tokens``
    position: int  # where the feature fired in that sequence
    value: float  # its activation there
    tokens: list[int]  # token ids of the window
    activations: list[float]  # the feature's activation on each of them
    focus: int  # index of ``position`` inside the window


@dataclass
class Interval:
    """Examples drawn uniformly from the firings with activation in ``[low, high)``."""

    low: float
    high: float
    count: int  # firings in the interval
    examples: list[Example]


@dataclass
class Feature:
    """One feature's statistics (see the module note)."""

    index: int
    firings: int
    frequency: float  # firings / kept positions
    max_activation: float
    mean_activation: float  # over firings
    top: list[Example]
    intervals: list[Interval]
    histogram_counts: list[int]
    histogram_edges: list[float]  # one more than the counts; bins are [edge_i, edge_i+1)
    top_logits: list[tuple[int, float]] = field(default_factory=list)  # (token id, logit effect), largest first
    bottom_logits: list[tuple[int, float]] = field(default_factory=list)  # most negative first


@dataclass
class FeatureStats:
    """Statistics of some features of an SAE over a batch of tokens."""

    features: list[Feature]
    hook_name: str
    d_sae: int
    n_tokens: int  # kept positions (not BOS / EOS / padding)
    logit_note: str  # how the logit effect was computed, or why there is none

    def feature(self, index: int) -> Feature:
        """The statistics of feature ``index``."""
        for feature in self.features:
            if feature.index == index:
                return feature
        raise SAEError(f"feature {index} is not among these statistics: {[f.index for f in self.features]}")

    def select(self, indices: list[int]) -> FeatureStats:
        """The same statistics for ``indices`` only, in that order."""
        return FeatureStats(
            [self.feature(i) for i in indices], self.hook_name, self.d_sae, self.n_tokens, self.logit_note
        )


@dataclass
class Firings:
    """Firings kept as examples: the feature (column), a cell, a sort key, where, and the window."""

    feature: Int[Tensor, " n"]
    cell: Int[Tensor, " n"]
    key: Float[Tensor, " n"]
    value: Float[Tensor, " n"]
    row: Int[Tensor, " n"]
    position: Int[Tensor, " n"]
    window: Float[Tensor, "n window"]  # NaN outside the sequence

    def take(self, index: Int[Tensor, " k"]) -> Firings:
        return Firings(*(getattr(self, name)[index] for name in FIRING_FIELDS))

    def cat(self, other: Firings) -> Firings:
        return Firings(*(torch.cat([getattr(self, name), getattr(other, name)]) for name in FIRING_FIELDS))

    def keep_smallest(self, keep: int, cells: int) -> Firings:
        """The ``keep`` smallest keys of each (feature, cell): a heap or a reservoir, merged in one sort."""
        group = self.feature * cells + self.cell
        order = self.key.argsort(stable=True)
        order = order[group[order].argsort(stable=True)]  # by group, ties by key
        grouped = group[order]
        rank = torch.arange(len(order)) - torch.searchsorted(grouped, grouped)
        return self.take(order[rank < keep])


FIRING_FIELDS = ("feature", "cell", "key", "value", "row", "position", "window")


def no_firings(window: int) -> Firings:
    empty = torch.zeros(0, dtype=torch.long)
    return Firings(empty, empty, torch.zeros(0), torch.zeros(0), empty, empty, torch.zeros(0, window))


class Grid:
    """Each feature's equal cells from 0, counting firings; the width doubles (merging neighbouring
    cells, exactly) whenever a value would fall past the last cell."""

    def __init__(self, n_features: int, cells: int) -> None:
        self.cells = cells
        self.width = torch.zeros(n_features, dtype=torch.float64)
        self.counts = torch.zeros(n_features, cells, dtype=torch.long)

    def grow(self, largest: Float[Tensor, " feature"]) -> bool:
        """Make room for each feature's ``largest`` value (0: it has not fired); a new feature starts
        half full. Returns whether any width doubled."""
        largest = largest.double()
        new = (self.width == 0) & (largest > 0)
        self.width[new] = largest[new] / (self.cells // 2 - 0.5)  # mid-cell: no value of this batch on an edge
        doubled = False
        while (full := (self.width > 0) & (largest >= self.width * self.cells)).any():
            pairs = self.counts[full].view(-1, self.cells // 2, 2).sum(-1)
            self.counts[full] = torch.cat([pairs, torch.zeros_like(pairs)], 1)
            self.width[full] *= 2
            doubled = True
        return doubled

    def cell(self, feature: Int[Tensor, " n"], value: Float[Tensor, " n"]) -> Int[Tensor, " n"]:
        """Cell ``i`` holds values in ``[i·w, (i+1)·w)``."""
        return (value.double() / self.width[feature]).floor().long().clamp(0, self.cells - 1)

    def add(self, feature: Int[Tensor, " n"], value: Float[Tensor, " n"]) -> Int[Tensor, " n"]:
        """Count the firings; returns their cells."""
        cell = self.cell(feature, value)
        self.counts.index_put_((feature, cell), torch.ones_like(cell), accumulate=True)
        return cell

    def used(self, feature: int, largest: float) -> int:
        """Cells from 0 up to the one holding ``largest``."""
        return 0 if largest <= 0 else min(int(largest / float(self.width[feature])) + 1, self.cells)


@dataclass
class Settings:
    top: int
    quantiles: int
    per_quantile: int
    left: int
    right: int
    bins: int


class Tally:
    """The running state of :func:`feature_statistics` for the selected ``features``."""

    def __init__(self, features: list[int], settings: Settings, generator: torch.Generator) -> None:
        self.features, self.settings, self.generator = features, settings, generator
        n = len(features)
        window = settings.left + 1 + settings.right
        self.firings = torch.zeros(n, dtype=torch.long)
        self.total = torch.zeros(n, dtype=torch.float64)
        self.largest = torch.zeros(n)
        self.histogram = Grid(n, CELLS_PER_BIN * settings.bins)
        self.intervals = Grid(n, 2 * CELLS_PER_BIN * settings.quantiles)
        self.top, self.sample = no_firings(window), no_firings(window)

    def add(self, latents: Float[Tensor, "batch seq feature"], first_row: int) -> None:
        """Fold one batch's latents (0 at positions that do not count) into the state."""
        self.check_finite(latents, first_row)
        row, position, feature = latents.nonzero(as_tuple=True)
        value = latents[row, position, feature]
        n = len(self.firings)
        self.firings += torch.bincount(feature, minlength=n)
        self.total.index_add_(0, feature, value.double())
        self.largest = self.largest.scatter_reduce(0, feature, value, "amax")
        self.histogram.grow(self.largest)
        self.histogram.add(feature, value)
        if self.intervals.grow(self.largest):  # the sample's cells moved: re-file and re-draw it
            self.sample.cell = self.intervals.cell(self.sample.feature, self.sample.value)
            self.sample = self.sample.keep_smallest(self.settings.per_quantile, self.intervals.cells)
        cell = self.intervals.add(feature, value)
        padded = nn.functional.pad(latents, (0, 0, self.settings.left, self.settings.right), value=float("nan"))
        found = Firings(feature, cell, torch.zeros_like(value), value, row, position, torch.zeros(len(value), 0))
        key = torch.rand(len(value), generator=self.generator)
        self.sample = self.merge(
            self.sample, found, key, self.settings.per_quantile, self.intervals.cells, padded, first_row
        )
        found.cell = torch.zeros_like(cell)
        self.top = self.merge(self.top, found, -value, self.settings.top, 1, padded, first_row)

    def check_finite(self, latents: Float[Tensor, "batch seq feature"], first_row: int) -> None:
        """An infinite or NaN latent (an overflow upstream) has no place on the grids: refuse it by name."""
        bad = (~latents.isfinite()).nonzero()
        if len(bad):
            row, position, column = bad[0].tolist()
            value, feature = float(latents[row, position, column]), self.features[column]
            raise SAEError(f"feature {feature} is {value} at row {first_row + row}, position {position}: latents "
                           "must be finite (an overflow upstream, e.g. in float16?)")  # fmt: skip

    def merge(
        self, kept: Firings, found: Firings, key: Tensor, keep: int, cells: int, padded: Tensor, first_row: int
    ) -> Firings:
        """``kept`` and this batch's best ``found`` (windows cut only for those), best ``keep`` per cell."""
        found = Firings(found.feature, found.cell, key, found.value, found.row, found.position, found.window)
        best = found.keep_smallest(keep, cells)
        offsets = torch.arange(self.settings.left + 1 + self.settings.right)
        best.window = padded[best.row[:, None], best.position[:, None] + offsets, best.feature[:, None]]
        best.row = best.row + first_row
        return kept.cat(best).keep_smallest(keep, cells)


@torch.no_grad()
def feature_statistics(
    model: nn.Module,
    sae: SAE,
    tokens: Int[Tensor, "n seq"],
    *,
    features: list[int] | None = None,
    top: int = 20,
    quantiles: int = 5,
    per_quantile: int = 5,
    context: tuple[int, int] = (10, 3),
    bins: int = 40,
    logits: int = 10,
    batch_size: int = 16,
    drop_tokens: list[int] | None = None,
    seed: int = 0,
) -> FeatureStats:
    """Statistics of ``features`` (default: all) of ``sae`` over ``tokens``, in one pass of ``batch_size``
    sequences at a time (see the module note). ``context`` is (tokens before, tokens after) each
    example; ``drop_tokens`` (default: BOS, EOS, padding) are positions that never count; ``seed``
    fixes which examples the intervals show."""
    selected = checked_features(features, sae.cfg.d_sae)
    settings = checked_settings(tokens, top, quantiles, per_quantile, context, bins, logits, batch_size)
    hook = check_hook(model, sae.cfg.hook_name)
    device = next(model.parameters()).device
    keep = kept_positions(model, tokens.to(device), None, drop_tokens).cpu()
    tally = Tally(selected, settings, torch.Generator().manual_seed(seed))
    was_training = sae.training
    sae.eval()  # BatchTopK: the inference threshold
    try:
        for start in range(0, len(tokens), batch_size):
            acts = hook_activations(model, tokens[start : start + batch_size].to(device), hook)
            latents = selected_latents(sae, acts, torch.tensor(selected)).cpu()
            tally.add(latents.masked_fill(~keep[start : start + batch_size, :, None], 0), start)
    finally:
        sae.train(was_training)
    effects, note = logit_effects(model, sae, selected)
    n_tokens = int(keep.sum())
    built = [summary(tally, column, index, tokens, n_tokens) for column, index in enumerate(selected)]
    for feature, effect in zip(built, effects if effects is not None else [None] * len(built)):
        if effect is not None:
            feature.top_logits, feature.bottom_logits = extremes(effect, logits)
    return FeatureStats(built, hook, sae.cfg.d_sae, n_tokens, note)


def checked_features(features: list[int] | None, d_sae: int) -> list[int]:
    """The feature ids, once each is an int in ``[0, d_sae)`` named once."""
    if features is None:
        return list(range(d_sae))
    if isinstance(features, Tensor):
        features = features.tolist()
    if not isinstance(features, (list, tuple)) or not features:
        raise SAEError(f"features must be a non-empty list of feature ids in [0, {d_sae}) or None, got {features!r}")
    for index in features:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < d_sae:
            raise SAEError(f"features: each id must be an int in [0, d_sae={d_sae}), got {index!r}")
    if len(set(features)) != len(features):
        raise SAEError(f"features: each id may appear once, got {list(features)}")
    return list(features)


def checked_settings(tokens, top, quantiles, per_quantile, context, bins, logits, batch_size) -> Settings:
    """The sizes, each a positive int (``context`` two non-negative ints), named in the error."""
    check_tokens(tokens)
    for name, value in (("top", top), ("quantiles", quantiles), ("per_quantile", per_quantile), ("bins", bins),
                        ("logits", logits), ("batch_size", batch_size)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SAEError(f"{name} must be a positive int, got {value!r}")
    if (
        not isinstance(context, (tuple, list))
        or len(context) != 2
        or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in context)
    ):
        raise SAEError(f"context must be (tokens before, tokens after), two ints >= 0, got {context!r}")
    return Settings(top, quantiles, per_quantile, context[0], context[1], bins)


def hook_activations(model: nn.Module, tokens: Int[Tensor, "batch seq"], hook: str) -> Float[Tensor, "batch seq d"]:
    """The activations at ``hook``, the forward pass stopped right after it."""
    stop = stop_layer([hook])
    _, cache = model.run_with_cache(
        tokens, return_type=None if stop is not None else "logits", names_filter=[hook], stop_at_layer=stop
    )
    return cache[hook].flatten(2)


def selected_latents(sae: SAE, acts: Float[Tensor, "batch seq d"], selected: Int[Tensor, " m"]) -> Tensor:
    """The latents of the selected features ``[batch, seq, m]``, from the SAE's sparse encoding."""
    sparse = sae.encode_sparse(acts.to(sae.W_enc.device))
    column = torch.full((sae.cfg.d_sae,), len(selected), dtype=torch.long, device=sparse.indices.device)
    column[selected.to(column.device)] = torch.arange(len(selected), device=column.device)
    out = sparse.values.new_zeros((*sparse.values.shape[:-1], len(selected) + 1))  # the last column: the rest
    return out.scatter_add(-1, column[sparse.indices], sparse.values)[..., :-1].float()


def logit_effects(model: nn.Module, sae: SAE, selected: list[int]) -> tuple[Tensor | None, str]:
    """Each selected feature's direct effect on the logits, when the SAE writes into the residual stream:
    its decoder row through the final norm's linear part (scale, and a LayerNorm's centring), then ``W_U``."""
    written = sae.cfg.output_hook_name or sae.cfg.hook_name
    W_U = getattr(model, "W_U", None)
    if W_U is None or not written.endswith(RESIDUAL_HOOKS) or sae.cfg.d_out != W_U.shape[0]:
        return None, f"no logit effect: {written} is not added to the residual stream that W_U reads"
    reader = read_through(getattr(model, "ln_final", None), W_U.detach().float())
    effect = sae.W_dec[selected].detach().float() @ reader.to(sae.W_dec.device)
    return effect.cpu(), "W_dec[f] through the final norm's linear part (scale, LayerNorm centring), then W_U"


def extremes(effect: Float[Tensor, " vocab"], k: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    k = min(k, len(effect))
    high, low = effect.topk(k), effect.topk(k, largest=False)
    return (
        list(zip(high.indices.tolist(), high.values.tolist())),
        list(zip(low.indices.tolist(), low.values.tolist())),
    )


def summary(tally: Tally, column: int, index: int, tokens: Tensor, n_tokens: int) -> Feature:
    """One feature's :class:`Feature` from the final state."""
    firings, largest = int(tally.firings[column]), float(tally.largest[column])
    top = tally.top.take((tally.top.feature == column).nonzero()[:, 0])
    top = top.take(top.value.argsort(descending=True, stable=True))
    counts, edges = histogram(tally.histogram, column, largest, tally.settings.bins)
    return Feature(
        index=index,
        firings=firings,
        frequency=firings / max(n_tokens, 1),
        max_activation=largest,
        mean_activation=float(tally.total[column]) / firings if firings else 0.0,
        top=examples(top, tokens, tally.settings.left),
        intervals=intervals(tally, column, largest, tokens),
        histogram_counts=counts,
        histogram_edges=edges,
    )


def histogram(grid: Grid, column: int, largest: float, bins: int) -> tuple[list[int], list[float]]:
    """At most ``bins`` equal bins from 0 past ``largest``: groups of neighbouring cells."""
    used = grid.used(column, largest)
    if used == 0:
        return [], []
    group = -(-used // bins)
    n = -(-used // group)
    counts = grid.counts[column, : n * group].view(n, group).sum(-1)
    width = float(grid.width[column]) * group
    return counts.tolist(), [i * width for i in range(n + 1)]


def intervals(tally: Tally, column: int, largest: float, tokens: Tensor) -> list[Interval]:
    """The used cells in ``quantiles`` nearly equal runs, each with its sampled examples, lowest first."""
    grid, sample = tally.intervals, tally.sample
    used = grid.used(column, largest)
    mine = sample.take((sample.feature == column).nonzero()[:, 0])
    bounds = sorted({round(i * used / tally.settings.quantiles) for i in range(tally.settings.quantiles + 1)})
    width = float(grid.width[column])
    out = []
    for low, high in itertools.pairwise(bounds):
        inside = mine.take(((mine.cell >= low) & (mine.cell < high)).nonzero()[:, 0])
        drawn = inside.take(inside.key.argsort(stable=True)[: tally.settings.per_quantile])
        drawn = drawn.take(drawn.value.argsort(descending=True, stable=True))
        count = int(grid.counts[column, low:high].sum())
        out.append(Interval(low * width, high * width, count, examples(drawn, tokens, tally.settings.left)))
    return out


def examples(found: Firings, tokens: Tensor, left: int) -> list[Example]:
    """Kept firings as :class:`Example` windows, trimmed to the sequence."""
    out = []
    for i in range(len(found.value)):
        row, position = int(found.row[i]), int(found.position[i])
        start, window = max(0, position - left), found.window[i]
        inside = window[~window.isnan()]
        ids = tokens[row, start : start + len(inside)].tolist()
        out.append(Example(row, position, float(found.value[i]), ids, inside.tolist(), position - start))
    return out
