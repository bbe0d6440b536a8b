"""The shipped model organisms, and any run directory written by ``train``, loaded by name.

``load("induction")`` returns the trained model, ready for hooks and caches, with its task
attached as ``model.organism`` and what produced it as ``model.run`` (the command, seed and
final metrics from ``run.json``). ``explain(name)`` recovers each organism's known mechanism.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from mechscope.toys import checkpoint as ckpt
from mechscope.toys.organism import Findings, Organism
from mechscope.toys.registry import ORGANISMS, organism_class

SHIPPED = Path(__file__).parent / "checkpoints"


def shipped() -> list[str]:
    """Names of the organisms whose trained checkpoints come with mechscope."""
    return [name for name in ORGANISMS if (SHIPPED / name / ckpt.RUN_FILE).exists()]


def run_directory(name_or_path: str | Path) -> Path:
    """The folder of a shipped organism (by name) or of a run written by ``train`` (by path)."""
    if isinstance(name_or_path, str) and (SHIPPED / name_or_path / ckpt.RUN_FILE).exists():
        return SHIPPED / name_or_path
    path = Path(name_or_path)
    if (path / ckpt.RUN_FILE).exists():
        return path
    raise FileNotFoundError(
        f"{str(name_or_path)!r} is neither a shipped organism ({', '.join(shipped()) or 'none installed'}) "
        f"nor a folder holding a training run ({ckpt.RUN_FILE})"
    )


def load_run(name_or_path: str | Path) -> tuple[nn.Module, Organism, dict[str, Any], list[dict[str, Any]]]:
    """(model, organism, run record, metrics) of a shipped organism or a run directory."""
    directory = run_directory(name_or_path)
    record = json.loads((directory / ckpt.RUN_FILE).read_text(encoding="utf-8"))
    organism = organism_class(record["organism"])(**record["params"])
    if (directory / ckpt.WEIGHTS_FILE).exists():
        state, _ = ckpt.read_tensors(directory / ckpt.WEIGHTS_FILE)
    elif (directory / ckpt.CHECKPOINT_FILE).exists():  # a run still in progress, or killed
        tensors, _ = ckpt.read_tensors(directory / ckpt.CHECKPOINT_FILE)
        state = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    else:
        raise FileNotFoundError(f"{directory} holds no weights yet ({ckpt.WEIGHTS_FILE} or {ckpt.CHECKPOINT_FILE})")
    model = organism.load_model(state, directory)
    model.eval()
    return model, organism, record, ckpt.read_metrics(directory)


def load(name_or_path: str | Path) -> nn.Module:
    """The trained model, with ``model.organism`` (its task) and ``model.run`` (how it was made)."""
    model, organism, record, _ = load_run(name_or_path)
    model.organism = organism
    model.run = record
    return model


def explain(name_or_path: str | Path, verbose: bool = True) -> Findings:
    """Print (unless ``verbose=False``) and return the findings of a shipped organism or a run."""
    model, organism, _, metrics = load_run(name_or_path)
    findings = organism.explain(model, metrics)
    if verbose:
        print(findings)
    return findings


def load_any(name_or_path: str | Path) -> nn.Module:
    """A shipped organism or training run (by name or folder), else a HuggingFace model (hub id
    or local directory): the one loader behind every command that takes a model name."""
    from mechscope.loading import Model

    try:
        run_directory(name_or_path)
    except FileNotFoundError:
        pass
    else:
        return load(name_or_path)
    try:
        return Model.from_pretrained(str(name_or_path))
    except (OSError, ValueError, KeyError) as error:
        if Path(name_or_path).is_dir():  # a model folder that failed to load: its own error says why
            raise
        reason = str(error.args[0] if isinstance(error, KeyError) and error.args else error).strip().splitlines()
        raise ModelNotFoundError(
            f"{str(name_or_path)!r} is not a shipped organism ({', '.join(shipped())}), a training-run folder, "
            f"or a HuggingFace model that could be loaded: {reason[0] if reason else type(error).__name__}"
        ) from error


class ModelNotFoundError(ValueError):
    """A model name that names nothing loadable; the message lists what would have worked."""
