"""A training run's folder: ``run.json`` (what the run is: the SAE, training and data settings),
``metrics.jsonl``, and one atomic ``checkpoint.safetensors`` holding everything an exact resume
needs (weights, Adam's moments, the dead-latent counters, the RNG, the input scaling factor and
every rank's activation-store state). Only rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor

from mechscope.sae import distributed as dd
from mechscope.sae.base import SAE, SAEError
from mechscope.toys import checkpoint as ckpt

if TYPE_CHECKING:
    from mechscope.sae.training import BatchStream, InputScale, LatentTracker

COMPARED = ("sae", "train", "data")  # the sections of run.json a resumed run must match


class RunExistsError(FileExistsError):
    """The output folder already holds a run and resuming was not asked for."""


def prepare_run(
    directory: Path,
    record: dict[str, Any],
    resume: bool,
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    tracker: LatentTracker,
    stream: BatchStream,
    scale: InputScale,
) -> tuple[int, list[dict[str, Any]]]:
    """Start a fresh run in ``directory`` or continue the one there; returns (step, metrics so far).

    Every rank reads the folder (and its checkpoint) before rank 0 alone writes to it.
    """
    run_file = directory / ckpt.RUN_FILE
    step = None
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; a training run writes a folder there: choose another")
    if run_file.exists():
        if not resume:
            raise RunExistsError(
                f"{directory} already holds a run ({ckpt.RUN_FILE}); pass resume=True to continue it, "
                "or choose another output folder"
            )
        if (directory / ckpt.CHECKPOINT_FILE).exists():  # first: another world explains other per-rank settings
            check_same_world(directory)
        check_same_run(json.loads(run_file.read_text(encoding="utf-8")), record, directory)
        if (directory / ckpt.CHECKPOINT_FILE).exists():
            step = load_state(directory, sae, optimizer, tracker, stream, scale)
    dd.barrier()
    if not dd.is_main():
        return step or 0, []
    if step is not None:
        return step, ckpt.keep_metrics_until(directory, step)
    directory.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(run_file, json.dumps(record, indent=2))
    (directory / ckpt.METRICS_FILE).unlink(missing_ok=True)
    return 0, []


def check_same_run(stored: dict[str, Any], wanted: dict[str, Any], directory: Path) -> None:
    """Resuming with other settings would silently mix two runs; name what differs instead."""
    differences = ckpt.setting_differences(stored, wanted, COMPARED)
    if differences:
        raise SAEError(f"cannot resume the run in {directory} with different settings: " + "; ".join(differences))


def check_same_world(directory: Path) -> None:
    """Each rank continues its own share of the data, so a checkpoint resumes on as many processes as wrote it."""
    with safe_open(str(directory / ckpt.CHECKPOINT_FILE), framework="pt") as f:
        saved_world = int((f.metadata() or {}).get("world_size", "1"))
    if saved_world != dd.world_size():
        raise SAEError(
            f"the checkpoint in {directory} was written by {saved_world} process(es); resume it with "
            f"world_size={saved_world}, not {dd.world_size()} (each rank continues its own share of the data)"
        )


def save_state(
    directory: Path,
    step: int,
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    tracker: LatentTracker,
    stream: BatchStream,
    scale: InputScale,
) -> None:
    """One atomic file with everything a resumed run needs (the layout of the toys' checkpoints, plus more).

    With several ranks, each rank's store state is gathered to rank 0 and saved under
    ``store/rank{r}/``; only rank 0 writes.
    """
    states = dd.gather_states(stream.state_dict())
    if not dd.is_main():
        return
    tensors = {f"model/{k}": v for k, v in sae.state_dict().items()}
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"optim/{index}/{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    tensors["latents/tokens_since_fired"] = tracker.tokens_since_fired
    if scale.factor is not None:
        tensors["activations/scaling_factor"] = torch.tensor(scale.factor, dtype=torch.float64)
    for r, state in enumerate(states):  # a store's state is flat tensors
        tensors.update({f"{store_prefix(r, len(states))}{k}": v for k, v in state.items()})
    metadata = {"step": str(step), "param_groups": json.dumps(optim["param_groups"]), "world_size": str(len(states))}
    ckpt.atomic_save_tensors(directory / ckpt.CHECKPOINT_FILE, tensors, metadata)


def load_state(
    directory: Path,
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    tracker: LatentTracker,
    stream: BatchStream,
    scale: InputScale,
) -> int:
    """Restore what ``save_state`` wrote; returns the step to continue from."""
    tensors, metadata = ckpt.read_tensors(directory / ckpt.CHECKPOINT_FILE)
    sae.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value  # load_state_dict moves moments to the weights' device
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    tracker.tokens_since_fired.copy_(tensors["latents/tokens_since_fired"])
    if "activations/scaling_factor" in tensors:
        scale.factor = tensors["activations/scaling_factor"].item()
    step = int(metadata["step"])
    prefix = store_prefix(dd.rank(), dd.world_size())
    stream.resume({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}, step)
    return step


def store_prefix(rank: int, world: int) -> str:
    """Checkpoint key prefix of one rank's store state (``store/`` alone for a single process)."""
    return "store/" if world == 1 else f"store/rank{rank}/"
