"""Data-parallel SAE training: 2 gloo processes under torchrun equal one process on the global batch.

The module is also the torchrun worker (``python -m torch.distributed.run ... -m tests.sae.test_distributed
OUT``): the ``two_ranks`` fixture launches it once, and the tests compare what the ranks wrote with
a single process doing the same work here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mechscope.model import ModelConfig, Transformer
from mechscope.sae import SAE, SAEConfig, SAEError, build_sae
from mechscope.sae import distributed as dd
from mechscope.sae.activations import ActivationStore
from mechscope.sae.token_sources import token_source
from mechscope.sae.training import TrainSAEConfig, train_sae
from mechscope.toys import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
GLOBAL_BATCH = 64
FEATURES = torch.randn(24, 8, generator=torch.Generator().manual_seed(3))
TOKENS = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(5))  # 16 rows of context 8
HOOK = "blocks.0.hook_resid_post"
RELATIVE_TOLERANCE = 1e-5  # the ranks' gradient mean sums in another order than one process's batch mean


def global_batch(step: int) -> torch.Tensor:
    """Step ``step``'s global batch: 64 sparse combinations of 24 fixed directions."""
    generator = torch.Generator().manual_seed(step)
    codes = (torch.rand(GLOBAL_BATCH, 24, generator=generator) < 0.15) * torch.rand(
        GLOBAL_BATCH, 24, generator=generator
    )
    return codes @ FEATURES


def sae_config(architecture: str) -> SAEConfig:
    extra = {"k": 3} if architecture == "topk" else {"l1_coefficient": 0.3}
    return SAEConfig(8, 32, architecture, HOOK, 0, **extra)


def train_config(**fields) -> TrainSAEConfig:
    """A run that uses every distributed path: warmup and decay, clipping, AuxK on dead latents, logging."""
    base = dict(
        total_tokens=GLOBAL_BATCH * 30,
        batch_tokens=GLOBAL_BATCH,
        lr=3e-3,
        lr_warmup_steps=4,
        lr_decay="cosine",
        lr_decay_steps=10,
        sparsity_warmup_steps=5,
        clip_grad_norm=0.5,
        dead_after_tokens=GLOBAL_BATCH * 3,
        log_every=5,
        checkpoint_every=10,
    )
    return TrainSAEConfig(**{**base, **fields})


def tiny_model() -> Transformer:
    return Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, d_vocab=50, n_ctx=16, seed=0))


def drain(store: ActivationStore) -> torch.Tensor:
    """Every batch a store hands out until its finite token source ends."""
    batches = []
    while True:
        try:
            batches.append(store.next_batch())
        except StopIteration:
            return torch.cat(batches)


def harvest_config() -> dict:
    """Each token row through the model alone, so a row's activations do not depend on its neighbours."""
    return dict(batch_tokens=32, context=8, buffer_batches=2, forward_rows=1)


def uneven_rows() -> torch.Tensor:
    """TOKENS with 4 positions of every odd row (rank 1's share) dropped: rank 1 runs out of activations first."""
    tokens = TOKENS.clamp(min=1)  # 0 is the dropped token
    tokens[1::2, 4:] = 0
    return tokens


def exhausted_run(out: Path) -> str:
    """Train on a finite store until it runs out; the error this rank stops with."""
    source = token_source(uneven_rows(), seq_len=8, cycle=False)
    store = dd.rank_store(tiny_model(), HOOK, source, batch_tokens=32, context=8, buffer_batches=1, drop_tokens=[0])
    sae = build_sae(SAEConfig(16, 32, "topk", HOOK, 0, k=4), seed=2)
    try:
        train_sae(sae, store, TrainSAEConfig(total_tokens=32 * 20, batch_tokens=32), out, progress=False)
    except SAEError as error:
        return str(error)
    return "finished"


def store_run(out: Path, until: int | None = None, resume: bool = False) -> SAE:
    """A TopK SAE trained from this rank's activation store, paused at ``until`` or resumed."""
    model = tiny_model()
    store = dd.rank_store(model, HOOK, TOKENS, batch_tokens=32, context=8, buffer_batches=2, seed=1)
    sae = build_sae(SAEConfig(16, 32, "topk", HOOK, 0, k=4), seed=2)
    config = TrainSAEConfig(total_tokens=32 * 12, batch_tokens=32, lr=3e-3, log_every=2, checkpoint_every=4)
    return train_sae(sae, store, config, out, resume=resume, until=until, progress=False)


# ------------------------------------------------------------------ the worker (one per rank)
def worker(out: Path) -> None:
    """What each rank does under torchrun: train, harvest, pause and resume; files go to ``out``."""
    torch.set_num_threads(1)
    dd.init_distributed()
    rank, world = dd.rank(), dd.world_size()
    for architecture in ("topk", "relu"):
        share = lambda step: global_batch(step).chunk(world)[rank]  # noqa: E731
        sae = build_sae(sae_config(architecture), seed=4)
        sae = train_sae(sae, share, train_config(), out / architecture, progress=False)
        save_file(sae.state_dict(), str(out / f"{architecture}_rank{rank}.safetensors"))
    source = token_source(TOKENS, seq_len=8, cycle=False)
    rows = drain(dd.rank_store(tiny_model(), HOOK, source, **harvest_config()))
    save_file({"rows": rows}, str(out / f"harvest_rank{rank}.safetensors"))
    store_run(out / "whole")
    store_run(out / "paused", until=5)  # mid-buffer: each rank's store is part-way through its shuffle buffer
    store_run(out / "paused", resume=True)
    (out / f"exhausted_rank{rank}.txt").write_text(exhausted_run(out / "exhausted"))
    dd.close_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run the worker on 2 gloo processes with torchrun (on a free port); its output folder."""
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    result = subprocess.run(
        [*command, "-m", "tests.sae.test_distributed", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


# ------------------------------------------------------------------ 2 processes against one
@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_two_ranks_train_the_sae_one_process_trains_on_the_global_batch(two_ranks, tmp_path, architecture):
    single = train_sae(
        build_sae(sae_config(architecture), seed=4), global_batch, train_config(), tmp_path, progress=False
    )
    ranks = [load_file(str(two_ranks / f"{architecture}_rank{r}.safetensors")) for r in range(WORLD)]
    saved = SAE.load(two_ranks / architecture)
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name])  # the replicas never drift apart
        torch.testing.assert_close(saved.state_dict()[name], ranks[0][name])
        scale = value.abs().max().item()
        torch.testing.assert_close(ranks[0][name], value, rtol=RELATIVE_TOLERANCE, atol=RELATIVE_TOLERANCE * scale)
    assert not torch.allclose(single.W_dec, build_sae(sae_config(architecture), seed=4).W_dec)  # it did train


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_rank_zero_logs_the_global_batch_metrics_once(two_ranks, tmp_path, architecture):
    train_sae(build_sae(sae_config(architecture), seed=4), global_batch, train_config(), tmp_path, progress=False)
    single, together = ckpt.read_metrics(tmp_path), ckpt.read_metrics(two_ranks / architecture)
    assert [r["step"] for r in together] == [r["step"] for r in single] == list(range(5, 31, 5))
    for mine, theirs in zip(together, single, strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert any(r["dead_frac"] > 0 and r["aux"] > 0 for r in single) or architecture == "relu"  # AuxK was exercised
    assert json.loads((two_ranks / architecture / ckpt.RUN_FILE).read_text())["steps_done"] == 30


def test_two_ranks_harvest_exactly_the_rows_of_one_store(two_ranks):
    source = token_source(TOKENS, seq_len=8, cycle=False)
    single = drain(ActivationStore(tiny_model(), HOOK, source, **harvest_config()))
    shares = [load_file(str(two_ranks / f"harvest_rank{r}.safetensors"))["rows"] for r in range(WORLD)]
    assert [len(s) for s in shares] == [len(single) // WORLD] * WORLD == [TOKENS.numel() // WORLD] * WORLD
    assert sorted(map(tuple, torch.cat(shares).tolist())) == sorted(map(tuple, single.tolist()))


def test_a_paused_two_rank_run_resumes_exactly(two_ranks):
    whole, resumed = SAE.load(two_ranks / "whole"), SAE.load(two_ranks / "paused")
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert ckpt.read_metrics(two_ranks / "paused") == ckpt.read_metrics(two_ranks / "whole")
    tensors, metadata = ckpt.read_tensors(two_ranks / "paused" / ckpt.CHECKPOINT_FILE)
    assert metadata["world_size"] == str(WORLD)
    keys = [{k.split("/", 2)[2] for k in tensors if k.startswith(f"store/rank{r}/")} for r in range(WORLD)]
    assert keys[0] and keys[0] == keys[1]  # each rank's own store position
    assert not any(k.startswith("store/") and not k.startswith("store/rank") for k in tensors)


def test_a_rank_that_runs_out_of_activations_stops_every_rank_with_the_same_error(two_ranks):
    kept = [int((uneven_rows()[r::WORLD] != 0).sum()) for r in range(WORLD)]  # the tiny model has no tokenizer
    first_out = min(n // (32 // WORLD) for n in kept)  # whole local batches of the rank with the fewest rows
    assert kept[1] < kept[0]
    errors = [(two_ranks / f"exhausted_rank{r}.txt").read_text() for r in range(WORLD)]
    assert errors[0] == errors[1]
    assert f"ran out of activations at step {first_out}" in errors[0]


@pytest.mark.bad_input
def test_a_two_rank_checkpoint_refuses_one_process(two_ranks, tmp_path):
    import shutil

    shutil.copytree(two_ranks / "paused", tmp_path / "run")
    with pytest.raises(SAEError, match="written by 2 process\\(es\\); resume it with world_size=2, not 1"):
        store_run(tmp_path / "run", resume=True)


# ------------------------------------------------------------------ pieces, in one process
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 30), world=st.integers(1, 4), cut=st.integers(0, 10))
def test_sharded_sources_interleave_to_the_whole_stream_and_resume(rows, world, cut):
    tokens = torch.arange(rows * 3).reshape(rows, 3)
    shares = [list(dd.ShardedSource(token_source(tokens, seq_len=3, cycle=False), r, world)) for r in range(world)]
    rounds = rows // world
    assert all(len(share) == rounds for share in shares)
    interleaved = [share[i] for i in range(rounds) for share in shares]
    assert torch.equal(torch.stack(interleaved) if interleaved else tokens[:0], tokens[: rounds * world])
    source = dd.ShardedSource(token_source(tokens, seq_len=3), world - 1, world)
    for _ in range(cut):
        next(source)
    again = dd.ShardedSource(token_source(tokens, seq_len=3), world - 1, world)
    again.load_state_dict(source.state_dict())
    assert torch.equal(next(again), next(source))


def test_one_process_is_a_world_of_one(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dd.init_distributed() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert (dd.rank(), dd.world_size(), dd.is_main()) == (0, 1, True)
    mask = torch.tensor([True, False])
    assert dd.any_rank(mask) is mask and dd.local_batch_tokens(64) == 64
    x = global_batch(0)
    torch.testing.assert_close(dd.global_sum_of_squares(x), ((x - x.mean(0)) ** 2).sum())
    store = dd.rank_store(tiny_model(), HOOK, TOKENS, batch_tokens=32, context=8, cache_dir=tmp_path, cache_tokens=64)
    assert (tmp_path / "cache.json").exists()  # one process caches in the folder itself
    assert store.next_batch().shape == (32, 16)


def test_a_rank_store_takes_its_share_of_the_batch_and_its_own_cache(tmp_path):
    tokens = token_source(TOKENS, seq_len=8, cycle=False)
    options = dict(batch_tokens=32, context=8, buffer_batches=2, forward_rows=1, rank_and_world=(1, WORLD))
    store = dd.rank_store(tiny_model(), HOOK, tokens, cache_dir=tmp_path, cache_tokens=TOKENS.numel(), **options)
    assert store.next_batch().shape == (16, 16)
    assert json.loads((tmp_path / "rank1-of-2" / "cache.json").read_text())["n_rows"] == TOKENS.numel() // WORLD
    assert (tmp_path / "rank1-of-2" / "cache.json").exists()
    odd_rows = token_source(TOKENS[1::2], seq_len=8, cycle=False)  # rank 1 of 2: rows 1, 3, 5, ...
    direct = drain(ActivationStore(tiny_model(), HOOK, odd_rows, batch_tokens=16, context=8, forward_rows=1))
    cached = torch.cat([load_file(str(p))["x"] for p in sorted((tmp_path / "rank1-of-2").glob("shard_*"))])
    assert sorted(map(tuple, cached.tolist())) == sorted(map(tuple, direct.tolist()))


def test_a_rank_store_over_a_plain_iterator_resumes_by_skipping_rows():
    def store() -> ActivationStore:
        rows = iter(list(TOKENS))  # no state_dict: cannot seek
        options = dict(batch_tokens=16, context=8, buffer_batches=1, rank_and_world=(1, 2))  # a buffer per row
        return dd.rank_store(tiny_model(), HOOK, rows, **options)

    first = store()
    for _ in range(3):
        first.next_batch()
    again = store()
    assert int(first.state_dict()["stream.rows_read"]) == 3  # rows the fresh store must skip
    again.load_state_dict(first.state_dict())
    assert torch.equal(again.next_batch(), first.next_batch())


@pytest.mark.bad_input
def test_a_batch_the_ranks_cannot_share_evenly_is_refused():
    with pytest.raises(SAEError, match="batch_tokens=63 must be divisible by the world size 2"):
        dd.local_batch_tokens(63, 2)


@pytest.mark.bad_input
@pytest.mark.parametrize("rank", [-1, 2])
def test_a_rank_outside_the_world_is_refused(rank):
    with pytest.raises(SAEError, match="rank must be in \\[0, world_size=2\\)"):
        dd.ShardedSource(iter([]), rank, 2)


@pytest.mark.bad_input
def test_a_world_without_torchrun_variables_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SAEError, match=r"WORLD_SIZE is set but RANK, .*MASTER_ADDR, MASTER_PORT is not"):
        dd.init_distributed()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
