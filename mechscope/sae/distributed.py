"""Data-parallel SAE training and activation harvesting over ``torch.distributed`` (``torchrun``).

Every rank holds the same SAE and streams its own share of the token rows: row ``i`` of the
stream goes to rank ``i % world_size``, so the ranks together read exactly the rows one process
would (rows are independent: each starts with its own BOS), and a step's global batch of
``batch_tokens`` activations is split ``batch_tokens // world_size`` per rank. Each rank computes
its local losses; the gradients are averaged over the ranks before the update, so every rank
takes the same step that one process would take on the whole batch (up to float summation order).
The dead-latent counters see which latents fired on any rank, logged metrics are those of the
global batch, and only rank 0 writes the run folder; each rank's store position goes into the
checkpoint under its rank, so ``resume`` works on the same number of ranks.

Launch with ``torchrun --nproc_per_node N`` (or ``python -m torch.distributed.run``): the
backend is NCCL on CUDA (one GPU per local rank) and gloo on CPU. Without torchrun's variables
everything here is a no-op for a single process. Across machines the output folder must be on
a shared filesystem (every rank reads the checkpoint when resuming).

BatchTopK picks its ``batch · k`` latents within each rank's local batch, and its inference
threshold is averaged over the ranks after every step, so it is not bit-for-bit the
single-process run (the other architectures are).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechscope.sae.activations import ActivationStore
from mechscope.sae.base import SAEError
from mechscope.sae.token_sources import TokenSource, token_source

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------ the process group
def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); returns this rank's device.

    Without torchrun's variables (or with ``WORLD_SIZE=1``) nothing is initialised and the run is
    a single process. Calling it again once initialised is harmless.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise SAEError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun --nproc_per_node N")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise SAEError(f"backend must be 'nccl' (CUDA) or 'gloo' (CPU), got {backend!r}")
    if backend == "nccl":
        if not cuda:
            raise SAEError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return device


def close_distributed() -> None:
    """Leave the process group (end of a torchrun job); a no-op for a single process."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Number of processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    if world_size() > 1:
        dist.barrier()


def local_batch_tokens(batch_tokens: int, world: int | None = None) -> int:
    """Each rank's share of a global batch; the ranks must split it evenly."""
    world = world_size() if world is None else world
    if batch_tokens % world:
        raise SAEError(f"batch_tokens={batch_tokens} must be divisible by the world size {world} (one share per rank)")
    return batch_tokens // world


# ------------------------------------------------------------------------------ collectives used in training
def _comm_device(tensor: Tensor) -> Tensor:
    """NCCL reduces CUDA tensors only; gloo takes CPU ones."""
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Elementwise sum over the ranks (the tensor itself for one process)."""
    if world_size() == 1:
        return tensor
    buffer = _comm_device(tensor.clone())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def mean_over_ranks(tensor: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """Elementwise mean over the ranks."""
    return sum_over_ranks(tensor) / world_size() if world_size() > 1 else tensor


def any_rank(mask: Bool[Tensor, " n"]) -> Bool[Tensor, " n"]:
    """True where the mask is true on at least one rank (latents that fired anywhere)."""
    return sum_over_ranks(mask.to(torch.int32)) > 0 if world_size() > 1 else mask


@torch.no_grad()
def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks, in one all-reduce of one flat buffer.

    A parameter without a gradient on some rank counts zero there; one without a gradient on
    every rank keeps none (as in one process, where the optimiser then skips it).
    """
    if world_size() == 1:
        return
    parameters = list(parameters)
    present = sum_over_ranks(torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32))
    used = [p for p, n in zip(parameters, present.tolist(), strict=True) if n > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not used:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in used])
    flat = sum_over_ranks(flat) / world_size()
    offset = 0
    for p in used:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchTopK's threshold) so the ranks' copies stay equal."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.copy_(mean_over_ranks(buffer))


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (as DDP does at start)."""
    if world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        buffer = _comm_device(tensor.data.clone())
        dist.broadcast(buffer, src=0)
        tensor.data.copy_(buffer.to(tensor.device))


def gather_states(state: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Every rank's state dict (CPU tensors), in rank order; only rank 0's list is filled."""
    state = {k: v.detach().cpu() for k, v in state.items()}
    if world_size() == 1:
        return [state]
    states: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(state, states, dst=0)
    return states if states is not None else []


@torch.no_grad()
def global_sum_of_squares(target: Float[Tensor, "batch d"]) -> Float[Tensor, ""]:
    """Σ‖x − mean x‖² over the global batch, combined from each rank's share (Chan et al.'s update)."""
    mean = target.mean(0)
    local = (target - mean).pow(2).sum()
    if world_size() == 1:
        return local
    n = len(target)
    parts = sum_over_ranks(torch.cat([local[None], n * mean.pow(2).sum()[None], n * mean]).double())
    total = parts[0] + parts[1] - parts[2:].pow(2).sum() / (n * world_size())
    return total.to(target.dtype)


# ------------------------------------------------------------------------------ each rank's share of the data
class ShardedSource(TokenSource):
    """Row ``i`` of ``source`` for ``i % world == rank``: the ranks together read every row once.

    Each rank reads the whole underlying stream and keeps its rows (every rank must build the
    same stream: the same spec and seed); a finite stream ends for all ranks at the last full
    round of ``world`` rows. The state is the underlying source's, always at a round's start.
    """

    def __init__(self, source: Iterator[Tensor], rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise SAEError(f"rank must be in [0, world_size={world}), got {rank}")
        self.source, self.rank, self.world = source, rank, world

    @property
    def epoch(self) -> int:
        return getattr(self.source, "epoch", 0)

    def __next__(self) -> Int[Tensor, " seq"]:
        rows = [next(self.source) for _ in range(self.world)]
        return rows[self.rank]

    def state_dict(self) -> dict[str, Tensor]:
        if not hasattr(self.source, "state_dict"):
            raise SAEError("the sharded token iterator cannot save its position: use token_source(...)")
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.source.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return self.source.describe() if hasattr(self.source, "describe") else {}


def rank_store(
    model: nn.Module,
    hook_name: str,
    tokens: Any,
    *,
    batch_tokens: int,
    context: int,
    seed: int = 0,
    cache_dir: Path | str | None = None,
    cache_tokens: int | None = None,
    rank_and_world: tuple[int, int] | None = None,
    **options: Any,
) -> ActivationStore:
    """This rank's activation store: its share of the token rows, ``batch_tokens // world`` rows a batch.

    ``tokens`` is what :func:`token_source` reads (``"language"``, a file, a token tensor, a
    function) or an iterator of rows; every rank must pass the same. ``cache_dir`` gets one
    folder per rank (``rank{r}-of-{world}``), each caching its share of ``cache_tokens`` (the
    ranks' total). ``rank_and_world`` overrides the process group's (to harvest one rank's share
    in a single process). Other options go to ``ActivationStore``.
    """
    rank_, world = rank_and_world if rank_and_world is not None else (rank(), world_size())
    shared_cache = None if cache_dir is None else str(cache_dir)
    if not isinstance(tokens, Iterator):
        tokens = token_source(tokens, tokenizer=getattr(model, "tokenizer", None), seq_len=context, seed=seed)
    if world > 1:
        sharded = ShardedSource(tokens, rank_, world)
        # a plain iterator cannot seek: hand it over as one, so the store resumes by skipping rows
        tokens = sharded if hasattr(tokens, "load_state_dict") else (row for row in sharded)
        cache_dir = None if cache_dir is None else Path(cache_dir) / f"rank{rank_}-of-{world}"
    store = ActivationStore(
        model,
        hook_name,
        tokens,
        batch_tokens=local_batch_tokens(batch_tokens, world),
        context=context,
        seed=seed,
        cache_dir=cache_dir,
        cache_tokens=None if cache_tokens is None else -(-cache_tokens // world),
        **options,
    )
    store.data_settings["cache_dir"] = shared_cache  # the folder asked for: the same on every rank
    return store
