"""Training an SAE on a stream of activations, resumable after a kill.

One step: take a batch, compute the SAE's losses (the sparsity term scaled by its warmup, AuxK
told which latents are dead), remove the decoder gradient's component along each decoder row
(Bricken et al. 2023: it could only change the row's norm, which is renormalised away anyway),
clip, take an Adam step at the scheduled learning rate, renormalise the decoder rows. ReLU SAEs
weight their L1 by decoder norms instead, so they skip both decoder steps.

A run folder holds ``run.json`` (the SAE, training and data settings), ``metrics.jsonl``, the
resumable ``checkpoint.safetensors`` (weights, Adam moments, step, tokens since each latent
fired, RNG, the data stream's position) and, when done, the SAE in SAELens' format
(``cfg.json`` + ``sae_weights.safetensors``). ``resume=True`` continues a killed run exactly
where the uninterrupted one would have been.

Under ``torchrun`` (see :mod:`mechscope.sae.distributed`) the same loop is data-parallel:
``batch_tokens`` is the global batch, each rank trains on its share, gradients are averaged
before the update, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechscope.sae import distributed as dd
from mechscope.sae.base import SAE, Losses, SAEError
from mechscope.sae.run_folder import prepare_run, save_state
from mechscope.toys import checkpoint as ckpt

Decay = Literal["none", "cosine", "linear"]
Batch = Tensor | tuple[Tensor, Tensor]
Callback = Callable[[int, SAE, dict[str, Any]], None]
NORMALISED = ("topk", "batchtopk", "jumprelu")  # architectures trained with unit-norm decoder rows
DECAYS = ("none", "cosine", "linear")


@dataclass
class TrainSAEConfig:
    """How to train an SAE; steps = total_tokens // batch_tokens."""

    total_tokens: int = 1_000_000
    batch_tokens: int = 4096
    lr: float = 3e-4
    lr_warmup_steps: int = 0
    lr_decay: Decay = "none"
    lr_decay_steps: int = 0  # the decay happens over the last lr_decay_steps steps, down to lr * lr_end_fraction
    lr_end_fraction: float = 0.0
    betas: Sequence[float] = (0.9, 0.999)  # stored as a tuple; JSON gives a list
    sparsity_warmup_steps: int = 0  # the sparsity coefficient ramps linearly from 0 over these steps
    clip_grad_norm: float | None = 1.0
    dead_after_tokens: int = 1_000_000  # a latent is dead once it has not fired for this many tokens
    dense_threshold: float = 0.1  # a latent is dense when it fires on more than this fraction of tokens
    log_every: int = 100
    checkpoint_every: int = 1000
    seed: int = 0
    autocast: bool = False  # bfloat16 autocast of the SAE's step (CUDA, or CPU)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        for name, (ok, what) in LIMITS.items():
            if not ok(getattr(self, name)):
                raise SAEError(f"TrainSAEConfig.{name} must be {what}, got {getattr(self, name)!r}")
        _check_together(self)

    @property
    def steps(self) -> int:
        """Number of optimiser steps in the run."""
        return self.total_tokens // self.batch_tokens

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier for the update made at ``step`` (0-based)."""
        if step < self.lr_warmup_steps:
            return (step + 1) / self.lr_warmup_steps
        decay_start = self.steps - self.lr_decay_steps
        if self.lr_decay == "none" or step < decay_start:
            return 1.0
        progress = (step - decay_start) / self.lr_decay_steps  # in [0, 1)
        shape = 1 - progress if self.lr_decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr_end_fraction + (1 - self.lr_end_fraction) * shape

    def sparsity_scale(self, step: int) -> float:
        """Multiplier of the sparsity term at ``step``: 0 at the first step, 1 from ``sparsity_warmup_steps`` on."""
        if step >= self.sparsity_warmup_steps:
            return 1.0
        return step / self.sparsity_warmup_steps

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_POSITIVE = (lambda v: _is_int(v, 1), "a positive integer")
_NON_NEGATIVE = (lambda v: _is_int(v, 0), "a non-negative integer")
LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {  # field: (test, what it must be)
    **dict.fromkeys(("total_tokens", "batch_tokens", "dead_after_tokens", "log_every", "checkpoint_every"), _POSITIVE),
    **dict.fromkeys(("lr_warmup_steps", "lr_decay_steps", "sparsity_warmup_steps", "seed"), _NON_NEGATIVE),
    "lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "lr_decay": (lambda v: v in DECAYS, f"one of {DECAYS}"),
    "lr_end_fraction": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "betas": (
        lambda v: isinstance(v, tuple) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1)",
    ),
    "clip_grad_norm": (lambda v: v is None or (_is_number(v) and v > 0), "a positive number or None"),
    "dense_threshold": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "autocast": (lambda v: isinstance(v, bool), "True or False"),
}


def _check_together(cfg: TrainSAEConfig) -> None:
    """Limits that involve two fields."""
    if cfg.batch_tokens > cfg.total_tokens:
        raise SAEError(f"TrainSAEConfig.batch_tokens={cfg.batch_tokens} exceeds total_tokens={cfg.total_tokens}")
    if cfg.lr_decay != "none" and cfg.lr_decay_steps < 1:
        raise SAEError(f"TrainSAEConfig.lr_decay_steps must be at least 1 with lr_decay={cfg.lr_decay!r}")
    if cfg.lr_warmup_steps + cfg.lr_decay_steps > cfg.steps:
        raise SAEError(
            f"TrainSAEConfig.lr_warmup_steps + lr_decay_steps = {cfg.lr_warmup_steps + cfg.lr_decay_steps} "
            f"exceeds the run's {cfg.steps} steps (total_tokens // batch_tokens)"
        )


# ------------------------------------------------------------------------------ data
class BatchStream:
    """One interface over the sources a run can read, each resumable at a step.

    - an ``ActivationStore`` (anything with ``next_batch``, ``state_dict``, ``load_state_dict``):
      its own state is checkpointed;
    - a callable ``step -> batch``: stateless, so resuming simply asks for the next step;
    - a tensor ``[n, d_in]``: consecutive ``batch_tokens``-row slices, cycling;
    - any other iterable of batches: on resume a fresh one is fast-forwarded by the steps done,
      so it must yield the same batches again (a list, or a generator rebuilt from a seed).

    A batch is ``x [batch, d_in]``, or ``(x, y)`` for a transcoder. A source that runs out stops
    the run with an error naming the step, on every rank at once (the ranks agree before each step).
    """

    def __init__(self, source: Any, batch_tokens: int) -> None:
        self.source = source
        self.batch_tokens = batch_tokens
        self.is_store = all(hasattr(source, a) for a in ("next_batch", "state_dict", "load_state_dict"))
        self.iterator: Iterator[Batch] | None = None
        if isinstance(source, Tensor):
            if source.ndim != 2 or len(source) < batch_tokens:
                raise SAEError(
                    f"a tensor of activations must be [n >= batch_tokens={batch_tokens}, d_in], "
                    f"got {tuple(source.shape)}"
                )
        elif not (self.is_store or callable(source) or isinstance(source, Iterable)):
            raise SAEError(
                "store_or_batches must be an ActivationStore, a callable step -> batch, a tensor [n, d_in] "
                f"or an iterable of batches, got {type(source).__name__}"
            )

    def batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        """The batch for ``step`` as ``(x, target)``; target is None unless the source gives pairs."""
        batch = self._fetch(step)
        if dd.any_rank(torch.tensor([batch is None])).item():  # one rank out of data stops them all
            raise SAEError(self._exhausted(step))
        return self._checked(batch, step)

    def _fetch(self, step: int = 0) -> Batch | None:
        """The next batch, or None once the source has run out."""
        if isinstance(self.source, Tensor):
            start = step % (len(self.source) // self.batch_tokens) * self.batch_tokens
            return self.source[start : start + self.batch_tokens]
        if callable(self.source) and not self.is_store:
            return self.source(step)
        try:
            if self.is_store:
                return self.source.next_batch()
            self.iterator = iter(self.source) if self.iterator is None else self.iterator
            return next(self.iterator)
        except StopIteration:
            return None

    def _exhausted(self, step: int) -> str:
        if self.is_store:
            where = " on some rank" if dd.world_size() > 1 else ""
            return (
                f"the activation store ran out of activations at step {step}{where}; the config asks for more "
                "(total_tokens): give the store more token rows, a source that cycles, or fewer total_tokens"
            )
        return f"store_or_batches ran out of batches at step {step}; the config asks for more"

    def _checked(self, batch: Batch, step: int) -> tuple[Tensor, Tensor | None]:
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if not isinstance(x, Tensor) or x.ndim != 2 or len(x) != self.batch_tokens:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SAEError(f"batch {step} must be [batch_tokens={self.batch_tokens}, d_in], got {shape}")
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict() if self.is_store else {}

    def data_settings(self) -> dict[str, Any]:
        """What run.json records about the data (a store's settings; nothing for plain Python sources)."""
        return dict(getattr(self.source, "data_settings", {})) if self.is_store else {}

    def resume(self, state: dict[str, Any], step: int) -> None:
        """Continue after ``step`` batches: restore a store, or skip through a plain iterable."""
        if self.is_store:
            self.source.load_state_dict(state)
        elif not isinstance(self.source, Tensor) and not callable(self.source):
            for done in range(step):
                if self._fetch() is None:
                    raise SAEError(self._exhausted(done))


# ------------------------------------------------------------------------------ state beyond weights
@dataclass
class LatentTracker:
    """Tokens since each latent last fired: the dead mask for AuxK, and the dead fraction."""

    tokens_since_fired: Int[Tensor, " d_sae"]
    dead_after_tokens: int

    @classmethod
    def fresh(cls, d_sae: int, dead_after_tokens: int, device: torch.device) -> LatentTracker:
        return cls(torch.zeros(d_sae, dtype=torch.long, device=device), dead_after_tokens)

    def dead_mask(self) -> Bool[Tensor, " d_sae"]:
        return self.tokens_since_fired >= self.dead_after_tokens

    def update(self, fired: Bool[Tensor, " d_sae"], n_tokens: int) -> None:
        """Count ``n_tokens`` more for latents that stayed silent; reset those that fired."""
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)


@dataclass
class InputScale:
    """SAELens' ``expected_average_only_in``: activations times ``sqrt(d_in) / mean ||x||`` while training.

    The factor is measured on the first batch (over every rank's share), kept in the checkpoint,
    applied to inputs and targets alike, and folded into the weights when the run ends
    (``SAE.fold_activation_norm_scaling_factor``), so the saved SAE takes raw activations.
    """

    wanted: bool
    factor: float | None = None

    def __call__(self, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x`` and ``target`` in training units (unchanged unless wanted)."""
        if not self.wanted:
            return x, target
        if self.factor is None:
            mean_norm = dd.mean_over_ranks(x.detach().float().norm(dim=-1).mean().reshape(1)).item()
            if not math.isfinite(mean_norm) or mean_norm <= 0:
                raise SAEError(f"normalize_activations needs activations with a positive mean norm, got {mean_norm}")
            self.factor = x.shape[-1] ** 0.5 / mean_norm
        return x * self.factor, None if target is None else target * self.factor


@torch.no_grad()
def firing_fraction(sae: SAE, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, " d_sae"]:
    """Fraction of the examples of ``x`` on which each latent is active (from the sparse latents)."""
    sparse = sae.encode_sparse(x)
    counts = torch.zeros(sae.cfg.d_sae, device=x.device)
    counts.index_add_(0, sparse.indices.flatten(), (sparse.values != 0).flatten().to(counts.dtype))
    return counts / len(x)


# ------------------------------------------------------------------------------ the loop
def train_sae(
    sae: SAE,
    store_or_batches: Any,
    config: TrainSAEConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    until: int | None = None,
    command: str | None = None,
) -> SAE:
    """Train ``sae`` in place on ``store_or_batches`` (see :class:`BatchStream`) and return it.

    The run is written to ``out``; ``resume=True`` continues the run there (refusing other
    settings, named in the error); ``until`` pauses after that many steps (checkpointed).
    Each callback gets ``(step, sae, metrics entry)`` at every logged step.

    In a process group (``torchrun``; :func:`mechscope.sae.distributed.init_distributed`) every
    rank calls this with the same SAE, config and ``out``, and a source of its own share of the
    data: ``batch_tokens // world_size`` rows a batch (:func:`~mechscope.sae.distributed.rank_store`).
    Metrics are the global batch's; rank 0 writes the folder and runs the callbacks.
    """
    if not isinstance(config, TrainSAEConfig):
        raise SAEError(f"config must be a TrainSAEConfig, got {type(config).__name__}")
    if sae.W_enc.dtype in (torch.float16, torch.bfloat16):
        raise SAEError(
            f"train_sae needs float32 or float64 weights, got {sae.cfg.dtype}: Adam's small updates (and JumpReLU's "
            "thresholds) are lost in half precision; train in float32 with autocast=True for bfloat16 speed"
        )
    directory = Path(out)
    device = sae.W_dec.device
    stream = BatchStream(store_or_batches, dd.local_batch_tokens(config.batch_tokens))
    torch.manual_seed(config.seed)
    dd.broadcast_module(sae)  # every rank starts from rank 0's weights
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr, betas=config.betas)
    tracker = LatentTracker.fresh(sae.cfg.d_sae, config.dead_after_tokens, device)
    scale = InputScale(sae.cfg.normalize_activations == "expected_average_only_in")
    record = run_record(sae, config, command, stream.data_settings())
    start, metrics = prepare_run(directory, record, resume, sae, optimizer, tracker, stream, scale)
    end = config.steps if until is None else max(start, min(until, config.steps))
    main = dd.is_main()

    sae.train()
    bar = tqdm(
        total=config.steps, initial=start, desc=f"train {sae.cfg.architecture} SAE", disable=not (progress and main)
    )
    for step in range(start, end):
        x, target = stream.batch(step)
        x, target = scale(x.to(device), None if target is None else target.to(device))
        done = step + 1
        logged = done % config.log_every == 0 or done == config.steps
        firing = firing_fraction(sae, x) if logged else None  # measured with the weights the loss sees
        losses = training_step(sae, optimizer, config, step, x, target, tracker.dead_mask())
        tracker.update(dd.any_rank(losses.fired), config.batch_tokens)  # fired on any rank's share
        if firing is not None:
            entry = log_entry(config, done, target if target is not None else x, losses, optimizer)
            entry["dead_frac"] = tracker.dead_mask().float().mean().item()
            entry["dense_frac"] = (dd.mean_over_ranks(firing) > config.dense_threshold).float().mean().item()
            metrics.append(entry)
            bar.set_postfix(mse=f"{entry['mse']:.4g}", l0=f"{entry['l0']:.1f}")
            if main:
                with open(directory / ckpt.METRICS_FILE, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
                for callback in callbacks:
                    callback(done, sae, entry)
        if done % config.checkpoint_every == 0 or done == end:
            save_state(directory, done, sae, optimizer, tracker, stream, scale)
        bar.update(1)
    bar.close()

    sae.eval()
    if end == config.steps and scale.factor is not None:
        sae.fold_activation_norm_scaling_factor(scale.factor)  # the saved SAE reads raw activations
    if end == config.steps and main:
        sae.save(directory)
        final = {**record, "steps_done": config.steps, "final": metrics[-1] if metrics else {}}
        if scale.factor is not None:
            final["norm_scaling_factor"] = scale.factor
        ckpt.atomic_write_text(directory / ckpt.RUN_FILE, json.dumps(final, indent=2))
    dd.barrier()  # no rank returns before the folder is complete
    return sae


def training_step(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    config: TrainSAEConfig,
    step: int,
    x: Float[Tensor, "batch d_in"],
    target: Float[Tensor, "batch d_out"] | None,
    dead_mask: Bool[Tensor, " d_sae"],
) -> Losses:
    """One optimiser update at ``step``; returns the batch's loss terms (before the update)."""
    for group in optimizer.param_groups:
        group["lr"] = config.lr * config.lr_factor(step)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.autocast):
        losses = sae.losses(x, target, dead_mask=dead_mask)
        loss = losses.mse + config.sparsity_scale(step) * losses.sparsity + losses.aux
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    dd.average_gradients(sae.parameters())  # the global batch's gradient (a no-op for one process)
    normalised = sae.cfg.architecture in NORMALISED
    if normalised:
        remove_parallel_gradient(sae.W_dec)
    if config.clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(sae.parameters(), config.clip_grad_norm)
    optimizer.step()
    if normalised:
        sae.normalize_decoder()
    dd.average_buffers(sae)  # BatchTopK's threshold, updated from each rank's own batch
    return losses


@torch.no_grad()
def remove_parallel_gradient(W_dec: nn.Parameter) -> None:
    """Project each decoder row's gradient onto the row's orthogonal complement (it keeps unit norm to first order)."""
    if W_dec.grad is None:
        return
    rows = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    W_dec.grad.sub_((W_dec.grad * rows).sum(-1, keepdim=True) * rows)


@torch.no_grad()
def log_entry(
    config: TrainSAEConfig,
    done: int,
    target: Float[Tensor, "batch d_out"],
    losses: Losses,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """The loss terms of a logged step (on its global batch, before its update); FVU = MSE / the batch's variance."""
    target = target.float()
    variance = dd.global_sum_of_squares(target).clamp_min(1e-12)
    terms = torch.stack([losses.mse.float(), losses.sparsity.float(), losses.aux.float(), losses.l0.float().mean()])
    mse, sparsity, aux, l0 = dd.mean_over_ranks(terms.detach()).tolist()  # equal shares: the global batch's means
    return {
        "step": done,
        "tokens": done * config.batch_tokens,
        "lr": optimizer.param_groups[0]["lr"],
        "mse": mse,
        "sparsity": sparsity,
        "sparsity_scale": config.sparsity_scale(done - 1),
        "aux": aux,
        "l0": l0,
        "fvu": mse * len(target) * dd.world_size() / variance.item(),
    }


def run_record(sae: SAE, config: TrainSAEConfig, command: str | None, data: dict[str, Any]) -> dict[str, Any]:
    """What ``run.json`` says about a run: enough to rebuild the SAE and repeat the run."""
    from mechscope import __version__

    record = {"sae": sae.cfg.to_dict(), "train": config.to_dict(), "data": data}
    return {**json.loads(json.dumps(record)), "command": command, "mechscope": __version__}
