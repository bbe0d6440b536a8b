"""Reading HuggingFace checkpoints: the config through transformers, the weights tensor by
tensor from safetensors, and their conversion into a mechscope model built on the meta device.

Weights stream: the model is allocated empty, and each HuggingFace tensor is read (memory
mapped), reshaped and copied into place one at a time, so loading never holds a second full
copy of the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from mechscope.loading.families import Family
from mechscope.model.transformer import Transformer

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A checkpoint directory or state dict does not match what its config promises."""


def local_checkpoint(name_or_path: str | Path) -> Path:
    """A local directory as is; a hub id is downloaded (config, tokenizer and weights only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise CheckpointError(f"{name_or_path} is not a model directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
    path = Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
    if not any((path / f).exists() for f in WEIGHT_FILES):
        path = Path(snapshot_download(str(name_or_path), allow_patterns=[*patterns, "pytorch_model*.bin"]))
    return path


class SafetensorsSource(Mapping[str, Tensor]):
    """The tensors of a (possibly sharded) safetensors checkpoint, read lazily by name."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        from safetensors import safe_open

        self._handles = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                self._handles[key] = handle

    def __getitem__(self, key: str) -> Tensor:
        return self._handles[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)


def open_weights(directory: Path, stack: ExitStack) -> Mapping[str, Tensor]:
    """The weights in ``directory``: safetensors (preferred) or a pickle loaded with
    ``weights_only=True``, which refuses anything but tensors."""
    if (directory / "model.safetensors").exists():
        return SafetensorsSource([directory / "model.safetensors"], stack)
    if (directory / "model.safetensors.index.json").exists():
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        return SafetensorsSource([directory / s for s in sorted(set(index["weight_map"].values()))], stack)
    bins = [directory / "pytorch_model.bin"]
    if (directory / "pytorch_model.bin.index.json").exists():
        index = json.loads((directory / "pytorch_model.bin.index.json").read_text())
        bins = [directory / s for s in sorted(set(index["weight_map"].values()))]
    if all(b.exists() for b in bins):
        state: dict[str, Tensor] = {}
        for b in bins:
            state.update(torch.load(b, map_location="cpu", weights_only=True, mmap=True))
        return state
    raise CheckpointError(f"no weights in {directory}: looked for {', '.join(WEIGHT_FILES)}")


def _checkpoint_prefix(source: Mapping[str, Tensor], family: Family) -> str:
    """The prefix this checkpoint puts before tensor names (``transformer.``, or none)."""
    probe = next(iter(family.weights.values())).name.format(i=0)
    for prefix in family.prefixes:
        if prefix + probe in source:
            return prefix
    raise CheckpointError(
        f"the checkpoint's tensor names do not match this architecture; first names: {list(source)[:5]}"
    )


def load_weights(model: Transformer, source: Mapping[str, Tensor], family: Family) -> None:
    """Fill every parameter of ``model`` from ``source`` per the family table, checking shapes;
    tensors in the checkpoint that nothing reads are an error, not silently dropped."""
    prefix = _checkpoint_prefix(source, family)
    used: set[str] = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            layer = re.match(r"blocks\.(\d+)\.", name)
            template = "blocks.{i}." + name[layer.end() :] if layer else name
            if template not in family.weights:
                raise CheckpointError(f"the family table has no rule for parameter {name!r}")
            rule = family.weights[template]
            fill = {"i": layer.group(1)} if layer else {}
            key = _find(source, prefix, rule.name.format(**fill), rule.fallback and rule.fallback.format(**fill))
            value = rule.transform(source[key], model.cfg)
            if value.shape != param.shape:
                raise CheckpointError(
                    f"{key} gives shape {tuple(value.shape)} for {name}, which needs {tuple(param.shape)}"
                )
            param.copy_(value)
            used.add(key)
    ignored = [re.compile(pattern) for pattern in family.ignored]
    unused = [k for k in source if k not in used and not any(p.fullmatch(k.removeprefix(prefix)) for p in ignored)]
    if unused:
        raise CheckpointError(f"checkpoint tensors that no mechscope parameter reads: {unused[:8]}")


def _find(source: Mapping[str, Tensor], prefix: str, name: str, fallback: str | None) -> str:
    for candidate in (name, prefix + name, fallback and prefix + fallback, fallback):
        if candidate and candidate in source:
            return candidate
    raise CheckpointError(f"checkpoint has no tensor {prefix + name!r}")
