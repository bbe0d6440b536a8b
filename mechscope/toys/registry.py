"""The model organisms by name. Entries are import paths, so listing them imports nothing heavy."""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import TYPE_CHECKING, Any

from mechscope.toys.training import TrainConfig

if TYPE_CHECKING:
    from mechscope.toys.organism import Organism

ORGANISMS: dict[str, str] = {
    "induction": "mechscope.toys.induction:Induction",
    "modular_addition": "mechscope.toys.modular:ModularAddition",
    "superposition": "mechscope.toys.superposition:Superposition",
    "parentheses": "mechscope.toys.parens:Parentheses",
    "language": "mechscope.toys.language:SyntheticLanguage",
}


def organism_class(name: str) -> type[Organism]:
    """The organism class called ``name``; an unknown name lists the known ones."""
    if name not in ORGANISMS:
        raise KeyError(f"unknown model organism {name!r}; known: {', '.join(ORGANISMS)}")
    module, _, attribute = ORGANISMS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def configured(name: str, settings: dict[str, Any] | None = None) -> tuple[Organism, TrainConfig]:
    """The organism ``name`` and its recipe, with ``settings`` overriding task or training fields.

    A setting names a field of the organism (``p``, ``n_features``...) or of :class:`TrainConfig`
    (``steps``, ``seed``, ``lr``...); an unknown one is an error listing both.
    """
    cls = organism_class(name)
    settings = dict(settings or {})
    task_fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - task_fields - train_fields)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} for {name}; task fields: {sorted(task_fields)}; "
            f"training fields: {sorted(train_fields)}"
        )
    organism = cls(**{k: v for k, v in settings.items() if k in task_fields})
    recipe = organism.train_config()
    overrides = {k: v for k, v in settings.items() if k in train_fields}
    return organism, dataclasses.replace(recipe, **overrides)


def parse_setting(text: str) -> tuple[str, Any]:
    """``"key=value"`` with the value read as JSON when it parses (numbers, lists, true), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"a setting is KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
