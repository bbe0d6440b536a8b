"""What every model organism provides: a task, a model, a recipe and its ground truth.

An organism is a small object holding its task parameters (``p`` for modular addition, the
number of features for superposition...). The trainer only ever calls the methods below, so
one training loop, one checkpoint format and one CLI serve every organism.

Data is a pure function of ``(seed, step)``: ``batch`` receives a generator seeded from both,
so a resumed run sees exactly the batches the uninterrupted run would have seen, without
saving any data-loader state.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mechscope.toys.training import TrainConfig


@dataclass
class Findings:
    """The ground truth an organism's ``explain`` recovers: named facts plus a readable summary."""

    organism: str
    facts: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join([f"{self.organism}:", *(f"  {line}" for line in self.lines)])

    def __getitem__(self, key: str) -> Any:
        return self.facts[key]

    def add(self, key: str, value: Any, line: str | None = None) -> None:
        self.facts[key] = value
        if line is not None:
            self.lines.append(line)


class Organism(ABC):
    """A task with a known mechanism, the model that learns it, and the analysis that shows it.

    Subclasses are dataclasses of their task parameters, so ``type(o)(**o.params())`` rebuilds
    the same organism and the parameters are stored in every checkpoint.
    """

    name: ClassVar[str]
    summary: ClassVar[str]

    def params(self) -> dict[str, Any]:
        """The task parameters, JSON-serialisable (stored in ``run.json``)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]

    @abstractmethod
    def train_config(self) -> TrainConfig:
        """The recipe that produces the shipped checkpoint."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (the trainer seeds torch before calling this)."""

    @abstractmethod
    def batch(self, step: int, generator: torch.Generator) -> Any:
        """The training batch for ``step``; all randomness must come from ``generator``."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The training loss and any extra metrics to log with it (scalar tensors are read only
        at logged steps, so they cost no device sync on the others)."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics, logged every ``eval_every`` steps (the curves ``explain`` reads)."""
        return {}

    @abstractmethod
    def explain(self, model: nn.Module, metrics: Sequence[dict[str, Any]] = ()) -> Findings:
        """Recover the known mechanism from the trained ``model`` (and its training ``metrics``)."""

    def figures(self, model: nn.Module, metrics: Sequence[dict[str, Any]], findings: Findings) -> dict[str, Any]:
        """Plotly figures of the findings, by file stem (``docs/figures.py`` renders them)."""
        return {}

    # ------------------------------------------------------------ saving what is not weights
    def save_assets(self, directory: Path) -> None:
        """Write anything besides the weights that loading needs (a tokenizer, say)."""
        return None  # most organisms are weights alone

    def load_model(self, state: dict[str, torch.Tensor], directory: Path) -> nn.Module:
        """Rebuild the trained model from its weights (and the assets in ``directory``)."""
        model = self.build_model()
        model.load_state_dict(state)
        return model

    def optimizer_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups for AdamW; by default every parameter is decayed."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
