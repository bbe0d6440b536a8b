"""Feature statistics for dashboards: every number equals a brute-force computation over the dense
latents of all tokens at once, though the statistics are gathered batch by batch in one pass."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.loading.processing import process_weights
from mechscope.sae import SAEConfig, SAEError, build_sae
from mechscope.sae.features import feature_statistics
from tests.conftest import random_model

HOOK = "blocks.1.hook_resid_post"
D_SAE = 12


@pytest.fixture(scope="module")
def tiny():
    return random_model(d_vocab=40)


def make_sae(architecture: str = "relu", hook: str = HOOK, seed: int = 0):
    k = 4 if architecture == "topk" else None
    cfg = SAEConfig(d_in=32, d_sae=D_SAE, architecture=architecture, hook_name=hook, hook_layer=int(hook[7]), k=k)
    return build_sae(cfg, seed=seed).eval()


def make_tokens(n: int = 9, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 40, (n, seq), generator=torch.Generator().manual_seed(seed))


def dense_latents(model, sae, tokens) -> torch.Tensor:
    """Every latent at every position, from one forward pass over all tokens: [n, seq, d_sae]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[sae.cfg.hook_name])
        return sae.encode(cache[sae.cfg.hook_name])


@settings(max_examples=15, deadline=None)
@given(
    architecture=st.sampled_from(["relu", "topk"]),
    batch_size=st.integers(1, 10),
    top=st.integers(1, 12),
    before=st.integers(0, 4),
    after=st.integers(0, 4),
    features=st.lists(st.integers(0, D_SAE - 1), min_size=1, max_size=5, unique=True),
)
def test_top_examples_equal_a_dense_computation(tiny, architecture, batch_size, top, before, after, features):
    sae, tokens = make_sae(architecture), make_tokens()
    stats = feature_statistics(
        tiny, sae, tokens, features=features, top=top, context=(before, after), batch_size=batch_size
    )
    latents = dense_latents(tiny, sae, tokens)
    assert [f.index for f in stats.features] == features
    for feature in stats.features:
        column = latents[..., feature.index]
        firing = column.flatten() > 0
        expected = column.flatten()[firing].sort(descending=True).values[:top]
        got = torch.tensor([e.value for e in feature.top])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for example in feature.top:
            start = max(0, example.position - before)
            end = min(tokens.shape[1], example.position + after + 1)
            assert example.tokens == tokens[example.row, start:end].tolist()
            assert example.focus == example.position - start
            torch.testing.assert_close(torch.tensor(example.activations), column[example.row, start:end])
            assert example.activations[example.focus] == example.value
        assert len({(e.row, e.position) for e in feature.top}) == len(feature.top)


@settings(max_examples=15, deadline=None)
@given(batch_size=st.integers(1, 10), bins=st.integers(1, 30), seed=st.integers(0, 5))
def test_histogram_counts_every_firing_once(tiny, batch_size, bins, seed):
    sae, tokens = make_sae(seed=seed), make_tokens(seed=seed + 2)
    stats = feature_statistics(tiny, sae, tokens, bins=bins, batch_size=batch_size)
    latents = dense_latents(tiny, sae, tokens)
    assert stats.n_tokens == tokens.numel()
    for feature in stats.features:
        values = latents[..., feature.index].flatten()
        values = values[values > 0]
        assert feature.firings == sum(feature.histogram_counts) == len(values)
        assert feature.frequency == len(values) / tokens.numel()
        if not len(values):
            assert feature.histogram_edges == [] and feature.max_activation == 0
            continue
        assert len(feature.histogram_counts) <= bins
        edges = torch.tensor(feature.histogram_edges, dtype=torch.float64)
        assert edges[0] == 0 and edges[-1] > values.max() and (edges.diff() > 0).all()
        bucket = torch.bucketize(values.double(), edges, right=True) - 1
        assert torch.bincount(bucket, minlength=len(edges) - 1).tolist() == feature.histogram_counts
        torch.testing.assert_close(feature.max_activation, values.max().item())
        torch.testing.assert_close(feature.mean_activation, values.double().mean().item(), rtol=1e-5, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(batch_size=st.integers(1, 10), quantiles=st.integers(1, 7), seed=st.integers(0, 5))
def test_intervals_asked_for_everything_hold_every_firing(tiny, batch_size, quantiles, seed):
    """With room for every firing, the reservoirs must hold exactly the firings of each interval:
    nothing lost when cells merge as the maximum grows batch by batch."""
    sae, tokens = make_sae(seed=seed), make_tokens(seed=seed + 3)
    stats = feature_statistics(
        tiny, sae, tokens, quantiles=quantiles, per_quantile=10_000, context=(1, 1), batch_size=batch_size
    )
    latents = dense_latents(tiny, sae, tokens)
    for feature in stats.features:
        column = latents[..., feature.index]
        assert sum(i.count for i in feature.intervals) == feature.firings
        assert len(feature.intervals) <= quantiles
        for interval in feature.intervals:
            inside = ((column >= interval.low) & (column < interval.high) & (column > 0)).nonzero().tolist()
            assert sorted((e.row, e.position) for e in interval.examples) == sorted(map(tuple, inside))
            assert interval.count == len(inside)
        if feature.intervals:
            assert feature.intervals[-1].high > feature.max_activation and feature.intervals[0].low == 0


def test_interval_examples_are_samples_from_their_interval(tiny):
    sae, tokens = make_sae(), make_tokens(n=20)
    stats = feature_statistics(tiny, sae, tokens, quantiles=4, per_quantile=3, batch_size=3)
    latents = dense_latents(tiny, sae, tokens)
    for feature in stats.features:
        for interval in feature.intervals:
            assert len(interval.examples) == min(3, interval.count)
            for example in interval.examples:
                assert interval.low <= example.value < interval.high
                torch.testing.assert_close(example.value, latents[example.row, example.position, feature.index].item())
    other = feature_statistics(tiny, sae, tokens, quantiles=4, per_quantile=3, batch_size=3, seed=1)
    positions = [[(e.row, e.position) for i in f.intervals for e in i.examples] for f in stats.features]
    assert positions != [[(e.row, e.position) for i in f.intervals for e in i.examples] for f in other.features]


def test_every_sequence_runs_through_the_model_once(tiny):
    rows = []
    handle = tiny.embed.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    try:
        feature_statistics(tiny, make_sae(), make_tokens(n=11), batch_size=4)
    finally:
        handle.remove()
    assert rows == [4, 4, 3]


def test_dropped_tokens_never_count(tiny):
    tokens = make_tokens()
    tokens[:, 0] = 0
    sae = make_sae()
    stats = feature_statistics(tiny, sae, tokens, drop_tokens=[0], top=50)
    kept = tokens != 0
    latents = dense_latents(tiny, sae, tokens) * kept[..., None]
    assert stats.n_tokens == int(kept.sum())
    for feature in stats.features:
        assert feature.firings == int((latents[..., feature.index] > 0).sum())
        assert all(tokens[e.row, e.position] != 0 for e in feature.top)


@pytest.mark.parametrize("normalization", ["layernorm", "rmsnorm"])
def test_logit_effects_read_the_decoder_through_the_final_norm(normalization):
    """(P d ⊙ s) @ W_U with the norm's scale s and, for a LayerNorm, P removing the mean; folding
    the norm into W_U first gives the same numbers."""
    model = random_model(d_vocab=40, normalization=normalization)
    scale = model.ln_final.w.detach() + getattr(model.ln_final, "offset", 0.0)
    assert not torch.allclose(scale, torch.ones_like(scale))  # the scale matters in this model
    sae, tokens = make_sae(), make_tokens(n=2)
    stats = feature_statistics(model, sae, tokens, features=[3, 7], logits=5)
    for feature in stats.features:
        direction = sae.W_dec[feature.index].detach()
        if normalization == "layernorm":
            direction = direction - direction.mean()
        ordered = ((direction * scale) @ model.W_U.detach()).sort(descending=True)
        assert [t for t, _ in feature.top_logits] == ordered.indices[:5].tolist()
        assert [t for t, _ in feature.bottom_logits] == ordered.indices.flip(0)[:5].tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in feature.top_logits]), ordered.values[:5])
        torch.testing.assert_close(torch.tensor([v for _, v in feature.bottom_logits]), ordered.values.flip(0)[:5])
    folded = process_weights(copy.deepcopy(model), fold_ln=True)
    assert torch.equal(folded.ln_final.w + getattr(folded.ln_final, "offset", 0.0), torch.ones_like(scale))
    again = feature_statistics(folded, sae, tokens, features=[3, 7], logits=5)
    for feature, other in zip(stats.features, again.features):
        assert [t for t, _ in other.top_logits] == [t for t, _ in feature.top_logits]
        torch.testing.assert_close(other.top_logits, feature.top_logits)
        torch.testing.assert_close(other.bottom_logits, feature.bottom_logits)


def test_no_logit_effect_outside_the_residual_stream(tiny):
    stats = feature_statistics(tiny, make_sae(hook="blocks.0.hook_mlp_in"), make_tokens(n=2), features=[0])
    assert stats.features[0].top_logits == [] and "not added to the residual stream" in stats.logit_note


def test_select_keeps_the_asked_features_in_order(tiny):
    stats = feature_statistics(tiny, make_sae(), make_tokens(n=2), features=[1, 4, 9])
    assert [f.index for f in stats.select([9, 1]).features] == [9, 1]
    with pytest.raises(SAEError, match="feature 5"):
        stats.feature(5)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("features", "match"),
    [
        ([D_SAE], r"\[0, d_sae=12\)"),
        ([-1], r"\[0, d_sae=12\)"),
        ([1, 1], "once"),
        ([True], r"\[0, d_sae=12\)"),
        ([1.0], r"\[0, d_sae=12\)"),
        ([], "non-empty"),
        ("3", "non-empty list"),
    ],
)
def test_bad_feature_ids_are_refused(tiny, features, match):
    with pytest.raises(SAEError, match=match):
        feature_statistics(tiny, make_sae(), make_tokens(n=2), features=features)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"top": 0}, "top must be a positive int"),
        ({"quantiles": -1}, "quantiles"),
        ({"per_quantile": 0}, "per_quantile"),
        ({"bins": 2.5}, "bins"),
        ({"batch_size": 0}, "batch_size"),
        ({"context": (1,)}, "context"),
        ({"context": (1, -1)}, "context"),
    ],
)
def test_bad_settings_are_refused(tiny, options, match):
    with pytest.raises(SAEError, match=match):
        feature_statistics(tiny, make_sae(), make_tokens(n=2), **options)


@pytest.mark.bad_input
@pytest.mark.parametrize("tokens", [torch.zeros(3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(0, 4).long()])
def test_bad_tokens_are_refused(tiny, tokens):
    with pytest.raises(SAEError, match=r"tokens must be a non-empty integer tensor \[n, seq\]"):
        feature_statistics(tiny, make_sae(), tokens)


@pytest.mark.bad_input
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_latent_is_refused_by_name(tiny, value):
    """An overflow upstream must not reach the grids, whose widths would double forever."""
    sae, tokens = make_sae(), make_tokens(n=2)
    tokens[:, 0] = 0  # dropped: the first position that counts is 1
    with torch.no_grad():
        sae.b_enc[5] = value
    with pytest.raises(SAEError, match=rf"feature 5 is {value} at row 0, position 1: latents must be finite"):
        feature_statistics(tiny, sae, tokens, features=[1, 5], drop_tokens=[0])
