"""SAE training: schedules, validation, dead-latent tracking, and runs that survive SIGKILL."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.model import ModelConfig, Transformer
from mechscope.sae import SAE, SAEConfig, SAEError, build_sae
from mechscope.sae.activations import ActivationStore
from mechscope.sae.token_sources import token_source
from mechscope.sae.training import (
    LatentTracker,
    TrainSAEConfig,
    remove_parallel_gradient,
    train_sae,
    training_step,
)
from mechscope.toys import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
FEATURES = torch.randn(24, 8, generator=torch.Generator().manual_seed(3))


def sae_config(architecture: str = "topk", **fields) -> SAEConfig:
    base = dict(d_in=8, d_sae=32, architecture=architecture, hook_name="blocks.0.hook_resid_post", hook_layer=0)
    if architecture in ("topk", "batchtopk"):
        base["k"] = 3
    return SAEConfig(**{**base, **fields})


def sparse_stream(step: int) -> torch.Tensor:
    """A batch of 32 sparse non-negative combinations of 24 fixed directions, a function of the step."""
    generator = torch.Generator().manual_seed(step)
    codes = (torch.rand(32, 24, generator=generator) < 0.1) * torch.rand(32, 24, generator=generator)
    return codes @ FEATURES


def config(**fields) -> TrainSAEConfig:
    base = dict(total_tokens=32 * 40, batch_tokens=32, lr=3e-3, log_every=5, checkpoint_every=10)
    return TrainSAEConfig(**{**base, **fields})


# ------------------------------------------------------------------ config
@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("total_tokens", 0, "total_tokens must be a positive integer"),
        ("batch_tokens", 2.5, "batch_tokens must be a positive integer"),
        ("batch_tokens", 10_000, "batch_tokens=10000 exceeds total_tokens"),
        ("lr", 0.0, "lr must be a positive number"),
        ("lr_warmup_steps", -1, "lr_warmup_steps must be a non-negative integer"),
        ("lr_decay", "exponential", "lr_decay must be one of"),
        ("lr_decay_steps", 50, "lr_warmup_steps \\+ lr_decay_steps = 50 exceeds the run's 40 steps"),
        ("lr_end_fraction", 1.5, "lr_end_fraction must be a number in \\[0, 1\\]"),
        ("betas", (0.9,), "betas must be two numbers in"),
        ("betas", (0.9, 1.0), "betas must be two numbers in \\[0, 1\\)"),
        ("sparsity_warmup_steps", True, "sparsity_warmup_steps must be a non-negative integer"),
        ("clip_grad_norm", -1.0, "clip_grad_norm must be a positive number or None"),
        ("dead_after_tokens", 0, "dead_after_tokens must be a positive integer"),
        ("dense_threshold", 0.0, "dense_threshold must be a number in \\(0, 1\\]"),
        ("log_every", 0, "log_every must be a positive integer"),
        ("checkpoint_every", None, "checkpoint_every must be a positive integer"),
        ("autocast", "yes", "autocast must be True or False"),
    ],
)
def test_bad_settings_are_refused_by_name(field, value, message):
    with pytest.raises(SAEError, match=f"TrainSAEConfig.{message}"):
        config(**{field: value})


@pytest.mark.bad_input
def test_a_decay_needs_its_steps():
    with pytest.raises(SAEError, match="lr_decay_steps must be at least 1 with lr_decay='cosine'"):
        config(lr_decay="cosine")


@settings(max_examples=15, deadline=None)
@given(
    steps=st.integers(2, 200),
    warmup=st.integers(0, 50),
    decay=st.integers(1, 50),
    kind=st.sampled_from(["linear", "cosine"]),
    end=st.floats(0, 1),
)
def test_lr_warms_up_holds_then_decays_over_the_last_steps(steps, warmup, decay, kind, end):
    if warmup + decay > steps:
        warmup, decay = 0, steps
    cfg = TrainSAEConfig(
        total_tokens=steps,
        batch_tokens=1,
        lr_warmup_steps=warmup,
        lr_decay=kind,
        lr_decay_steps=decay,
        lr_end_fraction=end,
    )
    factors = [cfg.lr_factor(s) for s in range(steps)]
    assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert factors[warmup : steps - decay] == [1.0] * (steps - warmup - decay)
    tail = factors[steps - decay :]
    assert tail[0] == pytest.approx(1.0)  # the decay starts from the full rate
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(tail))
    assert all(end - 1e-12 <= f <= 1 + 1e-12 for f in tail)
    if kind == "linear":
        assert tail[-1] == pytest.approx(end + (1 - end) / decay)


@settings(max_examples=15, deadline=None)
@given(warmup=st.integers(1, 30), step=st.integers(0, 60))
def test_sparsity_coefficient_ramps_from_zero(warmup, step):
    cfg = config(sparsity_warmup_steps=warmup)
    assert cfg.sparsity_scale(step) == (step / warmup if step < warmup else 1.0)
    assert config().sparsity_scale(step) == 1.0


@settings(max_examples=15, deadline=None)
@given(warmup=st.integers(1, 20), step=st.integers(0, 30))
def test_a_warming_sparsity_term_acts_as_a_scaled_coefficient(warmup, step):
    """With plain SGD the update is the gradient: warmup at ``step`` equals the coefficient times its scale."""
    x = sparse_stream(step)
    warm, cold = build_sae(sae_config("relu", l1_coefficient=0.5)), build_sae(sae_config("relu", l1_coefficient=0.5))
    cold.cfg.l1_coefficient = 0.5 * config(sparsity_warmup_steps=warmup).sparsity_scale(step)
    for sae, cfg in (
        (warm, config(sparsity_warmup_steps=warmup, clip_grad_norm=None)),
        (cold, config(clip_grad_norm=None)),
    ):
        training_step(sae, torch.optim.SGD(sae.parameters(), lr=0.1), cfg, step, x, None, torch.zeros(32, dtype=bool))
    for name, value in warm.state_dict().items():
        torch.testing.assert_close(value, cold.state_dict()[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the loop
def test_training_reduces_the_loss_logs_and_saves_in_saelens_format(tmp_path):
    sae = train_sae(build_sae(sae_config()), sparse_stream, config(log_every=1), tmp_path, progress=False)
    logged = ckpt.read_metrics(tmp_path)
    assert [r["step"] for r in logged] == list(range(1, 41))
    assert [r["tokens"] for r in logged] == [32 * r["step"] for r in logged]
    assert [r["lr"] for r in logged] == [3e-3] * len(logged)
    assert logged[-1]["mse"] < 0.5 * logged[0]["mse"] and logged[-1]["fvu"] < logged[0]["fvu"]
    assert all(r["l0"] <= 3 and 0 <= r["dead_frac"] <= 1 and 0 <= r["dense_frac"] <= 1 for r in logged)
    saved = SAE.load(tmp_path)
    assert saved.cfg.to_dict() == sae.cfg.to_dict()
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in saved.state_dict().items())
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))  # topk decoders stay unit-norm


def test_logged_fvu_is_the_batch_mse_over_its_variance(tmp_path):
    seen = {}

    def record(step, sae, entry):
        seen[step] = entry

    train_sae(
        build_sae(sae_config("relu")), sparse_stream, config(log_every=10), tmp_path, progress=False, callbacks=[record]
    )
    for step, entry in seen.items():
        x = sparse_stream(step - 1)
        assert entry["fvu"] == pytest.approx(entry["mse"] * len(x) / (x - x.mean(0)).pow(2).sum().item(), rel=1e-5)
    assert sorted(seen) == [10, 20, 30, 40]


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), seed=st.integers(0, 1000))
def test_the_decoder_gradient_loses_only_its_component_along_each_row(rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(rows, cols, generator=generator))
    W.grad = torch.randn(rows, cols, generator=generator)
    before = W.grad.clone()
    remove_parallel_gradient(W)
    unit = W / W.norm(dim=-1, keepdim=True)
    torch.testing.assert_close((W.grad * unit).sum(-1), torch.zeros(rows), atol=1e-5, rtol=0)
    along = (before * unit).sum(-1, keepdim=True) * unit
    torch.testing.assert_close(W.grad + along, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "relu"])
def test_a_step_projects_the_decoder_gradient_then_renormalises(architecture):
    """With SGD the update is explicit: W ← unit_rows(W - lr (g - (g·w)w)) for unit-norm decoders, W - lr g for ReLU."""
    sae, x = build_sae(sae_config(architecture)), sparse_stream(0)
    reference = copy.deepcopy(sae)
    dead = torch.zeros(32, dtype=bool)
    reference.losses(x, dead_mask=dead).total.backward()
    W, g = reference.W_dec.detach(), reference.W_dec.grad
    cfg = config(clip_grad_norm=None, lr=0.1)  # training_step sets the optimiser's rate from the config
    training_step(sae, torch.optim.SGD(sae.parameters(), lr=1.0), cfg, 0, x, None, dead)
    if architecture == "relu":
        expected = W - 0.1 * g
    else:
        moved = W - 0.1 * (g - (g * W).sum(-1, keepdim=True) * W)
        expected = moved / moved.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu", "batchtopk"])
def test_autocast_trains_in_bfloat16_on_cpu_too(tmp_path, architecture):
    """bf16 matmuls change the weights a little (so autocast is on) and the fit hardly at all."""
    a = train_sae(build_sae(sae_config(architecture)), sparse_stream, config(), tmp_path / "a", progress=False)
    b = train_sae(
        build_sae(sae_config(architecture)), sparse_stream, config(autocast=True), tmp_path / "b", progress=False
    )
    assert b.W_dec.dtype == torch.float32
    assert not all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    fvu_a, fvu_b = (ckpt.read_metrics(tmp_path / run)[-1]["fvu"] for run in "ab")
    assert abs(fvu_a - fvu_b) < 0.05 * fvu_a


# ------------------------------------------------------------------ activation normalisation
def test_normalised_training_is_training_on_scaled_activations_folded_at_the_end(tmp_path):
    """expected_average_only_in equals a plain run on f·x (f = sqrt(d_in) / the first batch's mean norm), folded."""

    def loud(step):
        return 40.0 * sparse_stream(step)

    normalised = sae_config(normalize_activations="expected_average_only_in")
    a = train_sae(build_sae(normalised), loud, config(), tmp_path / "a", progress=False)
    factor = json.loads((tmp_path / "a" / ckpt.RUN_FILE).read_text())["norm_scaling_factor"]
    torch.testing.assert_close(torch.tensor(factor), 8**0.5 / loud(0).norm(dim=-1).mean(), rtol=1e-6, atol=0)
    b = train_sae(build_sae(sae_config()), lambda step: loud(step) * factor, config(), tmp_path / "b", progress=False)
    x = loud(123)
    torch.testing.assert_close(a(x), b(x * factor) / factor, rtol=1e-4, atol=1e-4)
    assert a.cfg.normalize_activations == "none"
    saved = SAE.load(tmp_path / "a")
    assert saved.cfg.normalize_activations == "none"
    torch.testing.assert_close(saved(x), a(x))


def test_a_normalised_run_resumes_with_its_factor(tmp_path):
    """The factor is checkpointed: re-measuring it on the resumed run's first batch would change every weight."""
    normalised = sae_config(normalize_activations="expected_average_only_in")
    batches = [(1.0 + s) * sparse_stream(s) for s in range(40)]  # each batch louder than the last
    whole = train_sae(build_sae(normalised), batches, config(), tmp_path / "whole", progress=False)
    train_sae(build_sae(normalised), batches, config(), tmp_path / "paused", until=13, progress=False)
    resumed = train_sae(build_sae(normalised), batches, config(), tmp_path / "paused", resume=True, progress=False)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())


# ------------------------------------------------------------------ dead latents
def test_the_tracker_counts_tokens_since_each_latent_fired():
    tracker = LatentTracker.fresh(3, dead_after_tokens=5, device=torch.device("cpu"))
    for fired, n in (([1, 0, 0], 2), ([0, 0, 0], 3), ([1, 1, 0], 4)):
        tracker.update(torch.tensor(fired, dtype=bool), n)
    assert tracker.tokens_since_fired.tolist() == [0, 0, 9]
    assert tracker.dead_mask().tolist() == [False, False, True]


def test_dead_latents_are_tracked_through_training(tmp_path):
    """Hand-built batches fire known latents of an identity TopK SAE; the dead masks AuxK sees follow."""
    d, batch = 4, 2
    sae = build_sae(sae_config(d_in=d, d_sae=d, k=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d)), sae.W_dec.copy_(torch.eye(d))
    schedule = [[0, 1], [0, 0], [0, 2], [0, 0], [3, 0], [0, 0]]  # the latent each example fires
    batches = [torch.eye(d)[ids] for ids in schedule]
    masks = []
    losses = sae.losses

    def spy(x, target=None, *, dead_mask=None):
        masks.append(dead_mask.clone())
        return losses(x, target, dead_mask=dead_mask)

    sae.losses = spy
    cfg = config(total_tokens=batch * len(schedule), batch_tokens=batch, lr=1e-9, log_every=1, dead_after_tokens=4)
    train_sae(sae, batches, cfg, tmp_path, progress=False)

    last_fired, expected_masks, expected_dead = [None] * d, [], []
    for step, ids in enumerate(schedule):
        since = [batch * (step - t) if t is not None else batch * step for t in last_fired]
        expected_masks.append([s >= 4 for s in since])
        for i in ids:
            last_fired[i] = step + 1
        since = [batch * (step + 1 - t) if t is not None else batch * (step + 1) for t in last_fired]
        expected_dead.append(sum(s >= 4 for s in since) / d)
    assert [m.tolist() for m in masks] == expected_masks
    assert [r["dead_frac"] for r in ckpt.read_metrics(tmp_path)] == expected_dead
    tensors, _ = ckpt.read_tensors(tmp_path / ckpt.CHECKPOINT_FILE)
    assert tensors["latents/tokens_since_fired"].tolist() == since


# ------------------------------------------------------------------ runs on disk
def test_a_paused_run_resumes_to_the_same_weights_and_metrics(tmp_path):
    batches = [sparse_stream(s) for s in range(40)]  # a plain iterable: fast-forwarded on resume
    whole = train_sae(
        build_sae(sae_config()), batches, config(dead_after_tokens=64), tmp_path / "whole", progress=False
    )
    train_sae(
        build_sae(sae_config()), batches, config(dead_after_tokens=64), tmp_path / "paused", until=13, progress=False
    )
    assert not (tmp_path / "paused" / "sae_weights.safetensors").exists()
    resumed = train_sae(
        build_sae(sae_config()), batches, config(dead_after_tokens=64), tmp_path / "paused", resume=True, progress=False
    )
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())
    assert ckpt.read_metrics(tmp_path / "paused") == ckpt.read_metrics(tmp_path / "whole")


def test_an_existing_run_is_never_overwritten_and_other_settings_are_named(tmp_path):
    train_sae(build_sae(sae_config()), sparse_stream, config(), tmp_path, until=3, progress=False)
    with pytest.raises(FileExistsError, match=r"already holds a run.*resume=True"):
        train_sae(build_sae(sae_config()), sparse_stream, config(), tmp_path, progress=False)
    with pytest.raises(SAEError, match=r"train\.lr: 0\.003 in the folder, 0\.001 now"):
        train_sae(build_sae(sae_config()), sparse_stream, config(lr=1e-3), tmp_path, resume=True, progress=False)
    with pytest.raises(SAEError, match=r"sae\.k: 3 in the folder, 4 now"):
        train_sae(build_sae(sae_config(k=4)), sparse_stream, config(), tmp_path, resume=True, progress=False)


@pytest.mark.bad_input
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_are_refused_with_the_alternative(tmp_path, dtype):
    with pytest.raises(SAEError, match=f"got {dtype}.*autocast=True"):
        train_sae(build_sae(sae_config(dtype=dtype)), sparse_stream, config(), tmp_path, progress=False)
    assert not tmp_path.joinpath(ckpt.RUN_FILE).exists()


@pytest.mark.bad_input
def test_bad_sources_are_named(tmp_path):
    with pytest.raises(SAEError, match=r"batch 0 must be \[batch_tokens=32, d_in\], got \(16, 8\)"):
        train_sae(build_sae(sae_config()), lambda step: torch.zeros(16, 8), config(), tmp_path / "a", progress=False)
    with pytest.raises(SAEError, match="ran out of batches at step 2"):
        train_sae(build_sae(sae_config()), [torch.zeros(32, 8)] * 2, config(), tmp_path / "b", progress=False)
    with pytest.raises(SAEError, match="store_or_batches must be"):
        train_sae(build_sae(sae_config()), 3, config(), tmp_path / "c", progress=False)


MODEL = dict(n_layers=1, d_model=8, n_heads=2, d_vocab=40, n_ctx=16, seed=0)
HOOK = "blocks.0.hook_resid_post"


@pytest.mark.bad_input
def test_a_store_that_runs_out_stops_the_run_naming_the_step(tmp_path):
    model = Transformer(ModelConfig(**MODEL)).eval()  # no tokenizer: no position is dropped
    tokens = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(0))
    source = token_source(tokens, seq_len=16, cycle=False)
    store = ActivationStore(model, HOOK, source, batch_tokens=16, context=16, buffer_batches=2)
    with pytest.raises(SAEError, match=f"ran out of activations at step {tokens.numel() // 16};"):
        train_sae(
            build_sae(sae_config()), store, config(total_tokens=16 * 10, batch_tokens=16), tmp_path, progress=False
        )


def test_run_json_records_the_data_and_a_resume_on_other_data_is_refused_by_name(tmp_path):
    model = Transformer(ModelConfig(**MODEL)).eval()
    tokens = torch.randint(0, 40, (24, 16), generator=torch.Generator().manual_seed(5))

    def store(**options) -> ActivationStore:
        return ActivationStore(model, HOOK, tokens, batch_tokens=32, context=16, **{"buffer_batches": 2, **options})

    train_sae(build_sae(sae_config()), store(), config(), tmp_path / "run", until=2, progress=False)
    data = json.loads((tmp_path / "run" / ckpt.RUN_FILE).read_text())["data"]
    assert data == json.loads(json.dumps(store().data_settings))
    assert (data["hooks"], data["context"], data["seed"], data["buffer_rows"]) == ([HOOK], 16, 0, 64)
    for options, difference in ((dict(buffer_batches=3), "buffer_rows: 64"), (dict(seed=1), "seed: 0")):
        with pytest.raises(SAEError, match=f"different settings: data.{difference} in the folder"):
            train_sae(build_sae(sae_config()), store(**options), config(), tmp_path / "run", resume=True)
    train_sae(build_sae(sae_config()), sparse_stream, config(), tmp_path / "plain", until=1, progress=False)
    assert json.loads((tmp_path / "plain" / ckpt.RUN_FILE).read_text())["data"] == {}  # nothing to record


KILLED_RUN = """
import os, signal, sys, torch
from tests.sae.test_training import store_run
def kill(step, sae, entry):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
store_run(sys.argv[1], callbacks=[kill])
"""


def store_run(out, **options) -> SAE:
    """A batchtopk SAE on a real activation store over a tiny model (dead latents, a threshold, a buffer)."""
    model = Transformer(ModelConfig(**MODEL)).eval()
    tokens = torch.randint(0, 40, (24, 16), generator=torch.Generator().manual_seed(5))
    store = ActivationStore(model, "blocks.0.hook_resid_post", tokens, batch_tokens=32, context=16, buffer_batches=2)
    sae = build_sae(sae_config("batchtopk", d_sae=64, k=1))
    cfg = config(total_tokens=32 * 12, log_every=1, checkpoint_every=4, dead_after_tokens=64)
    return train_sae(sae, store, cfg, Path(out), progress=False, **options)


def test_a_run_killed_with_sigkill_resumes_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = KILLED_RUN.format(kill_at=6)
    killed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "killed")], env=env, cwd=REPO, capture_output=True
    )
    assert killed.returncode == -9, killed.stderr.decode()
    assert max(r["step"] for r in ckpt.read_metrics(tmp_path / "killed")) == 6  # logged past its checkpoint (4)
    assert not (tmp_path / "killed" / "sae_weights.safetensors").exists()

    resumed = store_run(tmp_path / "killed", resume=True)
    whole = store_run(tmp_path / "whole")
    assert resumed.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())
    assert ckpt.read_metrics(tmp_path / "killed") == ckpt.read_metrics(tmp_path / "whole")
    assert any(r["aux"] > 0 for r in ckpt.read_metrics(tmp_path / "whole"))  # dead latents and AuxK were in play
