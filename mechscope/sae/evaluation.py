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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechscope.model.transformer import next_token_loss
from mechscope.sae.activations import check_hook, special_ids
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
) -> SAEMetrics:
    """Metrics of ``sae`` on ``tokens`` run through ``model``.

    ``drop_tokens`` are the ids whose positions are excluded (default: the tokenizer's BOS, EOS
    and padding ids, as the activation store does); masked-out positions are excluded too.
    """
    if not 0 < dense_threshold <= 1:
        raise SAEError(f"dense_threshold must lie in (0, 1], got {dense_threshold!r}")
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    keep = kept_positions(model, tokens, attention_mask, drop_tokens)
    x_hook, y_hook = hook_names(model, sae)
    clean_logits, acts = run_and_capture(model, tokens, attention_mask, [x_hook, y_hook])
    x, y = acts[x_hook].flatten(2)[keep], acts[y_hook].flatten(2)[keep]
    was_training = sae.training
    sae.eval()
    try:
        reconstruction = reconstruction_metrics(sae, x, y, dense_threshold)
        y_mean = y.float().mean(0)
        runs = {
            "spliced": lambda inputs: sae(inputs.to(sae.W_enc.device)),
            "zero_ablated": lambda inputs: torch.zeros_like(y_mean).expand(len(inputs), -1),
            "mean_ablated": lambda inputs: y_mean.expand(len(inputs), -1),
        }
        ce, kl = {}, 0.0
        for name, replacement in runs.items():  # one set of logits at a time: they are the largest tensors here
            logits = spliced_logits(model, tokens, attention_mask, keep, x_hook, y_hook, replacement)
            ce[name] = next_token_loss(logits, tokens, attention_mask).item()
            if name == "spliced":
                kl = kl_divergence(clean_logits[keep], logits[keep]).mean().item()
            del logits
    finally:
        sae.train(was_training)
    clean = next_token_loss(clean_logits, tokens, attention_mask).item()
    return SAEMetrics(
        **reconstruction,
        ce_loss_clean=clean,
        ce_loss_spliced=ce["spliced"],
        ce_loss_zero_ablated=ce["zero_ablated"],
        ce_loss_mean_ablated=ce["mean_ablated"],
        ce_loss_recovered=recovered(clean, ce["spliced"], ce["zero_ablated"]),
        ce_loss_recovered_mean=recovered(clean, ce["spliced"], ce["mean_ablated"]),
        kl_spliced=kl,
    )


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
    keep = ~torch.isin(tokens, torch.tensor(drop_tokens, dtype=torch.long, device=tokens.device))
    if attention_mask is not None:
        keep &= attention_mask.bool()
    if not keep.any():
        raise SAEError("no position is left to evaluate: every token is BOS / EOS / padding or masked out")
    return keep


def hook_names(model: nn.Module, sae: SAE) -> tuple[str, str]:
    """(where the SAE reads, where its output goes): the same hook except for transcoders."""
    x_hook = check_hook(model, sae.cfg.hook_name)
    return x_hook, check_hook(model, sae.cfg.output_hook_name) if sae.cfg.is_transcoder else x_hook


def run_and_capture(
    model: nn.Module, tokens: Tensor, attention_mask: Tensor | None, names: list[str]
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """Clean logits, and the activations of ``names``, from one forward pass."""
    acts: dict[str, Tensor] = {}

    def save(activation: Tensor, hook: Any) -> None:
        acts[hook.name] = activation.detach()

    logits = model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=[(sorted(set(names)), save)])
    return logits, acts


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


def kl_divergence(clean: Float[Tensor, "*pos d_vocab"], other: Float[Tensor, "*pos d_vocab"]) -> Float[Tensor, "*pos"]:
    """KL(clean || other) of the next-token distributions at each position."""
    log_p, log_q = clean.float().log_softmax(-1), other.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)


def recovered(clean: float, spliced: float, ablated: float) -> float:
    """Fraction of the loss an ablation adds that the SAE gets back (nan if the ablation adds none)."""
    gap = ablated - clean
    return (ablated - spliced) / gap if gap != 0 else float("nan")
