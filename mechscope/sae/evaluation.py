"""How good is an SAE? The field's standard metrics on a batch of tokens.

Reconstruction (measured on the hook's activations at kept positions: real tokens that are
not BOS / EOS / padding, as the activation store keeps them):

    l0                   mean number of active latents per token
    mse                  mean over tokens of ||x - x̂||² (summed over features, as in training)
    fvu                  Σ ||x - x̂||² / Σ ||x - mean(x)||²; explained_variance = 1 - fvu
    shrinkage            mean over tokens of ||x̂|| / ||x|| (SAELens' ``l2_ratio``; < 1: the SAE shrinks)
    firing_frequency     per latent, the fraction of tokens it is active on; dead_frac: never active;
                         dense_frac: active on more than ``dense_threshold`` of the tokens

Downstream (the model's next-token loss when the SAE's output replaces the activations at the kept
positions through a hook, against replacing them by zeros or by their mean over the batch's kept
tokens):

    ce_loss_recovered       = (zero-ablated - spliced) / (zero-ablated - clean)
    ce_loss_recovered_mean  = (mean-ablated - spliced) / (mean-ablated - clean)
    kl_spliced              KL(clean || spliced) of the next-token distributions, mean over kept positions

A transcoder reads ``hook_name`` and its output replaces ``output_hook_name``; "x" above is then
that hook's activations.

The tokens go through the model ``batch_size`` sequences at a time: a first pass (stopped after the
hooks) gathers the activations, and with them the mean for mean-ablation; a second sums each run's
per-token losses and KL divergences, so only one chunk's logits are ever held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechscope.model.transformer import next_token_loss
from mechscope.sae.activations import check_hook, special_ids, stop_layer
from mechscope.sae.base import SAE, SAEError

Replacement = Callable[[Float[Tensor, "kept d_in"]], Float[Tensor, "kept d_out"]]


@dataclass
class SAEMetrics:
    """An SAE's metrics on one batch of tokens (see the module note for each definition)."""

    l0: float
    mse: float
    fvu: float
    explained_variance: float
    shrinkage: float
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_zero_ablated: float
    ce_loss_mean_ablated: float
    ce_loss_recovered: float
    ce_loss_recovered_mean: float
    kl_spliced: float
    dead_frac: float
    dense_frac: float
    n_tokens: int  # kept positions the reconstruction metrics average over
    firing_frequency: Float[Tensor, " d_sae"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every scalar, and the firing frequencies as a list."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "firing_frequency"} | {
            "firing_frequency": self.firing_frequency.tolist()
        }

    def table(self) -> str:
        """The scalar metrics, one per line, for a terminal."""
        rows = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "firing_frequency"]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:.6g}" for name, value in rows)


@torch.no_grad()
def evaluate_sae(
    model: nn.Module,
    sae: SAE,
    tokens: Int[Tensor, "batch pos"],
    *,
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
    drop_tokens: list[int] | None = None,
    dense_threshold: float = 0.1,
    batch_size: int = 8,
) -> SAEMetrics:
    """Metrics of ``sae`` on ``tokens`` run through ``model``, ``batch_size`` sequences at a time.

    ``drop_tokens`` are the ids whose positions are excluded (default: the tokenizer's BOS, EOS
    and padding ids, as the activation store does); masked-out positions are excluded too. Only
    one chunk's logits are ever held, so memory grows with ``batch_size``, not with ``tokens``.
    """
    check_tokens(tokens, attention_mask, min_positions=2)
    check_settings(dense_threshold, batch_size)
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    keep = kept_positions(model, tokens, attention_mask, drop_tokens)
    hooks = hook_names(model, sae)
    chunks = [slice(start, start + batch_size) for start in range(0, len(tokens), batch_size)]
    x, y = hook_activations(model, tokens, attention_mask, keep, hooks, chunks)
    was_training = sae.training
    sae.eval()
    try:
        reconstruction = reconstruction_metrics(sae, x, y, dense_threshold)
        ce, kl = downstream_losses(model, sae, tokens, attention_mask, keep, hooks, y.float().mean(0), chunks)
    finally:
        sae.train(was_training)
    return SAEMetrics(
        **reconstruction,
        ce_loss_clean=ce["clean"],
        ce_loss_spliced=ce["spliced"],
        ce_loss_zero_ablated=ce["zero_ablated"],
        ce_loss_mean_ablated=ce["mean_ablated"],
        ce_loss_recovered=recovered(ce["clean"], ce["spliced"], ce["zero_ablated"]),
        ce_loss_recovered_mean=recovered(ce["clean"], ce["spliced"], ce["mean_ablated"]),
        kl_spliced=kl,
    )


def check_tokens(tokens: Any, attention_mask: Any = None, min_positions: int = 1) -> None:
    """Token ids ``[n, seq]`` (at least ``min_positions`` per row) and, if given, a mask of their shape."""
    if (
        not isinstance(tokens, Tensor)
        or tokens.ndim != 2
        or tokens.numel() == 0
        or tokens.is_floating_point()
        or tokens.is_complex()
        or tokens.dtype == torch.bool
    ):
        got = f"{tokens.dtype} {list(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise SAEError(f"tokens must be a non-empty integer tensor [n, seq], got {got}")
    if tokens.shape[1] < min_positions:
        raise SAEError(f"tokens need at least {min_positions} positions per sequence, got {list(tokens.shape)}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.shape != tokens.shape):
        got = list(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise SAEError(f"attention_mask must have the shape of tokens {list(tokens.shape)}, got {got}")


def check_settings(dense_threshold: Any, batch_size: Any) -> None:
    """``dense_threshold`` in (0, 1] and ``batch_size`` a positive int, named in the error."""
    number = isinstance(dense_threshold, (int, float)) and not isinstance(dense_threshold, bool)
    if not number or not 0 < dense_threshold <= 1:
        raise SAEError(f"dense_threshold must lie in (0, 1], got {dense_threshold!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SAEError(f"batch_size must be a positive int (sequences per forward pass), got {batch_size!r}")


def kept_positions(
    model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None,
    drop_tokens: list[int] | None,
) -> Bool[Tensor, "batch pos"]:
    """Positions whose activations count: real tokens that are not BOS / EOS / padding."""
    if drop_tokens is None:
        tokenizer = getattr(model, "tokenizer", None)
        drop_tokens = [] if tokenizer is None else special_ids(tokenizer)
    keep = ~torch.isin(tokens, torch.as_tensor(drop_tokens, dtype=torch.long, device=tokens.device))
    if attention_mask is not None:
        keep &= attention_mask.bool()
    if not keep.any():
        raise SAEError("no position is left to evaluate: every token is BOS / EOS / padding or masked out")
    return keep


def hook_names(model: nn.Module, sae: SAE) -> tuple[str, str]:
    """(where the SAE reads, where its output goes): the same hook except for transcoders."""
    x_hook = check_hook(model, sae.cfg.hook_name)
    return x_hook, check_hook(model, sae.cfg.output_hook_name) if sae.cfg.is_transcoder else x_hook


def check_order(fired: list[str], x_hook: str, y_hook: str) -> None:
    """A transcoder's output must be spliced downstream of its input, or its input would not exist yet."""
    if x_hook != y_hook and fired.index(y_hook) < fired.index(x_hook):
        raise SAEError(
            f"output_hook_name {y_hook!r} runs before hook_name {x_hook!r}: "
            "a transcoder must write downstream of where it reads"
        )


def hook_activations(
    model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None,
    keep: Bool[Tensor, "batch pos"],
    hooks: tuple[str, str],
    chunks: list[slice],
) -> tuple[Float[Tensor, "kept d_in"], Float[Tensor, "kept d_out"]]:
    """The SAE's inputs and targets at kept positions, chunk by chunk."""
    x_hook, y_hook = hooks
    xs, ys = [], []
    for chunk in chunks:
        mask = None if attention_mask is None else attention_mask[chunk]
        acts = capture(model, tokens[chunk], mask, keep[chunk], [x_hook, y_hook])
        check_order(list(acts), x_hook, y_hook)
        xs.append(acts[x_hook])
        ys.append(acts[y_hook])
    return torch.cat(xs), torch.cat(ys)


def capture(
    model: nn.Module, tokens: Tensor, attention_mask: Tensor | None, keep: Bool[Tensor, "batch pos"], names: list[str]
) -> dict[str, Tensor]:
    """Each named hook's activations at kept positions, in the order the hooks fire; the pass stops after them."""
    acts: dict[str, Tensor] = {}

    def save(activation: Tensor, hook: Any) -> None:
        acts[hook.name] = activation.detach().flatten(2)[keep]

    model.run_with_hooks(
        tokens,
        return_type=None,
        attention_mask=attention_mask,
        stop_at_layer=stop_layer(names),
        fwd_hooks=[(sorted(set(names)), save)],
    )
    return acts


def downstream_losses(
    model: nn.Module,
    sae: SAE,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None,
    keep: Bool[Tensor, "batch pos"],
    hooks: tuple[str, str],
    y_mean: Float[Tensor, " d_out"],
    chunks: list[slice],
) -> tuple[dict[str, float], float]:
    """Mean next-token loss of the clean, spliced and ablated runs, and mean KL(clean || spliced) at
    kept positions: per-token sums gathered chunk by chunk, one chunk's logits at a time."""
    runs: dict[str, Replacement] = {
        "spliced": lambda inputs: sae(inputs.to(sae.W_enc.device)),
        "zero_ablated": lambda inputs: torch.zeros_like(y_mean).expand(len(inputs), -1),
        "mean_ablated": lambda inputs: y_mean.expand(len(inputs), -1),
    }
    loss = dict.fromkeys(["clean", *runs], 0.0)
    kl, pairs = 0.0, 0
    for chunk in chunks:
        rows, mask, kept = tokens[chunk], None if attention_mask is None else attention_mask[chunk], keep[chunk]
        clean = model(rows, attention_mask=mask)
        loss["clean"] += loss_sum(clean, rows, mask)
        clean_log_p = clean[kept].float().log_softmax(-1)
        del clean
        for name, replacement in runs.items():
            logits = spliced_logits(model, rows, mask, kept, *hooks, replacement)
            loss[name] += loss_sum(logits, rows, mask)
            if name == "spliced":
                kl += kl_sum(clean_log_p, logits[kept])
            del logits
        pairs += next_token_pairs(rows, mask)
    return {name: total / max(pairs, 1) for name, total in loss.items()}, max(kl / int(keep.sum()), 0.0)


def loss_sum(logits: Float[Tensor, "batch pos d_vocab"], tokens: Tensor, attention_mask: Tensor | None) -> float:
    """Summed next-token loss over the counted pairs (real token followed by a real token)."""
    return next_token_loss(logits, tokens, attention_mask, per_token=True).double().sum().item()


def next_token_pairs(tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None) -> int:
    """How many (position, next position) pairs the next-token loss counts."""
    if attention_mask is None:
        return tokens.shape[0] * (tokens.shape[1] - 1)
    return int((attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()).sum())


def kl_sum(clean_log_p: Float[Tensor, "kept d_vocab"], other: Float[Tensor, "kept d_vocab"]) -> float:
    """Σ over positions of KL(clean || other) of the next-token distributions."""
    log_q = other.float().log_softmax(-1)
    return F.kl_div(log_q, clean_log_p, log_target=True, reduction="sum").double().item()


def spliced_logits(
    model: nn.Module,
    tokens: Tensor,
    attention_mask: Tensor | None,
    keep: Bool[Tensor, "batch pos"],
    x_hook: str,
    y_hook: str,
    replacement: Replacement,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits when ``y_hook``'s activations at kept positions become ``replacement`` of ``x_hook``'s."""
    inputs: dict[str, Tensor] = {}

    def capture(activation: Tensor, hook: Any) -> None:
        inputs["x"] = activation.flatten(2)[keep]

    def replace(activation: Tensor, hook: Any) -> Tensor:
        flat = activation.flatten(2).clone()
        flat[keep] = replacement(inputs["x"] if x_hook != y_hook else flat[keep]).to(flat)
        return flat.reshape(activation.shape)

    hooks = [(x_hook, capture)] if x_hook != y_hook else []
    return model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=[*hooks, (y_hook, replace)])


def reconstruction_metrics(
    sae: SAE, x: Float[Tensor, "kept d_in"], y: Float[Tensor, "kept d_out"], dense_threshold: float
) -> dict[str, Any]:
    """L0, MSE, FVU, shrinkage and per-latent firing of ``sae`` on inputs ``x`` with targets ``y``."""
    x = x.to(sae.W_enc.device)
    y = y.to(sae.W_enc.device).double()
    sparse = sae.encode_sparse(x)
    active = sparse.values != 0
    y_hat = sae.decode_sparse(sparse).double()
    error = (y - y_hat).pow(2).sum(-1)
    fvu = (error.sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-30)).item()
    norm = y.norm(dim=-1)
    shrinkage = y_hat.norm(dim=-1) / torch.where(norm.abs() < 1e-4, torch.ones_like(norm), norm)  # SAELens' guard
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=x.device)
    counts.index_add_(0, sparse.indices.flatten(), active.flatten().double())
    frequency = (counts / len(x)).float()
    return {
        "l0": active.sum(-1).double().mean().item(),
        "mse": error.mean().item(),
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "shrinkage": shrinkage.mean().item(),
        "dead_frac": (frequency == 0).float().mean().item(),
        "dense_frac": (frequency > dense_threshold).float().mean().item(),
        "n_tokens": len(x),
        "firing_frequency": frequency.cpu(),
    }


def recovered(clean: float, spliced: float, ablated: float) -> float:
    """Fraction of the loss an ablation adds that the SAE gets back (nan if the ablation adds none)."""
    gap = ablated - clean
    return (ablated - spliced) / gap if gap != 0 else float("nan")
