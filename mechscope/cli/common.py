"""What every command shares: describing a model, failing with one line on stderr, loading a
model by name (an organism, a run folder, or a HuggingFace model)."""

from __future__ import annotations

from typing import NoReturn

import torch
import typer


def describe(model) -> str:
    """The architecture, parameter count and hook table of ``model``, as text."""
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"architecture   {cfg.original_architecture or 'mechscope'}",
        f"layers         {cfg.n_layers}",
        f"d_model        {cfg.d_model}",
        f"heads          {cfg.n_heads} x d_head {cfg.d_head}",
        f"d_mlp          {cfg.d_mlp}",
        f"vocabulary     {cfg.d_vocab}",
        f"context        {cfg.n_ctx}",
        f"activation     {cfg.act_fn}",
        f"norm           {cfg.normalization}",
        f"positions      {cfg.positional_embedding}",
        f"dtype          {str(cfg.dtype).removeprefix('torch.')}",
        f"parameters     {n_params:,}",
        "",
        "hook points (shapes for a batch of 1 with 1 token; * = opt-in, cached only when named)",
    ]
    one_token = torch.zeros(1, 1, dtype=torch.long, device=model.W_E.device)
    with torch.no_grad():  # opt-in points change the computation (per-head inputs), so apart
        _, standard = model.run_with_cache(one_token)
        _, opt_in = model.run_with_cache(one_token, names_filter=lambda name: model.hook_dict[name].opt_in)
    width = max(len(name) for name in model.hook_dict)
    for name, point in model.hook_dict.items():
        cache = opt_in if point.opt_in else standard
        lines.append(f"  {name:<{width}}  {tuple(cache[name].shape)}{'  *' if point.opt_in else ''}")
    return "\n".join(lines)


def fail(error: Exception | str) -> NoReturn:
    """Stop with the message on stderr, unwrapped (long messages name the limits and the choices)."""
    if isinstance(error, KeyError):  # str() of a KeyError adds quotes
        error = error.args[0]
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


def load_any_model(name: str):
    """A shipped organism or training run (by name or folder), else a HuggingFace model."""
    from mechscope.toys.zoo import load_any

    try:
        return load_any(name)
    except (OSError, ValueError, KeyError) as error:
        fail(error)


def load_transformer(name: str, reading: str, instead: str):
    """:func:`load_any_model`, refusing anything without a residual stream or a tokenizer; the
    refusal names what the command wanted to tokenise (``reading``) and the Python call that
    takes token ids instead (``instead``)."""
    from mechscope.model import Transformer

    loaded = load_any_model(name)
    if not isinstance(loaded, Transformer):
        fail(f"{name!r} is a {type(loaded).__name__}, not a transformer: it has no residual stream to read")
    if getattr(loaded, "tokenizer", None) is None:
        fail(
            f"{name!r} has no tokenizer, so it cannot tokenise {reading}; use a model directory or organism "
            f"that has one (e.g. language), or from Python, on token ids: {instead}"
        )
    return loaded
