"""The ``mechscope`` command: a thin shell over library functions.

``mechscope info MODEL`` describes a model and lists its hook points with their shapes;
``mechscope demo`` is the main job (``make demo``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer

app = typer.Typer(help="mechscope: a microscope for transformer language models.", no_args_is_help=True)


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


@app.command()
def info(model: Annotated[str, typer.Argument(help="HuggingFace hub id or local model directory")]) -> None:
    """Print a model's architecture, parameter count and hook points with their shapes."""
    from mechscope.loading import Model

    typer.echo(describe(Model.from_pretrained(model)))


@app.command()
def demo(
    out: Annotated[
        Path | None, typer.Option(help="where to write the tiny model (default: a temporary folder)")
    ] = None,
) -> None:
    """Build a tiny random GPT-2 with transformers, load it through the HuggingFace path and
    describe it (the model organisms of a later release will replace this)."""
    from mechscope.loading import Model
    from mechscope.loading.tiny import save_tiny_gpt2

    directory = Path(out) if out else Path(tempfile.mkdtemp(prefix="mechscope-demo-"))
    save_tiny_gpt2(directory)
    typer.echo(f"built a tiny random GPT-2 in {directory}\n")
    model = Model.from_pretrained(directory)
    typer.echo(describe(model))
    prompt = "When Mary and John went to the store, John gave a bag to"
    logits, cache = model.run_with_cache(prompt, names_filter=lambda name: name.endswith("hook_pattern"))
    top = logits[0, -1].softmax(-1).topk(3)
    guesses = ", ".join(f"{model.to_string([i])!r} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
    typer.echo(f"\nprompt: {prompt!r} ({logits.shape[1]} tokens)")
    typer.echo(f"top next tokens (random weights, so no sense yet): {guesses}")
    typer.echo(f"cached {len(cache)} attention patterns, {cache.nbytes:,} bytes")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
