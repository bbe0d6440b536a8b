"""The key-value cache: running a sequence in chunks (a prompt, then a token at a time) must give
the logits of one full forward pass, for every architecture option that touches attention or
positions; hooks see only the new positions; what is refused leaves the cache as it was."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mechscope.model import InputError
from mechscope.model.kv_cache import KeyValueCache
from tests.conftest import random_model

ROTARY = dict(positional_embedding="rotary")
ARCHITECTURES = {
    "learned": {},
    "rotary": dict(ROTARY, normalization="rmsnorm", gated_mlp=True, act_fn="silu", attn_bias=False),
    "gqa": dict(ROTARY, n_key_value_heads=2),
    "mqa-ungrouped": dict(ROTARY, n_key_value_heads=1, ungroup_grouped_query_attention=True),
    "sliding-window": dict(ROTARY, n_key_value_heads=2, sliding_window=3, sliding_window_layers=[0, 2]),
    "gptj-parallel": dict(ROTARY, rotary_style="gptj", rotary_dim=4, parallel_attn_mlp=True),
    "gemma2": dict(
        ROTARY,
        normalization="rmsnorm",
        norm_weight_offset=1.0,
        post_norm=True,
        attn_softcap=5.0,
        final_softcap=3.0,
        sliding_window=4,
        embed_scale=32**0.5,
    ),
    "olmo2": dict(ROTARY, normalization="rmsnorm", pre_norm=False, post_norm=True, qk_norm="all_heads"),
    "qwen3": dict(ROTARY, normalization="rmsnorm", qk_norm="per_head", n_key_value_heads=2),
    "llama3-rope": dict(
        ROTARY,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8,
        ),
    ),
    "dynamic-rope-within-trained-length": dict(
        ROTARY, rope_scaling=dict(rope_type="dynamic", factor=2.0, original_max_position_embeddings=24)
    ),
}


def run_in_chunks(model, tokens, chunks, attention_mask=None, hooks=()):
    """Feed ``tokens`` chunk by chunk through one cache; the logits of every position."""
    cache = KeyValueCache(model.cfg.n_layers)
    outputs, start = [], 0
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for size in chunks:
            mask = None if attention_mask is None else attention_mask[:, start : start + size]
            outputs.append(model(tokens[:, start : start + size], attention_mask=mask, past_kv_cache=cache))
            start += size
    assert start == tokens.shape[1] and cache.n_seen == start
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("overrides", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_prompt_then_one_token_at_a_time_matches_one_forward_pass(overrides):
    model = random_model(**overrides)
    tokens = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # the second row is left-padded
    chunks = [5, 1, 1, 3, 1, 1]
    with torch.no_grad():
        full, full_padded = model(tokens), model(tokens, attention_mask=mask)
    torch.testing.assert_close(run_in_chunks(model, tokens, chunks), full, atol=1e-5, rtol=0)
    real = mask.bool()
    chunked = run_in_chunks(model, tokens, chunks, attention_mask=mask)
    torch.testing.assert_close(chunked[real], full_padded[real], atol=1e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 6), min_size=1, max_size=8),
    pads=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    window=st.none() | st.integers(1, 5),
)
def test_any_chunking_matches_one_forward_pass(chunks, pads, window):
    total = sum(chunks)
    assume(total <= 24 and chunks[0] > max(pads))  # within n_ctx; every prompt row has a real token
    model = random_model(n_layers=2, positional_embedding="rotary", n_key_value_heads=2, sliding_window=window)
    mask = torch.ones(len(pads), total, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    tokens = torch.randint(0, 50, mask.shape)
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
    chunked = run_in_chunks(model, tokens, chunks, attention_mask=mask)
    torch.testing.assert_close(chunked[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


def test_hooks_fire_on_every_step_with_the_new_positions_only():
    model = random_model(positional_embedding="rotary", n_key_value_heads=2)
    tokens = torch.randint(0, 50, (2, 8))
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_rot_k", "blocks.1.attn.hook_pattern"]
    _, full = model.run_with_cache(tokens, names_filter=names)
    seen = []
    run_in_chunks(model, tokens, [5, 1, 2], hooks=[(names, lambda x, hook: seen.append((hook.name, x.clone())))])
    assert [name for name, _ in seen] == names * 3
    for step, (start, stop) in enumerate([(0, 5), (5, 6), (6, 8)]):
        resid, keys, pattern = (x for _, x in seen[3 * step : 3 * step + 3])
        assert resid.shape == (2, stop - start, 32) and keys.shape == (2, stop - start, 2, 8)
        assert pattern.shape == (2, 4, stop - start, stop)  # new queries against every key so far
        torch.testing.assert_close(resid, full["blocks.0.hook_resid_pre"][:, start:stop], atol=1e-6, rtol=0)
        torch.testing.assert_close(keys, full["rot_k", 1][:, start:stop], atol=1e-5, rtol=0)
        torch.testing.assert_close(pattern, full["pattern", 1][:, :, start:stop, :stop], atol=1e-5, rtol=0)


@pytest.mark.parametrize("positional_embedding", ["learned", "rotary"])
def test_the_cache_holds_every_layers_keys_and_values_after_any_rotation(positional_embedding):
    model = random_model(positional_embedding=positional_embedding, n_key_value_heads=2)
    tokens = torch.randint(0, 50, (2, 7))
    key_name = "rot_k" if positional_embedding == "rotary" else "k"
    _, full = model.run_with_cache(tokens)
    cache = KeyValueCache(model.cfg.n_layers)
    with torch.no_grad():
        model(tokens[:, :4], past_kv_cache=cache)
        model(tokens[:, 4:], past_kv_cache=cache)
    for layer in range(3):
        torch.testing.assert_close(cache.keys[layer], full[key_name, layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache.values[layer], full["v", layer], atol=1e-5, rtol=0)
    assert cache.padding_mask.tolist() == [[1] * 7] * 2


def test_selecting_rows_carries_on_as_if_only_those_were_run():
    model = random_model(positional_embedding="rotary", sliding_window=4)
    tokens = torch.randint(0, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, :5] = 0
    cache = KeyValueCache(model.cfg.n_layers)
    rows = torch.tensor([2, 0])
    with torch.no_grad():
        model(tokens[:, :6], attention_mask=mask[:, :6], past_kv_cache=cache)
        cache.select(rows)
        assert cache.padding_mask.shape == (2, 6) and cache.keys[0].shape[0] == 2
        steps = [model(tokens[rows, i : i + 1], past_kv_cache=cache) for i in range(6, 10)]
        full = model(tokens[rows], attention_mask=mask[rows])
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], atol=1e-5, rtol=0)


def test_key_value_cache_bookkeeping():
    cache = KeyValueCache(n_layers=2)
    assert cache.n_seen == 0 and cache.n_real() is None and cache.keys == [None, None]
    assert cache.extend_mask(None, (2, 2), torch.device("cpu")) is None  # no padding yet: no mask at all
    assert cache.n_seen == 2 and not cache.has_padding
    assert cache.extend_mask(torch.tensor([[0], [1]]), (2, 1), torch.device("cpu")).tolist() == [[1, 1, 0], [1, 1, 1]]
    assert cache.extend_mask(None, (2, 1), torch.device("cpu")).tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]]
    assert cache.n_seen == 4 and cache.n_real().tolist() == [3, 4]
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    assert cache.append(1, k, v)[0] is k
    k2, v2 = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    keys, values = cache.append(1, k2, v2)
    assert torch.equal(keys, torch.cat([k, k2], dim=1)) and torch.equal(values, torch.cat([v, v2], dim=1))
    assert cache.keys[0] is None and cache.keys[1] is keys
    cache.select(torch.tensor([1]))
    assert cache.padding_mask.tolist() == [[1, 1, 1, 1]] and torch.equal(cache.values[1], values[1:])
    assert cache.keys[0] is None


def test_too_long_with_cached_tokens_is_refused_naming_the_limit():
    model = random_model(positional_embedding="rotary")  # n_ctx = 24
    tokens = torch.randint(0, 50, (1, 24))
    cache = KeyValueCache(model.cfg.n_layers)
    with torch.no_grad():
        model(tokens[:, :20], past_kv_cache=cache)
        with pytest.raises(InputError, match=r"sequence length 25 \(20 cached \+ 5 new\) exceeds .*n_ctx=24"):
            model(torch.randint(0, 50, (1, 5)), past_kv_cache=cache)
        assert cache.n_seen == 20 and cache.keys[0].shape[1] == 20  # nothing was added
        last = model(tokens[:, 20:], past_kv_cache=cache)
        torch.testing.assert_close(last, model(tokens)[:, 20:], atol=1e-5, rtol=0)
        with pytest.raises(InputError, match=r"25 \(24 cached \+ 1 new\).*n_ctx=24"):
            model(tokens[:, :1], past_kv_cache=cache)


REFUSED_STEPS = {
    "token-out-of-vocabulary": dict(input=torch.tensor([[99]])),
    "all-padding-mask": dict(input=torch.tensor([[3]]), attention_mask=torch.tensor([[0]])),
    "position-out-of-range": dict(input=torch.tensor([[3]]), position_ids=torch.tensor([[24]])),
}


@pytest.mark.parametrize("step", REFUSED_STEPS.values(), ids=REFUSED_STEPS.keys())
def test_a_refused_step_leaves_the_cache_as_it_was(step):
    model = random_model(positional_embedding="rotary")
    tokens = torch.randint(0, 50, (1, 7))
    cache = KeyValueCache(model.cfg.n_layers)
    with torch.no_grad():
        model(tokens[:, :6], past_kv_cache=cache)
        with pytest.raises(InputError):
            model(**step, past_kv_cache=cache)
        assert cache.n_seen == 6, "the refused step was recorded in the cache's padding mask"
        assert all(k.shape[1] == 6 for k in cache.keys)
        torch.testing.assert_close(model(tokens[:, 6:], past_kv_cache=cache), model(tokens)[:, 6:], atol=1e-5, rtol=0)


def test_a_step_whose_hook_fails_midway_leaves_the_cache_as_it_was():
    """Layers before the failing hook had already appended their keys; they are taken back."""
    model = random_model(positional_embedding="rotary", n_key_value_heads=2)
    tokens = torch.randint(0, 50, (2, 7))
    cache = KeyValueCache(model.cfg.n_layers)

    def fail(x, hook):
        raise RuntimeError("hook failed")

    with torch.no_grad():
        model(tokens[:, :6], past_kv_cache=cache)
        with (
            pytest.raises(RuntimeError, match="hook failed"),
            model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", fail)]),
        ):
            model(tokens[:, 6:], past_kv_cache=cache)
        assert cache.n_seen == 6 and [k.shape[1] for k in cache.keys] == [6, 6, 6]
        torch.testing.assert_close(model(tokens[:, 6:], past_kv_cache=cache), model(tokens)[:, 6:], atol=1e-5, rtol=0)


def test_a_batch_that_does_not_match_the_cache_is_refused():
    model = random_model()
    cache = KeyValueCache(model.cfg.n_layers)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 4)), past_kv_cache=cache)
        with pytest.raises(InputError, match="the key-value cache holds 2 sequences but the input has 3"):
            model(torch.randint(0, 50, (3, 1)), past_kv_cache=cache)
    assert cache.n_seen == 4


def test_truncate_forgets_the_latest_tokens():
    cache = KeyValueCache(n_layers=2)
    cache.extend_mask(torch.tensor([[0, 1, 1, 1]]), (1, 4), torch.device("cpu"))
    k, v = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
    cache.append(0, k, v)
    cache.truncate(2)
    assert cache.n_seen == 2 and cache.padding_mask.tolist() == [[0, 1]] and cache.n_real().tolist() == [1]
    assert torch.equal(cache.keys[0], k[:, :2]) and torch.equal(cache.values[0], v[:, :2]) and cache.keys[1] is None
    cache.truncate(0)
    assert cache.n_seen == 0 and cache.keys == [None, None] and cache.padding_mask is None
