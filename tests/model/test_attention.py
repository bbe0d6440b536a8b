"""Attention: the masks (causal, padding, sliding window), the two computation paths (explicit,
fused) agreeing, grouped-query attention against plain multi-head attention with repeated key and
value heads, soft-capping, Q/K normalisation."""

from __future__ import annotations

import pytest
import torch
from einops import einsum, rearrange
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mechscope.model.attention import AttentionContext, attention_mask_from_padding, causal_mask
from mechscope.model.rotary import rotary_angles, rotate
from tests.conftest import random_model


def explicit(model, tokens, **kwargs):
    """Logits computed with the explicit attention path (caching the pattern forces it)."""
    logits, _ = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"), **kwargs)
    return logits


def left_padding(lengths: list[int]) -> torch.Tensor:
    width = max(lengths)
    return torch.tensor([[0] * (width - n) + [1] * n for n in lengths])


def grouped_as_multi_head(grouped, **overrides):
    """The same model with every key/value head repeated for each query head that shares it."""
    cfg = grouped.cfg
    group = cfg.n_heads // cfg.n_key_value_heads
    mha = random_model(**{**overrides, "n_key_value_heads": cfg.n_heads})
    state = {}
    for name, param in grouped.state_dict().items():
        leaf = name.rsplit(".", 2)[-2:]
        if leaf[-1] in ("W_K", "W_V", "b_K", "b_V"):
            param = param.repeat_interleave(group, dim=0)
        elif leaf == ["k_norm", "w"] and cfg.qk_norm == "all_heads":
            param = rearrange(param, "(kv e) -> kv e", e=cfg.d_head).repeat_interleave(group, dim=0).flatten()
        state[name] = param
    mha.load_state_dict(state)
    return mha


# ------------------------------------------------------------------ masks
def reference_mask(padding: torch.Tensor, n_query: int, window: int | None) -> torch.Tensor:
    """Query q (of the last n_query positions) sees key k iff k == q, or k is a real token with
    q - window < k <= q."""
    batch, n_key = padding.shape
    out = torch.zeros(batch, 1, n_query, n_key, dtype=torch.bool)
    for b in range(batch):
        for i in range(n_query):
            q = n_key - n_query + i
            for k in range(n_key):
                in_window = window is None or q - k < window
                out[b, 0, i, k] = k == q or (k <= q and in_window and bool(padding[b, k]))
    return out


@settings(max_examples=40, deadline=None)
@given(
    padding=st.lists(st.lists(st.integers(0, 1), min_size=8, max_size=8), min_size=1, max_size=3),
    n_key=st.integers(1, 8),
    n_query=st.integers(1, 8),
    window=st.none() | st.integers(1, 9),
    as_bool=st.booleans(),
)
def test_mask_matches_its_definition(padding, n_key, n_query, window, as_bool):
    assume(n_query <= n_key)
    pad = torch.tensor(padding)[:, :n_key]
    mask = attention_mask_from_padding(pad.bool() if as_bool else pad, n_query, window)
    assert torch.equal(mask, reference_mask(pad, n_query, window))
    assert mask.any(-1).all()  # no query is left with nothing to attend to


@settings(max_examples=20, deadline=None)
@given(n_key=st.integers(1, 10), n_query=st.integers(1, 10), window=st.integers(1, 12))
def test_window_mask_sees_exactly_the_last_window_keys(n_key, n_query, window):
    assume(n_query <= n_key)
    mask = attention_mask_from_padding(torch.ones(1, n_key, dtype=torch.long), n_query, window)[0, 0]
    for i in range(n_query):
        q = n_key - n_query + i
        assert mask[i].nonzero().flatten().tolist() == list(range(max(0, q - window + 1), q + 1))
    no_window = attention_mask_from_padding(torch.ones(1, n_key, dtype=torch.long), n_query)[0, 0]
    assert torch.equal(no_window, causal_mask(n_query, n_key, torch.device("cpu")))


def test_context_builds_masks_only_when_needed_and_once():
    plain = AttentionContext(n_query=5)
    cpu = torch.device("cpu")
    assert plain.mask(None, cpu) is None and plain.mask(5, cpu) is None and plain.mask(9, cpu) is None
    windowed = plain.mask(2, cpu)
    assert windowed.shape == (1, 1, 5, 5) and plain.mask(2, cpu) is windowed
    assert windowed[0, 0, 4].tolist() == [False, False, False, True, True]
    padded = AttentionContext(n_query=3, padding_mask=torch.tensor([[0, 1, 1]]))
    assert padded.mask(None, cpu)[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    cached = AttentionContext(n_query=1, n_key=4)  # one new query after three cached keys
    assert cached.mask(None, cpu).tolist() == [[[[True, True, True, True]]]]
    assert cached.mask(2, cpu).tolist() == [[[[False, False, True, True]]]]


# ------------------------------------------------------------------ explicit and fused paths
heads_and_groups = st.sampled_from([(h, r) for h in (1, 2, 4, 8) for r in (1, 2, 4) if r <= h])


@settings(max_examples=20, deadline=None)
@given(
    heads=heads_and_groups,
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3),
    window=st.none() | st.integers(1, 6),
    rotary=st.booleans(),
    ungroup=st.booleans(),
)
def test_fused_and_explicit_attention_agree(heads, lengths, window, rotary, ungroup):
    n_heads, group = heads
    model = random_model(
        n_layers=2,
        n_heads=n_heads,
        n_key_value_heads=n_heads // group,
        sliding_window=window,
        positional_embedding="rotary" if rotary else "learned",
        ungroup_grouped_query_attention=ungroup,
    )
    mask = left_padding(lengths)
    tokens = torch.randint(0, 50, mask.shape)
    with torch.no_grad():
        fused = model(tokens, attention_mask=mask)
        slow = explicit(model, tokens, attention_mask=mask)
    real = mask.bool()
    assert torch.isfinite(fused).all() and torch.isfinite(slow).all()
    torch.testing.assert_close(fused[real], slow[real], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ grouped-query attention
GQA_VARIANTS = {
    "gqa": dict(n_key_value_heads=2),
    "mqa": dict(n_key_value_heads=1),
    "gqa-rotary-bias": dict(n_key_value_heads=2, positional_embedding="rotary"),
    "qk-norm-per-head": dict(n_key_value_heads=2, positional_embedding="rotary", qk_norm="per_head"),
    "qk-norm-all-heads": dict(n_key_value_heads=2, positional_embedding="rotary", qk_norm="all_heads"),
    "window": dict(n_key_value_heads=2, sliding_window=3),
}


@pytest.mark.parametrize("overrides", GQA_VARIANTS.values(), ids=GQA_VARIANTS.keys())
def test_grouped_attention_equals_multi_head_attention_with_repeated_kv_heads(overrides):
    grouped = random_model(**overrides)
    mha = grouped_as_multi_head(grouped, **overrides)
    ungrouped = random_model(**overrides, ungroup_grouped_query_attention=True)
    ungrouped.load_state_dict(grouped.state_dict())
    tokens = torch.randint(0, 50, (2, 9))
    mask = left_padding([9, 6])
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            expected = mha(tokens, **kwargs)
            torch.testing.assert_close(grouped(tokens, **kwargs), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(explicit(grouped, tokens, **kwargs), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(ungrouped(tokens, **kwargs), expected, atol=1e-5, rtol=0)


def test_hook_k_shows_kv_heads_or_every_head_when_ungrouped():
    tokens = torch.randint(0, 50, (2, 5))
    grouped = random_model(n_key_value_heads=2, positional_embedding="rotary")
    _, cache = grouped.run_with_cache(tokens)
    assert cache["k", 0].shape == cache["v", 0].shape == cache["rot_k", 0].shape == (2, 5, 2, 8)
    assert cache["q", 0].shape == cache["z", 0].shape == (2, 5, 4, 8)
    assert cache["pattern", 0].shape == (2, 4, 5, 5)
    ungrouped = random_model(n_key_value_heads=2, positional_embedding="rotary", ungroup_grouped_query_attention=True)
    ungrouped.load_state_dict(grouped.state_dict())
    _, ungrouped_cache = ungrouped.run_with_cache(tokens)
    for name in ("k", "v", "rot_k"):
        assert ungrouped_cache[name, 0].shape == (2, 5, 4, 8)
        expected = cache[name, 0].repeat_interleave(2, dim=2)  # query heads 0, 1 share key head 0
        torch.testing.assert_close(ungrouped_cache[name, 0], expected)
    torch.testing.assert_close(ungrouped_cache["pattern", 0], cache["pattern", 0], atol=1e-6, rtol=0)


def test_expanded_weights_index_by_query_head():
    attn = random_model(n_key_value_heads=2).blocks[0].attn
    assert attn.group_size == 2
    for name in ("W_K", "W_V", "b_K", "b_V"):
        expanded = attn.expanded(name)
        assert expanded.shape[0] == 4
        for head in range(4):
            assert torch.equal(expanded[head], getattr(attn, name)[head // 2])
    assert attn.expanded("W_Q") is attn.W_Q
    assert random_model(n_key_value_heads=2, attn_bias=False).blocks[0].attn.expanded("b_K") is None


def test_per_head_inputs_have_one_copy_per_key_value_head():
    tokens = torch.randint(0, 50, (2, 5))
    names = ["blocks.0.hook_q_input", "blocks.0.hook_k_input", "blocks.0.hook_v_input"]
    for ungroup, kv_copies in ((False, 2), (True, 4)):
        model = random_model(n_key_value_heads=2, ungroup_grouped_query_attention=ungroup)
        logits, cache = model.run_with_cache(tokens, names_filter=names)
        assert cache["blocks.0.hook_q_input"].shape == (2, 5, 4, 32)
        assert cache["blocks.0.hook_k_input"].shape == cache["blocks.0.hook_v_input"].shape == (2, 5, kv_copies, 32)
        with torch.no_grad():
            torch.testing.assert_close(logits, model(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("qk_norm", ["none", "per_head", "all_heads"])
@pytest.mark.parametrize("hook", ["k", "v"])
def test_editing_one_ungrouped_key_or_value_copy_changes_its_own_query_head(qk_norm, hook):
    """Ungrouping gives every query head its own copy of its key and value, so that one head's
    can be patched: the edit must reach that head and no other head of its group."""
    model = random_model(
        positional_embedding="rotary",
        normalization="rmsnorm",
        qk_norm=qk_norm,
        n_key_value_heads=2,
        ungroup_grouped_query_attention=True,
    )
    tokens = torch.randint(0, 50, (1, 6))
    _, base = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    for head in range(4):  # heads 0, 1 share key/value head 0; heads 2, 3 share head 1

        def nudge(x, hook, head=head):
            x = x.clone()
            x[:, :, head] += 1.0
            return x

        with model.hooks(fwd_hooks=[(f"blocks.0.attn.hook_{hook}", nudge)]):
            _, edited = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
        changed = (edited["z", 0] - base["z", 0]).abs().amax(dim=(0, 1, 3)) > 1e-6
        group_mate = head ^ 1
        assert changed[head], f"editing copy {head} of hook_{hook} left its query head unchanged"
        assert not changed[group_mate], f"editing copy {head} of hook_{hook} changed query head {group_mate}"
        if qk_norm != "all_heads":  # an all-heads norm mixes every key head's scale; the others are local
            assert changed.sum() == 1


# ------------------------------------------------------------------ sliding windows
def test_sliding_window_patterns_on_the_chosen_layers():
    model = random_model(sliding_window=3, sliding_window_layers=[0, 2])
    assert [model.cfg.window(i) for i in range(3)] == [3, None, 3]
    mask = left_padding([8, 5])
    _, cache = model.run_with_cache(torch.randint(0, 50, (2, 8)), attention_mask=mask)
    query, key = torch.arange(8)[:, None], torch.arange(8)[None]
    for layer, window in ((0, 3), (1, None), (2, 3)):
        pattern = cache["pattern", layer]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 8))
        allowed = (key <= query) & (query - key < (window or 8)) & mask.bool()[:, None, None, :]
        real = mask.bool()[:, None, :, None]
        assert (pattern[~allowed & real.expand_as(pattern)] == 0).all()
        assert (pattern[allowed & real.expand_as(pattern)] > 0).all()


@pytest.mark.parametrize("positional_embedding", ["learned", "rotary"])
def test_a_window_as_long_as_the_sequence_changes_nothing(positional_embedding):
    plain = random_model(positional_embedding=positional_embedding)
    windowed = random_model(positional_embedding=positional_embedding, sliding_window=6)
    windowed.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(windowed(tokens[:, :6]), plain(tokens[:, :6]), atol=1e-6, rtol=0)
        assert not torch.allclose(windowed(tokens)[:, 6:], plain(tokens)[:, 6:], atol=1e-4)
        torch.testing.assert_close(windowed(tokens)[:, :6], plain(tokens)[:, :6], atol=1e-6, rtol=0)


# ------------------------------------------------------------------ scores: scale, soft-cap, Q/K norm
def raw_scores(cache, layer: int, model) -> torch.Tensor:
    """Scores from the (rotated) queries and keys, computed independently of the model."""
    q_name, k_name = ("rot_q", "rot_k") if model.cfg.positional_embedding == "rotary" else ("q", "k")
    q, k = cache[q_name, layer], cache[k_name, layer]
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return einsum(q, k, "b qp h e, b kp h e -> b h qp kp") / model.cfg.attn_scale


@pytest.mark.parametrize("rotary", [False, True])
def test_soft_capped_scores_stay_within_the_cap(rotary):
    cap = 2.0
    overrides = dict(attn_scale=0.05, n_key_value_heads=2, positional_embedding="rotary" if rotary else "learned")
    model = random_model(attn_softcap=cap, **overrides)
    _, cache = model.run_with_cache(torch.randint(0, 50, (2, 7)))
    for layer in range(3):
        scores = cache["attn_scores", layer]
        raw = raw_scores(cache, layer, model)
        causal = torch.ones(7, 7, dtype=torch.bool).tril()
        assert torch.isneginf(scores[..., ~causal]).all()  # masked after capping
        assert (scores[..., causal].abs() <= cap).all()
        assert (raw[..., causal].abs() > cap).any()  # the cap really bit
        torch.testing.assert_close(scores[..., causal], cap * torch.tanh(raw[..., causal] / cap), atol=1e-5, rtol=0)
    uncapped = random_model(**overrides)
    uncapped.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(
            uncapped(torch.ones(1, 4, dtype=torch.long)), model(torch.ones(1, 4, dtype=torch.long))
        )


def test_unscaled_scores_are_divided_by_attn_scale():
    model = random_model(attn_scale=3.0)
    _, cache = model.run_with_cache(torch.randint(0, 50, (1, 5)))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    q, k = cache["q", 1], cache["k", 1]
    expected = einsum(q, k, "b qp h e, b kp h e -> b h qp kp") / 3.0
    torch.testing.assert_close(cache["attn_scores", 1][..., causal], expected[..., causal], atol=1e-5, rtol=0)


def test_final_softcap_bounds_the_logits():
    cap = 0.5
    model = random_model(final_softcap=cap)
    logits, cache = model.run_with_cache(torch.randint(0, 50, (2, 6)), names_filter="blocks.2.hook_resid_post")
    uncapped = model.unembed(model.ln_final(cache["resid_post", 2]))
    assert (logits.abs() <= cap).all() and (uncapped.abs() > cap).any()
    torch.testing.assert_close(logits, cap * torch.tanh(uncapped / cap), atol=1e-6, rtol=0)


@pytest.mark.parametrize("qk_norm", ["per_head", "all_heads"])
def test_qk_norm_normalises_queries_and_keys_before_the_rotation(qk_norm):
    model = random_model(positional_embedding="rotary", normalization="rmsnorm", qk_norm=qk_norm, n_key_value_heads=2)
    attn = model.blocks[1].attn
    per_head = qk_norm == "per_head"
    assert attn.q_norm.w.shape == ((8,) if per_head else (32,))
    assert attn.k_norm.w.shape == ((8,) if per_head else (16,))
    positions = torch.arange(6)[None]
    _, cache = model.run_with_cache(torch.randint(0, 50, (1, 6)), names_filter=lambda n: "blocks.1.attn" in n)
    angles = rotary_angles(model.cfg, positions, torch.float32)
    for name, norm in (("q", attn.q_norm), ("k", attn.k_norm)):
        x = cache[name, 1]
        flat = x if per_head else rearrange(x, "b p h e -> b p (h e)")
        rms = flat.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).sqrt()
        normed = flat / rms * norm.w
        normed = normed if per_head else rearrange(normed, "b p (h e) -> b p h e", e=8)
        torch.testing.assert_close(cache[f"rot_{name}", 1], rotate(normed, angles, 8, "neox"), atol=1e-5, rtol=1e-5)
        assert f"blocks.1.attn.{name}_norm.hook_scale" in model.hook_dict
    assert "blocks.1.attn.q_norm.w" in dict(model.named_parameters())
    assert not hasattr(random_model().blocks[0].attn, "q_norm")
