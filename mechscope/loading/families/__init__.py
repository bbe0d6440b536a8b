"""How each HuggingFace architecture maps onto mechscope's model: one declarative entry each.

An entry (:class:`~mechscope.loading.families.base.Family`) says which ``model_type`` values it
covers, how to read a :class:`ModelConfig` off the HuggingFace config, which config options it
cannot honour, and, for every mechscope parameter, which HuggingFace tensor it comes from and
how that tensor is reshaped. Each module of this package holds the entries of one family in a
tuple named ``ENTRIES``; nothing else in mechscope branches on an architecture's name.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from mechscope.loading.families.base import Family, From
from mechscope.model.config import ModelConfig


def _discover() -> tuple[Family, ...]:
    entries: list[Family] = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if module != "base":
            entries.extend(importlib.import_module(f"{__name__}.{module}").ENTRIES)
    return tuple(entries)


FAMILIES: tuple[Family, ...] = _discover()


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model_type: str) -> Family:
    """The family entry for a HuggingFace ``model_type``; an unknown one lists what is supported."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise NotImplementedError(
        f"architecture {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
    )


def config_for(family: Family, hf_config: Any, **overrides: Any) -> ModelConfig:
    """Translate a HuggingFace config, refusing options this family's entry cannot honour."""
    used = [option for option, is_set in family.unsupported.items() if is_set(hf_config)]
    if used:
        raise NotImplementedError(
            f"{hf_config.model_type} option(s) {', '.join(used)} are not supported by mechscope yet"
        )
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown ModelConfig field(s) {unknown}; valid fields: {', '.join(sorted(known))}")
    fields = family.config(hf_config)
    fields.update(original_architecture=hf_config.model_type, **overrides)
    if fields.get("tokenizer_name") is None:
        fields["tokenizer_name"] = getattr(hf_config, "name_or_path", None) or None
    return ModelConfig(**fields)


__all__ = ["FAMILIES", "Family", "From", "config_for", "family_for", "supported_model_types"]
