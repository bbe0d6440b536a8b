"""Reading HuggingFace checkpoints: the config through transformers, the weights tensor by
tensor from safetensors, and their conversion into a mechscope model built on the meta device.

Weights stream: the model is allocated empty, and each HuggingFace tensor is read (memory
mapped), reshaped and copied into place one at a time, so loading never holds a second full
copy of the model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from mechscope.loading.families import Family
from mechscope.loading.families.base import Transform
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
    """The tensors of a (possibly sharded) safetensors checkpoint, read lazily by name.

    Each read opens its file with safetensors' ``safe_open`` and closes it again. ``safe_open``
    memory-maps the file and returns tensors that are views of the mapping; mapped pages count
    as resident memory for as long as the mapping lives, so one handle kept open for the whole
    load would add the checkpoint's size on top of the model being filled. Opened per read,
    each mapping lives only as long as its tensor, which the loader drops once copied. The
    last tensor read is kept, so consecutive reads of one tensor (GPT-2's fused ``c_attn``
    gives Q, K and V) read it once.
    """

    def __init__(self, files: list[Path], stack: ExitStack | None = None) -> None:
        from safetensors import safe_open

        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    self._files[key] = file
                    self._shapes[key] = tuple(handle.get_slice(key).get_shape())
        self._last: tuple[str, Tensor] | None = None

    def __getitem__(self, key: str) -> Tensor:
        from safetensors import safe_open

        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self._last = None  # let the previous tensor go before reading the next
        with safe_open(str(self._files[key]), framework="pt", device="cpu") as handle:
            tensor = handle.get_tensor(key)  # a view of a mapping of the file, unmapped when dropped
        self._last = (key, tensor)
        return tensor

    def numel(self, key: str) -> int:
        """The number of elements of tensor ``key``, from the file's header, without reading it."""
        return math.prod(self._shapes[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


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
    tensors in the checkpoint that nothing reads are an error, not silently dropped.

    Every parameter's tensor is found, and unused tensors reported, before anything is read.
    The largest tensors are then read first (the embeddings, while the rest of the model is
    still untouched memory), and each is dropped as soon as it is copied, so the peak stays
    close to the model's own size.
    """
    prefix = _checkpoint_prefix(source, family)
    plan = [(param, name, *_rule_for(name, source, prefix, family)) for name, param in model.named_parameters()]
    ignored = [re.compile(pattern) for pattern in family.ignored]
    used = {key for *_, key in plan}
    unused = [k for k in source if k not in used and not any(p.fullmatch(k.removeprefix(prefix)) for p in ignored)]
    if unused:
        raise CheckpointError(f"checkpoint tensors that no mechscope parameter reads: {unused[:8]}")
    size = source.numel if isinstance(source, SafetensorsSource) else (lambda key: source[key].numel())
    plan.sort(key=lambda entry: (-size(entry[-1]), entry[-1]))  # largest first; one tensor's readers together
    with torch.no_grad():
        for param, name, transform, key in plan:
            value = transform(source[key], model.cfg)
            if value.shape != param.shape:
                raise CheckpointError(
                    f"{key} gives shape {tuple(value.shape)} for {name}, which needs {tuple(param.shape)}"
                )
            param.copy_(value)
            del value


def _rule_for(name: str, source: Mapping[str, Tensor], prefix: str, family: Family) -> tuple[Transform, str]:
    """The transform and the checkpoint tensor that fill mechscope parameter ``name``."""
    layer = re.match(r"blocks\.(\d+)\.", name)
    template = "blocks.{i}." + name[layer.end() :] if layer else name
    if template not in family.weights:
        raise CheckpointError(f"the family table has no rule for parameter {name!r}")
    rule = family.weights[template]
    fill = {"i": layer.group(1)} if layer else {}
    fallbacks = (rule.fallback,) if isinstance(rule.fallback, str) else (rule.fallback or ())
    return rule.transform, _find(source, prefix, rule.name.format(**fill), [f.format(**fill) for f in fallbacks])


def _find(source: Mapping[str, Tensor], prefix: str, name: str, fallbacks: list[str]) -> str:
    for candidate in (name, prefix + name, *(c for f in fallbacks for c in (prefix + f, f))):
        if candidate in source:
            return candidate
    raise CheckpointError(f"checkpoint has no tensor {prefix + name!r}")
