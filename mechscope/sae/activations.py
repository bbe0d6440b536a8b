"""The activation store: a hook point's activations, streamed from a model into shuffled batches.

Token rows go through the model only as far as the hook (``stop_at_layer``; after the last block,
``ln_final`` but never the unembedding), positions holding a BOS, EOS or padding token (or masked
out) are dropped (their activations are outliers), and the rest fill a buffer of
``buffer_batches * batch_tokens`` rows, which is shuffled and handed out a batch at a time; when it
is empty the next buffer is filled. Nothing else is held: the buffer is never larger than that, and
the model runs ``forward_rows`` token rows at a time. By default the buffer holds at least
``MIN_BUFFER_SEQUENCES`` sequences' worth of rows (and 8 batches), so that a batch mixes many
contexts even when one context is as long as a batch.

Resuming is exact: ``state_dict()`` records where the current buffer's tokens started and the
shuffle generator's state before it was drawn, plus how many batches it has handed out; a fresh
store given that state recomputes the same buffer and continues with the very next batch.

With ``cache_dir`` the store first writes ``cache_tokens`` activations there (in stream order,
``shard_tokens`` rows per safetensors shard, each written to a temporary file and renamed, then
``cache.json`` last), and from then on (and in any later store on that directory) reads shards
instead of running the model, in a new shard order each epoch, through the same shuffle buffer.
``cache.json`` holds a fingerprint of what was cached (the model's shape and a hash of its config
and weights, the context, the token source where it can be named); a store whose own differs is
refused, naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor, nn

from mechscope.loading import tokens as tok
from mechscope.model.hooks import unknown_name_message
from mechscope.sae.base import SAEError
from mechscope.sae.token_sources import TokenSource, token_source
from mechscope.toys.checkpoint import atomic_save_tensors, atomic_write_text, setting_differences

__all__ = ["ActivationStore", "TokenSource", "token_source"]

Batch = (
    Float[Tensor, "batch_tokens d_in"] | tuple[Float[Tensor, "batch_tokens d_in"], Float[Tensor, "batch_tokens d_out"]]
)
Row = tuple[Int[Tensor, " seq"], Int[Tensor, " seq"] | None]  # tokens and their attention mask (None: all real)
MANIFEST = "cache.json"
NOT_POSITIONAL = ("hook_pattern", "hook_attn_scores")  # [batch, head, query, key]: no one row per position
MIN_BUFFER_SEQUENCES = 256  # the default buffer spans at least this many contexts, so batches mix them
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def stop_layer(hook_names: list[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hook: ``blocks.L.*`` needs L + 1, embeddings 0."""
    layers = []
    for name in hook_names:
        if match := _BLOCK.match(name):
            layers.append(int(match.group(1)) + 1)
        elif name in ("hook_embed", "hook_pos_embed"):
            layers.append(0)
        else:  # after the last block (ln_final): the whole stack, but no unembedding
            return None
    return max(layers)


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The order shards are read in one epoch, a pure function of (seed, epoch)."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))
    return torch.randperm(n_shards, generator=generator).tolist()


class ModelStream:
    """Kept-position activations of the hooks, in stream order, computed from token rows."""

    def __init__(
        self,
        model: nn.Module,
        hooks: list[str],
        rows: Iterator,
        context: int,
        forward_rows: int,
        drop_ids: list[int],
        device: torch.device,
    ) -> None:
        self.model, self.hooks, self.rows, self.context = model, hooks, rows, context
        self.forward_rows, self.drop_ids, self.device = forward_rows, torch.tensor(drop_ids, dtype=torch.long), device
        self.stop = stop_layer(hooks)
        self.pending: Row | None = None  # the last row read, part of whose positions are still to come
        self.skip = 0  # positions of ``pending`` already handed out
        self.rows_read = 0

    def keep(self, tokens: Int[Tensor, "*rows seq"], mask: Tensor | None) -> Tensor:
        """Positions whose activations are used: real tokens that are not BOS / EOS / padding."""
        kept = ~torch.isin(tokens, self.drop_ids)
        return kept if mask is None else kept & mask.bool()

    def next_row(self) -> Row:
        item = next(self.rows)
        tokens, mask = item if isinstance(item, tuple) else (item, None)
        tokens = torch.as_tensor(tokens)
        if tokens.shape != (self.context,) or (mask is not None and torch.as_tensor(mask).shape != (self.context,)):
            raise SAEError(f"token rows must have shape [{self.context}] (context), got {tuple(tokens.shape)}")
        self.rows_read += 1
        return tokens.long(), None if mask is None else torch.as_tensor(mask).long()

    def read(self, n: int) -> list[Tensor]:
        """The next ``n`` activation rows per hook (fewer only when a finite token source ends)."""
        rows, available = [], 0
        if self.pending is not None:
            rows, available = [self.pending], int(self.keep(*self.pending).sum()) - self.skip
        while available < n:
            try:
                rows.append(self.next_row())
            except StopIteration:
                break
            available += int(self.keep(*rows[-1]).sum())
        out = self.run(rows, self.skip, min(n, available))
        if available > n:  # the last row is only partly used: it starts the next read
            self.pending, self.skip = rows[-1], int(self.keep(*rows[-1]).sum()) - (available - n)
        else:
            self.pending, self.skip = None, 0
        return out

    def run(self, rows: list[Row], skip: int, n: int) -> list[Tensor]:
        """Run ``rows`` through the model, ``forward_rows`` at a time; kept positions ``skip ... skip + n``."""
        out: list[Tensor] = []
        filled = 0
        for start in range(0, len(rows), self.forward_rows):
            for i, acts in enumerate(self.forward(rows[start : start + self.forward_rows])):
                if len(out) <= i:
                    out.append(torch.empty(n, acts.shape[1], dtype=acts.dtype, device=self.device))
                used = acts[skip : skip + n - filled]
                out[i][filled : filled + len(used)] = used
            filled, skip = filled + len(used), max(0, skip - len(acts))
        return out if out else [torch.empty(0, 0, device=self.device) for _ in self.hooks]

    @torch.no_grad()
    def forward(self, rows: list[Row]) -> list[Float[Tensor, "kept d"]]:
        """One forward pass, stopped after the hooks; each hook's activations at kept positions."""
        tokens, mask = stack(rows)
        device = next(self.model.parameters()).device
        options = {} if mask is None else {"attention_mask": mask.to(device)}
        acts = self.activations(tokens.to(device), options)
        kept = self.keep(tokens, mask).to(self.device)
        return [acts[name].to(self.device).flatten(2)[kept] for name in self.hooks]

    def activations(self, tokens: Int[Tensor, "rows seq"], options: dict[str, Any]) -> dict[str, Tensor]:
        """Each hook's activations; past the last block ``ln_final`` runs alone, never the unembedding."""
        final = [name for name in self.hooks if name.startswith("ln_final.")]
        last = f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post"
        names = list(dict.fromkeys([name for name in self.hooks if name not in final] + ([last] if final else [])))
        _, cache = self.model.run_with_cache(
            tokens, return_type=None, names_filter=names, stop_at_layer=self.stop, **options
        )  # return_type=None: the blocks only (stop_at_layer stops earlier still)
        acts = {name: cache[name] for name in names}
        if final:  # what forward does after the blocks, without the logits

            def save(activation: Tensor, hook: Any) -> None:
                acts[hook.name] = activation

            with self.model.hooks(fwd_hooks=[(final, save)]):
                self.model.ln_final(acts[last].to(self.model.W_U.device))
        return acts

    def state_dict(self) -> dict[str, Tensor]:
        source = self.rows.state_dict() if hasattr(self.rows, "state_dict") else {}
        tokens, mask = self.pending if self.pending is not None else (torch.zeros(0, dtype=torch.long), None)
        return {
            **{f"source.{k}": v for k, v in source.items()},
            "rows_read": torch.tensor(self.rows_read),
            "pending": tokens,
            "pending_mask": torch.zeros(0, dtype=torch.long) if mask is None else mask,
            "skip": torch.tensor(self.skip),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        rows_read = int(state["rows_read"])
        if hasattr(self.rows, "load_state_dict"):
            self.rows.load_state_dict(
                {k.removeprefix("source."): v for k, v in state.items() if k.startswith("source.")}
            )
        elif rows_read < self.rows_read:
            raise SAEError(
                "this store's token iterator is past the saved position and cannot seek back: use a fresh one"
            )
        else:  # a plain iterator: skip the rows the saved store had read
            for _ in range(rows_read - self.rows_read):
                next(self.rows)
        self.rows_read, self.skip = rows_read, int(state["skip"])
        pending = state["pending"]
        self.pending = (
            None if len(pending) == 0 else (pending, state["pending_mask"] if len(state["pending_mask"]) else None)
        )


class ShardStream:
    """Cached activation rows, shard after shard (a new shard order each epoch), read a slice at a time."""

    def __init__(self, directory: Path, manifest: dict[str, Any], seed: int, device: torch.device) -> None:
        self.directory, self.shards, self.seed, self.device = directory, manifest["shards"], seed, device
        self.names = ["x", "y"] if manifest["output_hook_name"] else ["x"]
        self.epoch, self.index, self.offset = 0, 0, 0  # shard ``index`` of this epoch's order, rows read from it

    def read(self, n: int) -> list[Tensor]:
        parts: list[list[Tensor]] = [[] for _ in self.names]
        while n > 0:
            shard = self.shards[shard_order(len(self.shards), self.seed, self.epoch)[self.index]]
            take = min(n, shard["rows"] - self.offset)
            with safe_open(str(self.directory / shard["file"]), framework="pt") as f:
                for part, name in zip(parts, self.names, strict=True):
                    part.append(f.get_slice(name)[self.offset : self.offset + take].to(self.device))
            n, self.offset = n - take, self.offset + take
            if self.offset == shard["rows"]:
                self.index, self.offset = self.index + 1, 0
                if self.index == len(self.shards):
                    self.epoch, self.index = self.epoch + 1, 0
        return [torch.cat(part) for part in parts]

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "epoch": torch.tensor(self.epoch),
            "index": torch.tensor(self.index),
            "offset": torch.tensor(self.offset),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.epoch, self.index, self.offset = (int(state[k]) for k in ("epoch", "index", "offset"))


def write_cache(
    stream: ModelStream, directory: Path, n_rows: int, shard_tokens: int, fingerprint: dict[str, Any]
) -> dict[str, Any]:
    """Write ``n_rows`` activations (fewer if the tokens end) as shards, then the manifest, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, written, d_in = [], 0, None
    while written < n_rows:
        acts = stream.read(min(shard_tokens, n_rows - written))
        if len(acts[0]) == 0:
            break
        d_in = int(acts[0].shape[1])
        name = f"shard_{len(shards):05d}.safetensors"
        atomic_save_tensors(directory / name, dict(zip(["x", "y"], acts, strict=False)))
        shards.append({"file": name, "rows": len(acts[0])})
        written += len(acts[0])
    if not shards:
        raise SAEError("the token source gave no activations to cache")
    manifest = {
        "version": 2,
        "hook_name": stream.hooks[0],
        "n_rows": written,
        "d_in": d_in,
        "shards": shards,
        "output_hook_name": stream.hooks[1] if len(stream.hooks) > 1 else None,
        "fingerprint": fingerprint,
    }
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


class ActivationStore:
    """Shuffled batches of a hook point's activations (``(x, y)`` pairs when ``output_hook_name`` is set).

    ``tokens`` is an iterator of ``[context]`` token rows (or ``(tokens, attention_mask)`` pairs), or
    anything :func:`token_source` reads (then tokenised with the model's tokenizer). Positions whose
    token is in ``drop_tokens`` (default: the tokenizer's BOS, EOS and padding ids) or masked out give
    no activations. ``forward_rows`` token rows go through the model at once (default
    ``batch_tokens // context``). ``buffer_batches`` defaults to enough batches for
    ``MIN_BUFFER_SEQUENCES`` contexts (at least 8). See the module docstring for ``cache_dir``.
    ``data_settings`` is what a training run records about this data (and checks on resume).
    """

    def __init__(
        self,
        model: nn.Module,
        hook_name: str,
        tokens: Iterator | str | Path | Tensor | Callable | None,
        *,
        batch_tokens: int,
        context: int,
        buffer_batches: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        output_hook_name: str | None = None,
        cache_dir: Path | str | None = None,
        cache_tokens: int | None = None,
        shard_tokens: int | None = None,
        forward_rows: int | None = None,
        drop_tokens: list[int] | None = None,
    ) -> None:
        for name, value in (("batch_tokens", batch_tokens), ("context", context), ("buffer_batches", buffer_batches)):
            if value is not None and value < 1:
                raise SAEError(f"{name} must be at least 1, got {value}")
        buffer_batches = buffer_batches or max(8, math.ceil(MIN_BUFFER_SEQUENCES * context / batch_tokens))
        n_ctx = model.cfg.n_ctx
        if context > n_ctx:
            raise SAEError(f"context={context} is longer than the model's context length n_ctx={n_ctx}")
        self.hooks = [check_hook(model, name) for name in (hook_name, output_hook_name) if name]
        self.batch_tokens, self.buffer_rows = batch_tokens, buffer_batches * batch_tokens
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)
        if tokens is not None and not isinstance(tokens, Iterator):
            tokens = token_source(tokens, tokenizer=getattr(model, "tokenizer", None), seq_len=context, seed=seed)
        described = tokens.describe() if isinstance(tokens, TokenSource) else {}
        self.fingerprint = {**model_fingerprint(model), "context": context, **described}
        self.data_settings = {**self.fingerprint, "hooks": self.hooks, "seed": seed, "buffer_rows": self.buffer_rows}
        self.data_settings["cache_dir"] = None if cache_dir is None else str(cache_dir)
        self.stream = self._model_stream(model, tokens, context, forward_rows, drop_tokens)
        if cache_dir is not None:
            self.stream = self._cache(Path(cache_dir), cache_tokens, shard_tokens, seed)
        if self.stream is None:
            raise SAEError("tokens is None: pass token rows or a source, or a cache_dir holding a complete cache")
        self._buffer: list[Tensor] | None = None
        self._order: Tensor | None = None
        self._next = self._n_batches = self._skip = 0
        self._start: tuple[dict[str, Tensor], Tensor] | None = None  # (stream, generator) state before this buffer

    # ------------------------------------------------------------ setup
    def _model_stream(self, model, tokens, context, forward_rows, drop_tokens) -> ModelStream | None:
        tokenizer = getattr(model, "tokenizer", None)
        if tokens is None:
            return None
        if drop_tokens is None:
            drop_tokens = [] if tokenizer is None else special_ids(tokenizer)
        forward_rows = forward_rows if forward_rows is not None else max(1, self.batch_tokens // context)
        if forward_rows < 1:
            raise SAEError(f"forward_rows must be at least 1, got {forward_rows}")
        return ModelStream(model, self.hooks, tokens, context, forward_rows, drop_tokens, self.device)

    def _cache(self, directory: Path, cache_tokens: int | None, shard_tokens: int | None, seed: int) -> ShardStream:
        """Read the cache in ``directory``, writing it first if it is not complete."""
        shard_tokens = self.buffer_rows if shard_tokens is None else shard_tokens
        if not 1 <= shard_tokens <= self.buffer_rows:
            raise SAEError(
                f"shard_tokens must be between 1 and buffer_batches * batch_tokens = {self.buffer_rows}, "
                f"got {shard_tokens}"
            )
        if (directory / MANIFEST).exists():
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        elif self.stream is None or cache_tokens is None or cache_tokens < 1:
            raise SAEError(
                f"cache_dir {directory} holds no complete cache ({MANIFEST}): to write one, pass tokens and "
                f"cache_tokens (how many activation rows to cache, at least 1), got {cache_tokens}"
            )
        else:
            manifest = write_cache(self.stream, directory, cache_tokens, shard_tokens, self.fingerprint)
        cached = [manifest["hook_name"]] + ([manifest["output_hook_name"]] if manifest["output_hook_name"] else [])
        if cached != self.hooks:
            raise SAEError(f"cache_dir {directory} caches {cached}, not the hooks asked for: {self.hooks}")
        stored = manifest.get("fingerprint", {})  # only what this store knows is compared (no tokens: no source)
        known = {"fingerprint": {key: stored.get(key) for key in self.fingerprint}}
        differences = setting_differences(
            known, {"fingerprint": self.fingerprint}, ("fingerprint",), where="in the cache"
        )
        if differences:
            raise SAEError(
                f"cache_dir {directory} was written for other data ({'; '.join(differences)}): "
                "choose another cache_dir, or delete this one to cache again"
            )
        return ShardStream(directory, manifest, seed, self.device)

    # ------------------------------------------------------------ batches
    def __iter__(self) -> ActivationStore:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def next_batch(self) -> Batch:
        """The next shuffled batch; refills the buffer when it is used up."""
        if self._buffer is None or self._next >= self._n_batches:
            self._refill()
        if self._next >= self._n_batches:
            raise StopIteration
        index = self._order[self._next * self.batch_tokens : (self._next + 1) * self.batch_tokens]
        self._next += 1
        batch = tuple(buffer.index_select(0, index) for buffer in self._buffer)
        return batch if len(batch) > 1 else batch[0]

    def _refill(self) -> None:
        self._buffer = None  # free the old buffer before filling the new one
        self._start = (self.stream.state_dict(), self.generator.get_state())
        self._buffer = self.stream.read(self.buffer_rows)
        rows = len(self._buffer[0])
        self._order = torch.randperm(rows, generator=self.generator).to(self.device)
        self._n_batches = rows // self.batch_tokens
        self._next, self._skip = min(self._skip, self._n_batches), 0

    # ------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Tensor]:
        """Where this store is, as a flat dict of tensors (fits a safetensors checkpoint)."""
        if self._buffer is None or self._next >= self._n_batches:  # between buffers: the live state
            stream, rng, done = self.stream.state_dict(), self.generator.get_state(), self._skip
        else:
            (stream, rng), done = self._start, self._next
        return {
            "cached": torch.tensor(int(isinstance(self.stream, ShardStream))),
            "rng": rng,
            "batches_done": torch.tensor(done),
            **{f"stream.{k}": v for k, v in stream.items()},
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue exactly where the store that saved ``state`` was."""
        if int(state["cached"]) != int(isinstance(self.stream, ShardStream)):
            raise SAEError(
                "the state was saved by a store reading "
                + ("a cache" if int(state["cached"]) else "a model")
                + ": give cache_dir the same way when resuming"
            )
        self.stream.load_state_dict({k.removeprefix("stream."): v for k, v in state.items() if k.startswith("stream.")})
        self.generator.set_state(state["rng"])
        self._buffer, self._skip = None, int(state["batches_done"])


def stack(rows: list[Row]) -> tuple[Int[Tensor, "rows seq"], Int[Tensor, "rows seq"] | None]:
    """Token rows as one batch, with an attention mask only if some row has padding."""
    tokens = torch.stack([t for t, _ in rows])
    if all(m is None for _, m in rows):
        return tokens, None
    return tokens, torch.stack([torch.ones_like(t) if m is None else m for t, m in rows])


def check_hook(model: nn.Module, name: str) -> str:
    """``name`` if the model has that hook point and it gives one activation vector per position."""
    if name not in model.hook_dict:
        raise SAEError(f"hook_name: {unknown_name_message(name, model.hook_dict)}")
    if name.endswith(NOT_POSITIONAL):
        raise SAEError(f"hook_name {name!r} is indexed by query and key positions; SAEs read one vector per position")
    return name


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Which model made some activations: its shape, and a hash of its config and the first values of each weight."""
    digest = hashlib.sha256(model.cfg.to_json().encode())
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return {"d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers, "model_sha256": digest.hexdigest()[:16]}


def special_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's BOS, EOS and padding ids: positions holding them are dropped."""
    ids = {tok.bos_id(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)
