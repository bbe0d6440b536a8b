"""``mechscope sae dashboard``: browsable pages of what an SAE's features fire on and write.

mechscope sae dashboard runs/sae --model language --top-features 20 --out runs/sae/dashboard
mechscope sae dashboard runs/sae --model language --features 0,5,9 --out dash
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import fail, load_transformer


def dashboard(
    directory: Annotated[Path, typer.Argument(help="an SAE folder (cfg.json + sae_weights.safetensors)")],
    model: Annotated[str, typer.Option(help="the model it was trained on")],
    out: Annotated[Path, typer.Option(help="folder for index.html and one page per feature")],
    data: Annotated[str, typer.Option(help="'language' or a .txt/.jsonl/.parquet file")] = "language",
    features: Annotated[str | None, typer.Option(help="comma-separated feature ids, e.g. 0,5,9")] = None,
    top_features: Annotated[int, typer.Option(help="without --features: the N most often firing", min=1)] = 20,
    sequences: Annotated[int, typer.Option(help="sequences to read", min=1)] = 256,
    context: Annotated[int, typer.Option(help="tokens per sequence", min=2)] = 128,
    examples: Annotated[int, typer.Option(help="top examples per feature", min=1)] = 20,
    seed: Annotated[int, typer.Option(help="which sequences, and which examples per interval")] = 1,
) -> None:
    """Write feature dashboards (top examples, activation ranges, histogram, logits) for an SAE."""
    import itertools

    import torch

    from mechscope.sae import SAE, token_source
    from mechscope.sae.features import feature_statistics
    from mechscope.viz.dashboard import write_dashboard
    from mechscope.viz.prompts import decoder

    check_out(out)
    loaded = load_transformer(model, "the text", "mechscope.sae.features.feature_statistics(model, sae, tokens)")
    try:
        sae = SAE.load(directory)
        chosen = parse_features(features)
        source = token_source(data, tokenizer=loaded.tokenizer, seq_len=context, seed=seed)
        tokens = torch.stack(list(itertools.islice(source, sequences)))
        stats = feature_statistics(loaded, sae, tokens, features=chosen, top=examples, seed=seed)
        if chosen is None:  # every feature was measured: keep the most frequent live ones
            ranked = sorted((f for f in stats.features if f.firings), key=lambda f: -f.frequency)
            stats = stats.select([f.index for f in ranked[:top_features]])
        path = write_dashboard(out, stats, decoder(loaded), title=f"SAE features: {directory.name}")
    except (ValueError, KeyError, OSError) as error:
        fail(error)
    typer.echo(f"wrote {len(stats.features)} feature pages; open {path}")


def parse_features(text: str | None) -> list[int] | None:
    """``"0,5,9"`` as ids; a clear error for anything else."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--features must be comma-separated integers such as 0,5,9, got {text!r}") from None


def check_out(out: Path) -> None:
    """Fail before any work when ``out`` (or a folder above it) is a file: the pages need a folder."""
    existing = next((path for path in [out, *out.parents] if path.exists()), None)
    if existing is not None and not existing.is_dir():
        where = f"--out {out} is a file" if existing == out else f"--out {out}: {existing} is a file"
        fail(f"{where}, but the dashboard needs a folder for index.html and its pages")
