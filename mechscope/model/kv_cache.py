"""The key-value cache: what attention remembers between generation steps.

A new token's query must see the keys and values of every earlier token. Those never change
(a causal model's earlier positions do not look ahead), so instead of re-running the prompt at
every step the model keeps them here, per layer, and each step computes only the new tokens.
Keys are stored after the rotary rotation, so each is rotated once, at its own position.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


class KeyValueCache:
    """Per-layer keys and values of the tokens seen so far, plus which of them are padding."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers
        self.padding_mask: Int[Tensor, "batch seen"] | None = None  # 1 = real token, 0 = padding
        self.has_padding = False  # whether any key seen so far may be padding

    @property
    def n_seen(self) -> int:
        return 0 if self.padding_mask is None else self.padding_mask.shape[1]

    def n_real(self) -> Int[Tensor, " batch"] | None:
        """Real (non-padding) tokens seen by each row, from which new positions count on."""
        return None if self.padding_mask is None else self.padding_mask.sum(-1)

    def extend_mask(
        self, new_mask: Int[Tensor, "batch new"] | None, shape: tuple[int, int], device: torch.device
    ) -> Int[Tensor, "batch seen_plus_new"] | None:
        """Record the padding of the new tokens (``shape`` ``[batch, new]``; ``None``: all real, as
        in a generation step). Returns the mask over every key, or None while no key is padding,
        so a cache that never saw padding costs no mask (and no host-device sync) per step."""
        if new_mask is None:
            new_mask = torch.ones(shape, dtype=torch.long, device=device)
        else:  # the model passes masks with padding only (an all-ones mask arrives as None)
            self.has_padding = True
        self.padding_mask = new_mask if self.padding_mask is None else torch.cat([self.padding_mask, new_mask], dim=1)
        return self.padding_mask if self.has_padding else None

    def append(
        self,
        layer: int,
        keys: Float[Tensor, "batch new kv_head d_head"],
        values: Float[Tensor, "batch new kv_head d_head"],
    ) -> tuple[Float[Tensor, "batch all kv_head d_head"], Float[Tensor, "batch all kv_head d_head"]]:
        """Add this step's keys and values for ``layer``; returns all of them so far."""
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys], dim=1)
            values = torch.cat([self.values[layer], values], dim=1)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

    def truncate(self, n: int) -> None:
        """Forget everything after the first ``n`` tokens (undoing a step that failed)."""
        self.keys = [None if k is None or n == 0 else k[:, :n] for k in self.keys]
        self.values = [None if v is None or n == 0 else v[:, :n] for v in self.values]
        if self.padding_mask is not None:
            self.padding_mask = self.padding_mask[:, :n] if n else None

    def select(self, rows: Tensor) -> None:
        """Keep only the given batch rows (e.g. dropping sequences that finished)."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]
        if self.padding_mask is not None:
            self.padding_mask = self.padding_mask[rows]
