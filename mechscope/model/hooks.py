"""Hook points: named places in the forward pass where a function can read or replace a tensor.

A :class:`HookPoint` is an identity module. Functions attached to it see the activation as it
passes (``fn(activation, hook)``) and may return a replacement. Because every hook point knows
whether anything is attached, the model can skip work nobody asked for: the attention pattern
is only materialised when ``hook_pattern`` or ``hook_attn_scores`` is in use, per-head inputs
only when ``hook_q_input`` and friends are, and so on.

Backward hooks are attached to the activation tensor during the forward pass, so they fire
whenever that graph is differentiated, even after the ``with`` block that added them ends.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
NameFilter = str | Iterable[str] | Callable[[str], bool] | None
Direction = Literal["fwd", "bwd"]


class HookNameError(KeyError):
    """An unknown hook name; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


class HookShapeError(ValueError):
    """A hook returned a tensor whose shape differs from the activation it replaces."""


@dataclass
class HookHandle:
    """Detaches one function from one hook point when ``remove()`` is called."""

    point: HookPoint
    fn: HookFn
    direction: Direction

    def remove(self) -> None:
        fns = self.point.fwd_fns if self.direction == "fwd" else self.point.bwd_fns
        if self.fn in fns:
            fns.remove(self.fn)


class HookPoint(nn.Module):
    """An identity module that hands the tensor passing through to the attached functions.

    ``opt_in`` marks hook points whose activation costs extra to produce (per-head results and
    inputs); they are cached only when named explicitly, never by ``names_filter=None``.
    """

    def __init__(self, opt_in: bool = False) -> None:
        super().__init__()
        self.fwd_fns: list[HookFn] = []
        self.bwd_fns: list[HookFn] = []
        self.opt_in = opt_in
        self.name: str = ""  # set by the model once the module tree is built

    @property
    def is_active(self) -> bool:
        return bool(self.fwd_fns or self.bwd_fns)

    def layer(self) -> int | None:
        """The block index this hook point belongs to, or None for embeddings / final norm."""
        match = re.match(r"blocks\.(\d+)\.", self.name)
        return int(match.group(1)) if match else None

    def add_hook(self, fn: HookFn, direction: Direction = "fwd") -> HookHandle:
        if direction not in ("fwd", "bwd"):
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {direction!r}")
        (self.fwd_fns if direction == "fwd" else self.bwd_fns).append(fn)
        return HookHandle(self, fn, direction)

    def remove_hooks(self) -> None:
        self.fwd_fns.clear()
        self.bwd_fns.clear()

    def forward(self, x: Tensor) -> Tensor:
        for fn in self.fwd_fns:
            replacement = fn(x, self)
            if replacement is not None:
                x = self._checked(replacement, x, "forward")
        if self.bwd_fns and x.requires_grad:
            for fn in self.bwd_fns:
                x.register_hook(self._backward_adapter(fn))
        return x

    def _backward_adapter(self, fn: HookFn) -> Callable[[Tensor], Tensor | None]:
        def on_grad(grad: Tensor) -> Tensor | None:
            replacement = fn(grad, self)
            return None if replacement is None else self._checked(replacement, grad, "backward")

        return on_grad

    def _checked(self, replacement: object, original: Tensor, direction: str) -> Tensor:
        if not isinstance(replacement, Tensor):
            raise TypeError(
                f"{direction} hook on {self.name!r} returned {type(replacement).__name__}; return a Tensor or None"
            )
        if replacement.shape != original.shape:
            raise HookShapeError(
                f"{direction} hook on {self.name!r} returned shape {tuple(replacement.shape)}, "
                f"but the activation has shape {tuple(original.shape)}"
            )
        return replacement

    def extra_repr(self) -> str:
        return f"name={self.name!r}" + (", opt_in=True" if self.opt_in else "")


def resolve(hook_points: Mapping[str, HookPoint], names: NameFilter) -> list[HookPoint]:
    """The hook points selected by a name, a list of names, a predicate, or None (all standard).

    Unknown names raise :class:`HookNameError` naming the closest valid names.
    """
    if names is None:
        return [p for p in hook_points.values() if not p.opt_in]
    if callable(names):
        return [p for name, p in hook_points.items() if names(name)]
    if isinstance(names, str):
        names = [names]
    selected = []
    for name in names:
        if name not in hook_points:
            raise HookNameError(unknown_name_message(name, hook_points))
        selected.append(hook_points[name])
    return selected


def unknown_name_message(name: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f"closest valid names: {', '.join(close)}" if close else f"{len(valid)} names exist"
    return f"unknown hook name {name!r}; {hint} (see model.hook_dict for all)"


@contextmanager
def attached(
    hook_points: Mapping[str, HookPoint],
    fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
    bwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
) -> Iterator[list[HookHandle]]:
    """Attach hooks for the duration of a ``with`` block; they are removed even on error."""
    handles: list[HookHandle] = []
    try:
        for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
            for names, fn in pairs:
                for point in resolve(hook_points, names):
                    handles.append(point.add_hook(fn, direction))
        yield handles
    finally:
        for handle in handles:
            handle.remove()
