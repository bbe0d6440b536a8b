"""One small training loop for every model organism.

AdamW with linear warmup then a constant or cosine learning rate, gradient clipping, a seed
that fixes both the initialisation and every batch, a tqdm progress bar, metrics appended to
``metrics.jsonl``, evaluation (and user callbacks) every ``eval_every`` steps, and atomic
checkpoints every ``checkpoint_every`` steps. ``train(..., resume=True)`` continues a killed
run from its last checkpoint and ends exactly where the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mechscope.toys import checkpoint as ckpt

if TYPE_CHECKING:
    from mechscope.toys.organism import Organism

Schedule = Literal["constant", "cosine"]
Callback = Callable[[int, nn.Module, dict[str, Any]], None]


@dataclass
class TrainConfig:
    """How to optimise (the task's own knobs, such as batch size, live on the organism)."""

    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: Sequence[float] = (0.9, 0.999)  # stored as a tuple; JSON gives a list
    warmup_steps: int = 0
    schedule: Schedule = "constant"
    final_lr_fraction: float = 0.0  # cosine decays to lr * this
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers, got {self.betas!r}")
        for name in ("steps", "log_every", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip!r}")

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier for the update made at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.final_lr_fraction + (1 - self.final_lr_fraction) * cosine

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class TrainResult:
    model: nn.Module
    metrics: list[dict[str, Any]]
    directory: Path | None

    @property
    def final_loss(self) -> float:
        return self.metrics[-1]["loss"]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for ``step``'s batch: a well-mixed function of ``(seed, step)``."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def train(
    organism: Organism,
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    command: str | None = None,
) -> TrainResult:
    """Train ``organism`` with ``config`` (its own recipe by default).

    With ``out``, the run is written there (see :mod:`mechscope.toys.checkpoint`) and can be
    resumed with ``resume=True``; without, nothing touches the disk. ``until`` pauses the run
    after that many steps (checkpointed, so ``resume=True`` carries on with the same schedule).
    """
    config = config or organism.train_config()
    directory = Path(out) if out is not None else None
    record = run_record(organism, config, command)
    torch.manual_seed(config.seed)
    model = organism.build_model()
    optimizer = torch.optim.AdamW(
        organism.optimizer_groups(model, config.weight_decay), lr=config.lr, betas=config.betas
    )
    start, metrics = 0, []
    if directory is not None:
        start, metrics = prepare_directory(directory, record, resume, model, optimizer)
        if start == 0:
            organism.save_assets(directory)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor, last_epoch=start - 1)
    end = config.steps if until is None else max(start, min(until, config.steps))

    bar = tqdm(total=config.steps, initial=start, desc=f"train {organism.name}", disable=not progress)
    for step in range(start, end):
        model.train()
        loss, extra = organism.loss(model, organism.batch(step, step_generator(config.seed, step)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        done = step + 1
        evaluate = done % config.eval_every == 0 or done == config.steps
        if evaluate or done % config.log_every == 0:
            extra = {key: float(value) for key, value in extra.items()}  # tensors sync only when logged
            entry = {"step": done, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"], **extra}
            if evaluate:
                entry.update(evaluation(organism, model, done, entry, callbacks))
            metrics.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if directory is not None:
                with open(directory / ckpt.METRICS_FILE, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
        if directory is not None and (done % config.checkpoint_every == 0 or done == end):
            ckpt.save_checkpoint(directory, done, model, optimizer)
        bar.update(1)
    bar.close()

    model.eval()
    if directory is not None and end == config.steps:
        ckpt.atomic_save_tensors(directory / ckpt.WEIGHTS_FILE, model.state_dict())
        final = {**record, "steps_done": config.steps, "final": metrics[-1] if metrics else {}}
        ckpt.atomic_write_text(directory / ckpt.RUN_FILE, json.dumps(final, indent=2))
    return TrainResult(model, metrics, directory)


def evaluation(
    organism: Organism, model: nn.Module, step: int, entry: dict[str, Any], callbacks: Sequence[Callback]
) -> dict[str, float]:
    """The organism's held-out metrics at ``step``; each callback sees the whole record."""
    model.eval()
    with torch.no_grad():
        results = organism.evaluate(model)
    for callback in callbacks:
        callback(step, model, {**entry, **results})
    return results


def run_record(organism: Organism, config: TrainConfig, command: str | None) -> dict[str, Any]:
    """What ``run.json`` says about a run: enough to rebuild the organism and repeat the run."""
    from mechscope import __version__

    return {
        "organism": organism.name,
        "params": organism.params(),
        "train": config.to_dict(),
        "seed": config.seed,
        "command": command,
        "mechscope": __version__,
    }


def prepare_directory(
    directory: Path, record: dict[str, Any], resume: bool, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict[str, Any]]]:
    """Start a fresh run in ``directory`` or continue the one there; returns (step, metrics so far)."""
    directory.mkdir(parents=True, exist_ok=True)
    run_file = directory / ckpt.RUN_FILE
    if run_file.exists():
        if not resume:
            raise FileExistsError(
                f"{directory} already holds a run ({ckpt.RUN_FILE}); pass resume=True (--resume) to continue it, "
                "or choose another output folder"
            )
        check_same_run(json.loads(run_file.read_text(encoding="utf-8")), record, directory)
        if (directory / ckpt.CHECKPOINT_FILE).exists():
            step = ckpt.load_checkpoint(directory, model, optimizer)
            return step, ckpt.keep_metrics_until(directory, step)
    ckpt.atomic_write_text(run_file, json.dumps(record, indent=2))
    (directory / ckpt.METRICS_FILE).unlink(missing_ok=True)
    return 0, []


def check_same_run(stored: dict[str, Any], wanted: dict[str, Any], directory: Path) -> None:
    """Resuming with other settings would silently mix two runs; name what differs instead."""
    differences = ckpt.setting_differences(stored, wanted, ("params", "train"))
    if stored.get("organism") != wanted["organism"]:
        differences.insert(0, f"organism: {stored.get('organism')!r} in the folder, {wanted['organism']!r} now")
    if differences:
        raise ValueError(f"cannot resume the run in {directory} with different settings: " + "; ".join(differences))
