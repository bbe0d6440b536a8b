"""Checkpoints that survive a kill: every file is written beside its target, then renamed.

A run directory holds

    run.json                 what was trained: organism, its parameters, the recipe, the command
    metrics.jsonl            one JSON record per logged step
    checkpoint.safetensors   the latest resumable state (weights, optimizer, step) in one file
    model.safetensors        the final weights, written when the run completes

``os.replace`` is atomic on POSIX, so a reader (or a resumed run) sees either the previous
complete checkpoint or the new complete one, never half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.safetensors"
WEIGHTS_FILE = "model.safetensors"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that ``path`` is never seen half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    # Our weights are stored in their compute layout (often a transposed view); safetensors
    # wants each tensor contiguous and owning its own memory.
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # safetensors creates files readable by their owner only
    os.replace(tmp, path)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file, with its string metadata."""
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()  # safe_open is not a dict: it must be asked for its keys
        return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Everything a resumed run needs, in one file: weights, AdamW moments, the step."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optim/{index}/{key}"] = value
    tensors["rng/torch"] = torch.get_rng_state()
    metadata = {"step": str(step), "param_groups": json.dumps(optim["param_groups"])}
    atomic_save_tensors(directory / CHECKPOINT_FILE, tensors, metadata)


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and RNG from ``directory``; returns the step to continue from."""
    tensors, metadata = read_tensors(directory / CHECKPOINT_FILE)
    model.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    torch.set_rng_state(tensors["rng/torch"])
    return int(metadata["step"])


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line cut short by a kill is ignored."""
    path = directory / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def keep_metrics_until(directory: Path, step: int) -> list[dict[str, Any]]:
    """Drop records logged after ``step`` (a killed run's work past its last checkpoint)."""
    kept = [r for r in read_metrics(directory) if r["step"] <= step]
    atomic_write_text(directory / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def setting_differences(
    stored: dict[str, Any], wanted: dict[str, Any], sections: tuple[str, ...], *, where: str = "in the folder"
) -> list[str]:
    """Each setting of ``sections`` that differs between a stored record and a new run's, as
    ``"section.key: old in the folder, new now"``: what a refused resume (or cache) names."""
    return [
        f"{section}.{key}: {stored.get(section, {}).get(key)!r} {where}, {wanted[section].get(key)!r} now"
        for section in sections
        for key in sorted(set(stored.get(section, {})) | set(wanted[section]))
        if stored.get(section, {}).get(key) != wanted[section].get(key)
    ]
