"""The activation store: the activations themselves, dropped positions, the early stop, the
shuffle buffer's determinism and memory bound, exact resumption, and the disk cache."""

from __future__ import annotations

import json
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mechscope import Model
from mechscope.model import ModelConfig, Transformer
from mechscope.sae.activations import (
    MANIFEST,
    MIN_BUFFER_SEQUENCES,
    ActivationStore,
    ModelStream,
    special_ids,
    token_source,
)
from mechscope.sae.base import SAEError

CHECK = settings(max_examples=15, deadline=None)
HOOKS = [
    "hook_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.attn.hook_z",
    "blocks.0.mlp.hook_post",
    "blocks.1.hook_resid_mid",
    "blocks.1.hook_resid_post",
    "ln_final.hook_normalized",
]


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> Model:
    return Model.from_pretrained(gpt2_dir)


def random_tokens(n: int, context: int, seed: int = 0, bos: int = 0) -> torch.Tensor:
    """Token rows starting with BOS, with more BOS tokens (document boundaries) scattered in."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 320, (n, context), generator=g)
    tokens[torch.rand(n, context, generator=g) < 0.15] = bos
    tokens[:, 0] = bos
    return tokens


def expected_rows(model, tokens, hook, mask=None) -> torch.Tensor:
    """The activations at real, non-special positions, from a plain full forward pass, in order."""
    options = {} if mask is None else {"attention_mask": mask}
    _, cache = model.run_with_cache(tokens, names_filter=hook, **options)
    acts = cache[hook]
    acts = rearrange(acts, "b p h d -> b p (h d)") if acts.ndim == 4 else acts
    keep = ~torch.isin(tokens, torch.tensor(special_ids(model.tokenizer)))
    return acts[keep if mask is None else keep & mask.bool()]


def all_batches(store) -> list:
    return list(store)


def match(got: torch.Tensor, expected: torch.Tensor) -> None:
    """``got`` holds the rows of ``expected`` (within float tolerance), each as often, in any order."""
    assert got.shape == expected.shape
    if len(expected) == 0:
        return
    nearest = torch.cdist(got.double(), expected.double()).argmin(1)
    assert torch.allclose(got, expected[nearest], atol=1e-5, rtol=1e-5)
    same = torch.cdist(expected.double(), expected.double()).argmin(1)  # one representative per set of equal rows
    assert sorted(same[nearest].tolist()) == sorted(same.tolist())


# ------------------------------------------------------------------ the activations
@CHECK
@given(
    hook=st.sampled_from(HOOKS),
    context=st.integers(2, 12),
    n=st.integers(1, 6),
    forward_rows=st.integers(1, 4),
    buffer_batches=st.integers(1, 5),
)
def test_activations_are_those_of_run_with_cache_at_the_kept_positions(
    gpt2, hook, context, n, forward_rows, buffer_batches
):
    tokens = random_tokens(n, context)
    source = token_source(tokens, seq_len=context, cycle=False)
    store = ActivationStore(
        gpt2, hook, source, batch_tokens=1, context=context, buffer_batches=buffer_batches, forward_rows=forward_rows
    )
    batches = all_batches(store)
    expected = expected_rows(gpt2, tokens, hook)
    got = torch.cat(batches) if batches else expected[:0]
    match(got, expected)


@pytest.mark.parametrize("layer", [0, 1])
def test_the_forward_pass_stops_after_the_hooked_layer(gpt2, layer):
    fired = []
    watched = [f"blocks.{i}.hook_resid_post" for i in range(2)] + ["ln_final.hook_scale"]
    handles = [gpt2.add_hook(name, lambda act, hook: fired.append(hook.name)) for name in watched]
    try:
        store = ActivationStore(gpt2, f"blocks.{layer}.hook_mlp_out", random_tokens(4, 8), batch_tokens=8, context=8)
        store.next_batch()
    finally:
        gpt2.reset_hooks()
    assert handles and set(fired) == {f"blocks.{i}.hook_resid_post" for i in range(layer + 1)}


def test_hooks_after_the_last_block_run_ln_final_but_never_the_unembedding(gpt2, monkeypatch):
    tokens = random_tokens(3, 8, seed=7)
    expected = [expected_rows(gpt2, tokens, hook) for hook in ("ln_final.hook_scale", "ln_final.hook_normalized")]

    def refuse(*args, **kwargs):
        raise AssertionError("the unembedding ran: the store computed logits it throws away")

    monkeypatch.setattr(gpt2.unembed, "forward", refuse)
    store = ActivationStore(
        gpt2,
        "ln_final.hook_scale",
        token_source(tokens, seq_len=8, cycle=False),
        batch_tokens=1,
        context=8,
        buffer_batches=100,
        output_hook_name="ln_final.hook_normalized",
    )
    scale, normalized = (torch.cat(part) for part in zip(*all_batches(store), strict=True))
    index = torch.cdist(normalized, expected[1]).argmin(1)
    assert torch.allclose(normalized, expected[1][index], atol=1e-5)
    assert torch.allclose(scale, expected[0][index], atol=1e-5)


def test_padding_and_bos_positions_are_dropped(gpt2):
    tokens = random_tokens(5, 10, seed=3)
    mask = torch.ones_like(tokens)
    for row, pad in enumerate([0, 3, 1, 6, 2]):  # left padding, as a batch of prompts has
        mask[row, :pad] = 0
        tokens[row, :pad] = 7  # an ordinary token id: only the mask says it is padding
    rows = iter(zip(tokens, mask, strict=True))
    store = ActivationStore(gpt2, "blocks.1.hook_resid_post", rows, batch_tokens=1, context=10, buffer_batches=100)
    match(torch.cat(all_batches(store)), expected_rows(gpt2, tokens, "blocks.1.hook_resid_post", mask))


def test_drop_tokens_chooses_what_is_dropped(gpt2):
    tokens = random_tokens(3, 8)
    store = ActivationStore(
        gpt2,
        "blocks.0.hook_resid_post",
        token_source(tokens, seq_len=8, cycle=False),
        batch_tokens=1,
        context=8,
        buffer_batches=100,
        drop_tokens=[],
    )
    _, cache = gpt2.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    match(torch.cat(all_batches(store)), cache["blocks.0.hook_resid_post"].flatten(0, 1))


def test_transcoder_pairs_come_from_the_same_position(gpt2):
    tokens = random_tokens(4, 9, seed=5)
    store = ActivationStore(
        gpt2,
        "blocks.0.hook_resid_mid",
        token_source(tokens, seq_len=9, cycle=False),
        batch_tokens=4,
        context=9,
        buffer_batches=2,
        output_hook_name="blocks.1.hook_mlp_out",
    )
    pairs = all_batches(store)
    x, y = (torch.cat(part) for part in zip(*pairs, strict=True))
    x_all = expected_rows(gpt2, tokens, "blocks.0.hook_resid_mid")
    y_all = expected_rows(gpt2, tokens, "blocks.1.hook_mlp_out")
    assert len(x) == len(x_all) // 4 * 4  # whole batches only
    index = torch.cdist(x, x_all).argmin(1)
    assert torch.allclose(x, x_all[index], atol=1e-5) and torch.allclose(y, y_all[index], atol=1e-5)


def test_text_specs_are_tokenised_with_the_models_tokenizer(gpt2, tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("When Mary and John went to the park\nJohn gave a book to Mary.\n")
    by_spec = ActivationStore(gpt2, "blocks.0.hook_resid_post", path, batch_tokens=8, context=6)
    source = token_source(path, tokenizer=gpt2.tokenizer, seq_len=6)
    by_source = ActivationStore(gpt2, "blocks.0.hook_resid_post", source, batch_tokens=8, context=6)
    assert all(torch.equal(by_spec.next_batch(), by_source.next_batch()) for _ in range(20))


@CHECK
@given(n=st.integers(1, 8), batch_tokens=st.integers(1, 9), buffer_batches=st.integers(1, 4))
def test_a_finite_source_gives_every_whole_batch_then_stops(gpt2, n, batch_tokens, buffer_batches):
    tokens = random_tokens(n, 7, seed=n)
    store = ActivationStore(
        gpt2,
        "blocks.0.hook_resid_post",
        token_source(tokens, seq_len=7, cycle=False),
        batch_tokens=batch_tokens,
        context=7,
        buffer_batches=buffer_batches,
    )
    batches = all_batches(store)
    assert len(batches) == len(expected_rows(gpt2, tokens, "blocks.0.hook_resid_post")) // batch_tokens
    assert all(b.shape == (batch_tokens, 32) for b in batches)
    with pytest.raises(StopIteration):
        store.next_batch()


# ------------------------------------------------------------------ shuffling and memory
def test_the_same_seed_gives_the_same_batches_and_another_seed_reorders_them(gpt2):
    def batches(seed):
        source = token_source(random_tokens(12, 8), seq_len=8)
        store = ActivationStore(
            gpt2, "blocks.1.hook_resid_post", source, batch_tokens=10, context=8, buffer_batches=4, seed=seed
        )
        return [store.next_batch() for _ in range(8)]

    first, again, other = batches(0), batches(0), batches(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(first), torch.cat(other))
    match(torch.cat(other[:4]), torch.cat(first[:4]))  # one buffer: the same rows in another order


def test_the_default_buffer_mixes_many_contexts_even_when_one_context_fills_batches():
    """Row r is all token r, so hook_embed's activation names the row; a batch of 256 at context 1024 must mix rows."""
    model = Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=600, n_ctx=1024, seed=0)).eval()
    n_rows = 2 * MIN_BUFFER_SEQUENCES
    tokens = torch.arange(n_rows)[:, None].repeat(1, 1024)
    store = ActivationStore(model, "hook_embed", token_source(tokens, seq_len=1024), batch_tokens=256, context=1024)
    assert store.buffer_rows >= MIN_BUFFER_SEQUENCES * 1024
    rows = torch.cdist(store.next_batch(), model.W_E.detach()).argmin(1)
    # drawing 256 positions from 256 contexts of 1024 hits about 256 (1 - 1/e) ~ 162 of them; 8 batches of
    # buffer (the old default) held 2 contexts
    assert len(rows.unique()) > MIN_BUFFER_SEQUENCES // 4


def test_memory_never_holds_more_than_the_buffer(gpt2, monkeypatch):
    reads, forwards = [], []
    read, run_with_cache = ModelStream.read, gpt2.run_with_cache

    def spy_read(self, n):
        out = read(self, n)
        reads.append(len(out[0]))
        return out

    def spy_forward(tokens, **kwargs):
        forwards.append(len(tokens))
        return run_with_cache(tokens, **kwargs)

    monkeypatch.setattr(ModelStream, "read", spy_read)
    monkeypatch.setattr(gpt2, "run_with_cache", spy_forward)
    store = ActivationStore(
        gpt2,
        "blocks.0.hook_resid_post",
        random_tokens(30, 16),
        batch_tokens=12,
        context=16,
        buffer_batches=3,
        forward_rows=2,
    )
    for _ in range(20):
        store.next_batch()
        assert sum(len(b) for b in store._buffer) <= 3 * 12
    assert reads and max(reads) == 3 * 12 and max(forwards) <= 2


# ------------------------------------------------------------------ resuming
def make_store(gpt2, kind: str, tmp: Path, seed: int = 0) -> ActivationStore:
    tokens = random_tokens(9, 8, seed=11)
    hook, options = "blocks.1.hook_resid_post", dict(batch_tokens=7, context=8, buffer_batches=3, seed=seed)
    if kind == "source":
        return ActivationStore(gpt2, hook, token_source(tokens, seq_len=8), **options)
    if kind == "iterator":  # a plain generator: resumed by skipping the rows already read
        return ActivationStore(gpt2, hook, (tokens[i % 9] for i in range(10**6)), **options)
    if kind == "text":
        path = tmp / "docs.txt"
        path.write_text("When Mary and John went to the park\nJohn gave a book to Mary.\nThe bag\n")
        return ActivationStore(gpt2, hook, path, forward_rows=3, **options)
    return ActivationStore(
        gpt2, hook, token_source(tokens, seq_len=8), cache_dir=tmp / "cache", cache_tokens=50, shard_tokens=9, **options
    )


@CHECK
@given(kind=st.sampled_from(["source", "iterator", "text", "cache"]), k=st.integers(0, 10))
def test_resuming_mid_stream_gives_exactly_the_uninterrupted_batches(gpt2, kind, k):
    with TemporaryDirectory() as tmp:
        store = make_store(gpt2, kind, Path(tmp))
        uninterrupted = [store.next_batch() for _ in range(k + 8)]
        saved = make_store(gpt2, kind, Path(tmp))
        for _ in range(k):
            saved.next_batch()
        state_file = Path(tmp) / "state.safetensors"
        save_file(saved.state_dict(), state_file)  # a flat dict of tensors: fits a checkpoint
        resumed = make_store(gpt2, kind, Path(tmp))
        resumed.load_state_dict(load_file(state_file))
        assert all(torch.equal(resumed.next_batch(), b) for b in uninterrupted[k:])


# ------------------------------------------------------------------ the disk cache
def test_the_cache_holds_the_stream_in_order_and_a_second_store_reads_it(gpt2_dir, tmp_path):
    model = Model.from_pretrained(gpt2_dir)
    tokens = random_tokens(10, 8, seed=2)
    options = dict(batch_tokens=5, context=8, buffer_batches=4, cache_dir=tmp_path, shard_tokens=7)
    writer = ActivationStore(
        model, "blocks.0.hook_mlp_out", token_source(tokens, seq_len=8), cache_tokens=40, **options
    )
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [7] * 5 + [5]
    shards = torch.cat([load_file(tmp_path / s["file"])["x"] for s in manifest["shards"]])
    stream = expected_rows(model, tokens, "blocks.0.hook_mlp_out")
    assert torch.allclose(shards, torch.cat([stream, stream])[:40], atol=1e-6)  # in stream order; the source cycles

    (tmp_path / ".shard_00006.safetensors.tmp").write_bytes(b"half a shard")  # a write killed before its rename

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran although the cache is complete")

    model.forward = refuse
    reader = ActivationStore(model, "blocks.0.hook_mlp_out", None, **options)
    written = [writer.next_batch() for _ in range(20)]  # 100 rows: the 40 cached ones, over and over
    read = [reader.next_batch() for _ in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(written, read, strict=True))
    match(torch.cat(read[:8]), shards)  # the first epoch: every cached row once


@pytest.mark.bad_input
def test_a_cache_of_another_model_context_or_source_is_refused_by_name(gpt2, gpt2_dir, tmp_path):
    tokens = random_tokens(6, 8, seed=9)
    hook, options = "blocks.0.hook_resid_post", dict(batch_tokens=4, buffer_batches=2, cache_dir=tmp_path)
    ActivationStore(gpt2, hook, token_source(tokens, seq_len=8), context=8, cache_tokens=16, **options)
    other = Model.from_pretrained(gpt2_dir)
    with torch.no_grad():
        other.blocks[0].mlp.W_in.mul_(2)  # the same config, other weights
    with pytest.raises(SAEError, match=r"written for other data \(fingerprint.model_sha256: '\w+' in the cache"):
        ActivationStore(other, hook, None, context=8, **options)
    with pytest.raises(SAEError, match="context: 8 in the cache, 4 now"):
        ActivationStore(gpt2, hook, None, context=4, **options)
    text = tmp_path / "docs.txt"
    text.write_text("Mary went to the park\n")
    with pytest.raises(SAEError, match=f"source: None in the cache, {str(text.resolve())!r} now"):
        ActivationStore(gpt2, hook, text, context=8, **options)
    assert ActivationStore(gpt2, hook, None, context=8, **options).next_batch().shape == (4, 32)


def test_a_cache_without_its_manifest_is_written_again(gpt2, tmp_path):
    save_file({"x": torch.zeros(6, 32)}, tmp_path / "shard_00000.safetensors")  # left by a killed run
    tokens = random_tokens(4, 8, seed=4)
    store = ActivationStore(
        gpt2,
        "blocks.1.hook_resid_post",
        token_source(tokens, seq_len=8),
        batch_tokens=6,
        context=8,
        cache_dir=tmp_path,
        cache_tokens=12,
        shard_tokens=6,
    )
    assert torch.allclose(
        load_file(tmp_path / "shard_00000.safetensors")["x"],
        expected_rows(gpt2, tokens, "blocks.1.hook_resid_post")[:6],
        atol=1e-6,
    )
    assert store.next_batch().abs().sum() > 0


# ------------------------------------------------------------------ bad input
@pytest.mark.bad_input
def test_bad_arguments_are_refused_by_name(gpt2, tmp_path):
    tokens = random_tokens(3, 8)
    base = dict(batch_tokens=4, context=8)
    cases = [
        (("blocks.1.hook_resid_pots",), {}, "closest valid names: blocks.1.hook_resid_post"),
        (("blocks.0.attn.hook_pattern",), {}, "query and key positions"),
        (("blocks.0.hook_resid_post",), dict(batch_tokens=0), "batch_tokens must be at least 1"),
        (("blocks.0.hook_resid_post",), dict(buffer_batches=0), "buffer_batches must be at least 1"),
        (("blocks.0.hook_resid_post",), dict(context=65), "n_ctx=64"),
        (("blocks.0.hook_resid_post",), dict(forward_rows=0), "forward_rows must be at least 1"),
        (("blocks.0.hook_resid_post",), dict(cache_dir=tmp_path), "cache_tokens"),
        (
            ("blocks.0.hook_resid_post",),
            dict(cache_dir=tmp_path, cache_tokens=8, shard_tokens=33, buffer_batches=8),
            "shard_tokens",
        ),
    ]
    for (hook,), kwargs, message in cases:
        with pytest.raises(SAEError, match=message):
            ActivationStore(gpt2, hook, token_source(tokens, seq_len=8), **{**base, **kwargs})
    with pytest.raises(SAEError, match="tokens is None"):
        ActivationStore(gpt2, "blocks.0.hook_resid_post", None, **base)
    with pytest.raises(SAEError, match=r"token rows must have shape \[8\]"):
        ActivationStore(gpt2, "blocks.0.hook_resid_post", iter(tokens[:, :5]), **base).next_batch()
    ActivationStore(
        gpt2, "blocks.0.hook_resid_post", token_source(tokens, seq_len=8), cache_dir=tmp_path, cache_tokens=8, **base
    )
    with pytest.raises(SAEError, match="caches"):
        ActivationStore(gpt2, "blocks.1.hook_resid_post", None, cache_dir=tmp_path, **base)
    cached = ActivationStore(gpt2, "blocks.0.hook_resid_post", None, cache_dir=tmp_path, **base)
    live = ActivationStore(gpt2, "blocks.0.hook_resid_post", token_source(tokens, seq_len=8), **base)
    with pytest.raises(SAEError, match="give cache_dir the same way"):
        live.load_state_dict(cached.state_dict())
