"""Splitting a model's layers across several devices (pipeline placement for big models).

The plan is contiguous and balanced: block ``i`` of ``n`` goes to device ``i · k // n`` of
``k``, the embeddings sit with the first block and the final norm and unembedding with the
last. The forward pass moves the residual stream to each block's device as it goes, so hooks
see every activation on the device that computed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mechscope.model.transformer import Transformer

DeviceLike = torch.device | str | int


def layer_plan(n_layers: int, devices: Sequence[DeviceLike]) -> list[torch.device]:
    """The device of each block: consecutive blocks share a device, counts differ by at most one."""
    if not devices:
        raise ValueError("give at least one device")
    if len(devices) > n_layers:
        raise ValueError(f"cannot split {n_layers} layers across {len(devices)} devices: use at most {n_layers}")
    resolved = [torch.device(d) for d in devices]
    return [resolved[i * len(resolved) // n_layers] for i in range(n_layers)]


def devices_for(device: DeviceLike | Sequence[DeviceLike] | None, n_devices: int | None) -> list[torch.device]:
    """The devices to place a model on: an explicit list, or the first ``n_devices`` of a kind."""
    if isinstance(device, Sequence) and not isinstance(device, str):
        if n_devices is not None and n_devices != len(device):
            raise ValueError(f"n_devices={n_devices} but {len(device)} devices were listed")
        return [torch.device(d) for d in device]
    base = torch.device(device if device is not None else "cpu")
    if n_devices is None or n_devices == 1:
        return [base]
    if base.type == "cpu":
        return [base] * n_devices  # nothing to split onto; useful to exercise the plan on a CPU
    available = torch.cuda.device_count() if base.type == "cuda" else 1
    if n_devices > available:
        raise ValueError(f"n_devices={n_devices} but only {available} {base.type} device(s) are available")
    return [torch.device(base.type, i) for i in range(n_devices)]


def place(model: Transformer, devices: Sequence[DeviceLike], empty: bool = False) -> Transformer:
    """Move (or, with ``empty``, allocate uninitialised) every part of ``model`` on its device."""
    plan = layer_plan(model.cfg.n_layers, devices)

    def put(module: torch.nn.Module, device: torch.device) -> None:
        module.to_empty(device=device, recurse=True) if empty else module.to(device)

    for name, module in model.named_children():
        if name == "blocks":
            for block, device in zip(model.blocks, plan, strict=True):
                put(block, device)
        elif name in ("ln_final", "unembed"):
            put(module, plan[-1])
        else:
            put(module, plan[0])
    model.layer_devices = plan if len(set(plan)) > 1 else None
    return model
