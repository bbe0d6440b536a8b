"""The patching engine equals the naive loop (one full forward pass per patch) within 1e-5,
for every sweep kind, every architecture variant, padded batches and any batching of patches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.interventions.metrics import KLDivergence, LogitDiff, Normalised, Probability
from mechscope.interventions.patching import Patch, PatchingError, patch
from mechscope.model.hooks import HookNameError
from tests.conftest import random_model

TOLERANCE = 1e-5
ARCHITECTURES = {
    "gpt2": {},
    "rotary": {"positional_embedding": "rotary"},
    "parallel": {"parallel_attn_mlp": True},
    "gqa_rms_gated": {"n_key_value_heads": 2, "normalization": "rmsnorm", "gated_mlp": True, "act_fn": "silu"},
    "attn_only": {"attn_only": True},
    "post_norm_softcap": {"post_norm": True, "final_softcap": 5.0, "normalization": "rmsnorm"},
    "sliding_window": {"positional_embedding": "rotary", "sliding_window": 3, "sliding_window_layers": [0, 2]},
}
SEQ = 7


def naive(model, target, source, metric, patches, attention_mask=None):
    """The reference: run the whole model once per patch, overwriting the patched entries."""
    out = []
    for p in patches:

        def hook(activation, point, p=p):
            activation = activation.clone()
            index = (slice(None), *p.index)
            activation[index] = source[p.name].expand_as(activation)[index]
            return activation

        with torch.no_grad():
            logits = model.run_with_hooks(target, attention_mask=attention_mask, fwd_hooks=[(p.name, hook)])
        out.append(torch.as_tensor(metric(logits)).float().mean())
    return torch.stack(out)


def setup(config: dict, batch: int = 3, seed: int = 0):
    model = random_model(**config)
    g = torch.Generator().manual_seed(seed)
    clean, corrupted = torch.randint(0, 50, (2, batch, SEQ), generator=g)
    answer, wrong = torch.randint(0, 50, (2, batch), generator=g)
    return model, clean, corrupted, LogitDiff(answer=answer, wrong=wrong)


def clean_cache(model, clean, names, attention_mask=None):
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=names, attention_mask=attention_mask)
    return dict(cache.items())


def every_kind(model) -> list[Patch]:
    """One patch list covering the residual stream, every head hook at all positions and at one
    position, neurons, attention patterns and the embeddings."""
    cfg = model.cfg
    patches = [Patch("hook_embed", (p,)) for p in range(SEQ)]
    for layer in range(cfg.n_layers):
        patches += [Patch(f"blocks.{layer}.hook_resid_pre", (p,)) for p in range(SEQ)]
        patches.append(Patch(f"blocks.{layer}.hook_attn_out", ()))
        for hook, heads in (("z", cfg.n_heads), ("q", cfg.n_heads), ("k", cfg.n_kv_heads_exposed)):
            name = f"blocks.{layer}.attn.hook_{hook}"
            patches += [Patch(name, (slice(None), h)) for h in range(heads)]
            patches += [Patch(name, (p, h)) for h in range(heads) for p in (0, 3, SEQ - 1)]
        patches += [Patch(f"blocks.{layer}.attn.hook_pattern", (h, p)) for h in range(cfg.n_heads) for p in (1, 5)]
        if cfg.has_mlp:
            patches += [Patch(f"blocks.{layer}.mlp.hook_post", (slice(None), n)) for n in range(0, cfg.d_mlp, 17)]
            patches.append(Patch(f"blocks.{layer}.hook_mlp_out", (slice(2, 5),)))
    return patches


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_kind_of_patch_equals_the_naive_loop(arch):
    model, clean, corrupted, metric = setup(ARCHITECTURES[arch])
    patches = every_kind(model)
    source = clean_cache(model, clean, sorted({p.name for p in patches}))
    fast = patch(model, corrupted, source, metric, patches, max_tokens=200)
    slow = naive(model, corrupted, source, metric, patches)
    assert (fast - slow).abs().max() < TOLERANCE
    assert slow.std() > 0.01  # the patches do something, so agreement is not trivial


@settings(max_examples=15, deadline=None)
@given(max_tokens=st.integers(1, 400), seed=st.integers(0, 3))
def test_how_patches_are_batched_does_not_change_the_result(max_tokens, seed):
    model, clean, corrupted, metric = setup({"positional_embedding": "rotary"}, seed=seed)
    patches = [Patch(f"blocks.{i}.attn.hook_z", (p, h)) for i in range(3) for h in range(4) for p in range(SEQ)]
    source = clean_cache(model, clean, sorted({p.name for p in patches}))
    one_pass_each = patch(model, corrupted, source, metric, patches, max_tokens=1)
    assert (patch(model, corrupted, source, metric, patches, max_tokens=max_tokens) - one_pass_each).abs().max() < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_with_a_position_per_example(side):
    model, clean, corrupted, _ = setup({})
    lengths = torch.tensor([SEQ, 4, 5])
    real = torch.arange(SEQ)[None] < lengths[:, None]
    mask = (real if side == "right" else real.flip(1)).long()
    last = lengths - 1 if side == "right" else torch.full((3,), SEQ - 1)
    metric = LogitDiff(position=last, answer=torch.tensor([1, 2, 3]), wrong=torch.tensor([4, 5, 6]))
    patches = [Patch(f"blocks.{i}.hook_resid_pre", (p,)) for i in range(3) for p in range(SEQ)]
    patches += [Patch(f"blocks.{i}.attn.hook_v", (p, 1)) for i in range(3) for p in range(SEQ)]
    source = clean_cache(model, clean, sorted({p.name for p in patches}), attention_mask=mask)
    fast = patch(model, corrupted, source, metric, patches, attention_mask=mask, max_tokens=64)
    slow = naive(model, corrupted, source, metric, patches, attention_mask=mask)
    assert (fast - slow).abs().max() < TOLERANCE


def test_every_metric_and_a_plain_callable():
    model, clean, corrupted, diff = setup({})
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    metrics = [
        Probability(answer=torch.tensor([[1, 2], [3, 4], [5, 6]]), position=-2),
        KLDivergence(reference=clean_logits[:, -1]),
        Normalised(base=diff, clean=float(diff(clean_logits).mean()), corrupted=float(diff(corrupted_logits).mean())),
        lambda logits: logits[:, :, 3].mean(),  # reads every position: logits computed everywhere
    ]
    patches = [Patch(f"blocks.{i}.hook_resid_mid", (p,)) for i in range(3) for p in range(SEQ)]
    source = clean_cache(model, clean, sorted({p.name for p in patches}))
    for metric in metrics:
        fast = patch(model, corrupted, source, metric, patches, max_tokens=100)
        assert (fast - naive(model, corrupted, source, metric, patches)).abs().max() < TOLERANCE


def test_patches_after_the_last_block_and_broadcast_sources():
    model, _, corrupted, metric = setup({})
    source = {"ln_final.hook_scale": torch.ones(1, SEQ, 1), "blocks.1.hook_resid_post": torch.zeros(1, SEQ, 32)}
    patches = [Patch("ln_final.hook_scale", (p,)) for p in range(SEQ)]
    patches += [Patch("blocks.1.hook_resid_post", (p,)) for p in range(SEQ)]
    fast = patch(model, corrupted, source, metric, patches)
    assert (fast - naive(model, corrupted, source, metric, patches)).abs().max() < TOLERANCE


def test_a_patch_that_copies_the_target_itself_changes_nothing():
    model, _, corrupted, metric = setup({})
    patches = [Patch(f"blocks.{i}.attn.hook_z", (slice(None), h)) for i in range(3) for h in range(4)]
    source = clean_cache(model, corrupted, sorted({p.name for p in patches}))
    with torch.no_grad():
        unpatched = metric(model(corrupted)).mean()
    assert (patch(model, corrupted, source, metric, patches) - unpatched).abs().max() < TOLERANCE


@pytest.mark.bad_input
def test_bad_patches_name_the_problem():
    model, clean, corrupted, metric = setup({})
    source = clean_cache(model, clean, ["blocks.0.hook_resid_pre"])
    with pytest.raises(HookNameError, match="resid_pre"):
        patch(model, corrupted, source, metric, [Patch("blocks.0.hook_resid_pr", (0,))])
    with pytest.raises(PatchingError, match=r"no activation for 'blocks\.1\.hook_resid_pre'"):
        patch(model, corrupted, source, metric, [Patch("blocks.1.hook_resid_pre", (0,))])
    with pytest.raises(PatchingError, match=r"index \(9,\) does not fit"):
        patch(model, corrupted, source, metric, [Patch("blocks.0.hook_resid_pre", (9,))])
    with pytest.raises(PatchingError, match="has batch 2; the target has 3"):
        patch(
            model,
            corrupted,
            {"blocks.0.hook_resid_pre": torch.zeros(2, SEQ, 32)},
            metric,
            [Patch("blocks.0.hook_resid_pre", (0,))],
        )
    with pytest.raises(PatchingError, match="max_tokens must be at least 1"):
        patch(model, corrupted, source, metric, [], max_tokens=0)
    with pytest.raises(PatchingError, match=r"target tokens must be \[batch, pos\]"):
        patch(model, corrupted[0], source, metric, [])
    with pytest.raises(ValueError, match="outside a sequence of 7 tokens"):
        patch(model, corrupted, source, LogitDiff(position=7, answer=1), [])


def test_a_source_with_one_position_is_the_same_value_at_every_position():
    """A mean over positions ([1, 1, ...]) patched at one position replaces that position only."""
    model, _, corrupted, metric = setup({})
    mean = torch.randn(1, 1, 4, 8)
    patches = [Patch("blocks.1.attn.hook_z", (p, 2)) for p in range(SEQ)] + [Patch("blocks.1.attn.hook_z", ())]
    fast = patch(model, corrupted, {"blocks.1.attn.hook_z": mean}, metric, patches)
    slow = naive(model, corrupted, {"blocks.1.attn.hook_z": mean.expand(1, SEQ, 4, 8)}, metric, patches)
    assert (fast - slow).abs().max() < TOLERANCE
    assert fast[:SEQ].std() > 1e-3  # different positions, different effects


def test_a_boolean_attention_mask_works_like_an_integer_one():
    model, clean, corrupted, metric = setup({})
    mask = torch.ones(3, SEQ, dtype=torch.bool)
    mask[1, 5:] = False
    metric = LogitDiff(position=torch.tensor([SEQ - 1, 4, SEQ - 1]), answer=1, wrong=2)
    patches = [Patch(f"blocks.{i}.hook_resid_pre", (p,)) for i in range(3) for p in range(SEQ)]
    source = clean_cache(model, clean, sorted({p.name for p in patches}), attention_mask=mask.long())
    as_bool = patch(model, corrupted, source, metric, patches, attention_mask=mask)
    assert torch.equal(as_bool, patch(model, corrupted, source, metric, patches, attention_mask=mask.long()))
    assert (as_bool - naive(model, corrupted, source, metric, patches, attention_mask=mask)).abs().max() < TOLERANCE


@settings(max_examples=25, deadline=None)
@given(
    firsts=st.lists(st.integers(0, 15), min_size=1, max_size=60),
    batch=st.integers(1, 4),
    max_tokens=st.integers(1, 300),
)
def test_passes_respect_max_tokens_and_cover_every_patch_once(firsts, batch, max_tokens):
    from mechscope.interventions.patching import Planned, chunks

    seq = 16
    planned = [Planned(i, Patch("x", (f,)), torch.Size([seq]), 0, f) for i, f in enumerate(sorted(firsts))]
    passes = list(chunks(planned, batch, seq, max_tokens))
    assert sorted(p.number for group in passes for p in group) == list(range(len(firsts)))
    for group in passes:
        assert len(group) == 1 or len(group) * batch * (seq - group[0].first) <= max_tokens


def test_right_padding_moves_every_patch_start_to_a_position_real_in_every_row():
    """A pass starting past a row's last real token would be all padding for that row, so such
    patches start earlier; the planner must count what the pass really computes."""
    from mechscope.interventions.patching import TargetRun, plan

    model, clean, corrupted, _ = setup({})
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, 2:] = 0  # row 1 has two real tokens
    run = TargetRun.record(model, corrupted, mask)
    assert run.latest_start == 1
    source = clean_cache(model, clean, ["blocks.0.hook_resid_pre"], attention_mask=mask)
    patches = [Patch("blocks.0.hook_resid_pre", (p,)) for p in range(SEQ)]
    assert [p.first for p in plan(model, patches, source, 3, run.latest_start)] == [0, 1, 1, 1, 1, 1, 1]


@pytest.mark.bad_input
def test_a_source_of_another_length_is_refused_by_name():
    model, _, corrupted, metric = setup({})
    with pytest.raises(PatchingError, match="must have the target's 7 positions"):
        patch(
            model,
            corrupted,
            {"blocks.0.hook_resid_pre": torch.zeros(1, 5, 32)},
            metric,
            [Patch("blocks.0.hook_resid_pre", (0,))],
        )


def test_progress_can_be_a_callback():
    """The workbench's progress bar: (passes done, passes in all), ending at all of them."""
    model = random_model()
    target = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache((target + 1) % 50)
    patches = [Patch(f"blocks.{layer}.hook_resid_pre", (pos,)) for layer in range(3) for pos in range(8)]
    calls = []
    expected = patch(model, target, dict(cache.items()), LogitDiff(answer=1), patches, max_tokens=16)
    found = patch(
        model,
        target,
        dict(cache.items()),
        LogitDiff(answer=1),
        patches,
        max_tokens=16,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert torch.equal(found, expected)
    total = calls[-1][1]
    assert total > 1 and calls == [(done, total) for done in range(total + 1)]
