"""The ``mechscope`` command: a thin shell over library functions.

``mechscope info MODEL`` describes a model and lists its hook points with their shapes;
``mechscope train NAME`` trains a model organism; ``mechscope zoo list | explain NAME`` shows
the shipped ones; ``mechscope lens train | show MODEL`` trains a tuned lens and prints what
each layer predicts; ``mechscope report MODEL --prompt ...`` writes an HTML report;
``mechscope serve [MODEL]`` starts the workbench; ``mechscope sae train | eval`` trains and
measures sparse autoencoders; ``mechscope demo`` is the main job
(``make demo``): the report on the shipped model organisms.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import describe, fail, load_any_model, load_transformer
from mechscope.cli.sae import sae_app

app = typer.Typer(help="mechscope: a microscope for transformer language models.", no_args_is_help=True)


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="organism name, training-run folder, or model directory / hub id")],
) -> None:
    """Print a model's architecture, parameter count and hook points with their shapes."""
    from mechscope.model import Transformer

    loaded = load_any_model(model)
    if not isinstance(loaded, Transformer):
        fail(f"{model!r} is a {type(loaded).__name__}, not a transformer: it has no hook points to list")
    typer.echo(describe(loaded))


@app.command()
def train(
    name: Annotated[str, typer.Argument(help="organism: induction, modular_addition, superposition, ...")],
    steps: Annotated[int | None, typer.Option(help="training steps (default: the organism's recipe)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for the initialisation and every batch")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default: runs/NAME)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its checkpoint")] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE for a task or training field, e.g. --set p=23")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train a model organism, checkpointing as it goes, then print what it learned."""
    from mechscope.toys import train as run
    from mechscope.toys.registry import configured, parse_setting

    settings = dict(parse_setting(s) for s in set_ or [])
    settings.update({k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None})
    try:
        organism, config = configured(name, settings)
    except (KeyError, ValueError, TypeError) as error:
        fail(error)
    directory = out or Path("runs") / name
    command = shlex.join(
        ["mechscope", "train", name, "--seed", str(config.seed), "--steps", str(config.steps)]
        + [arg for s in set_ or [] for arg in ("--set", s)]
        + ["--out", str(directory)]
    )
    try:
        result = run(organism, config, directory, resume=resume, progress=progress, command=command)
    except (FileExistsError, ValueError) as error:
        fail(error)
    typer.echo(f"final loss {result.final_loss:.4f}; run written to {directory}\n")
    typer.echo(str(organism.explain(result.model, result.metrics)))


zoo_app = typer.Typer(help="The shipped model organisms and your own trained runs.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("list")
def zoo_list() -> None:
    """List the organisms: which ship trained, and the command that trained them."""
    from mechscope.toys.registry import ORGANISMS, organism_class
    from mechscope.toys.zoo import load_run, shipped

    available = shipped()
    for name in ORGANISMS:
        typer.echo(f"{name:<18} {organism_class(name).summary}")
        if name in available:
            record = load_run(name)[2]
            typer.echo(f"{'':<18} shipped: {record['command']}")
        else:
            typer.echo(f"{'':<18} not shipped: mechscope train {name}")


@zoo_app.command("explain")
def zoo_explain(
    name: Annotated[str, typer.Argument(help="a shipped organism's name, or a folder written by `mechscope train`")],
) -> None:
    """Print the ground-truth findings of a shipped organism or of a trained run."""
    from mechscope.toys.zoo import explain

    try:
        explain(name)  # prints the findings
    except FileNotFoundError as error:
        fail(error)


lens_app = typer.Typer(help="Logit and tuned lenses: what each layer would predict.", no_args_is_help=True)
app.add_typer(lens_app, name="lens")
app.add_typer(sae_app, name="sae")


@lens_app.command("train")
def lens_train(
    model: Annotated[str, typer.Argument(help="organism name, training-run folder, or model directory / hub id")],
    data: Annotated[str, typer.Option(help="'language' (synthetic documents) or a text file")] = "language",
    steps: Annotated[int, typer.Option(help="training steps")] = 250,
    batch: Annotated[int, typer.Option(help="sequences per step")] = 8,
    seq: Annotated[int, typer.Option(help="tokens per sequence")] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, warmup then cosine)")] = 3e-3,
    seed: Annotated[int, typer.Option(help="seed for the synthetic batches")] = 0,
    out: Annotated[Path | None, typer.Option(help="run folder (default: runs/lens-MODEL)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train a tuned lens (one affine translator per layer), then compare it with the logit lens."""
    from mechscope.analysis.lens import LensError, LogitLens
    from mechscope.analysis.tuned_lens_training import token_batches, train_tuned_lens

    loaded = load_transformer(model, f"--data {data!r}", "mechscope.analysis.train_tuned_lens(model, tokens)")
    directory = out or Path("runs") / f"lens-{Path(model).name}"
    options = dict(batch_size=batch, seq_len=min(seq, loaded.cfg.n_ctx), seed=seed)
    try:
        lens = train_tuned_lens(loaded, data, steps, lr, out=directory, resume=resume, progress=progress, **options)
        after = token_batches(data, loaded, **options)(steps)  # the batch after the last one trained on
    except (LensError, FileExistsError, FileNotFoundError) as error:
        fail(error)
    logit, tuned = LogitLens(loaded).run(after).mean_kl(), lens.run(after).mean_kl()
    source = "fresh documents" if data == "language" else "a text file wraps round, so it may repeat trained rows"
    typer.echo(
        f"tuned lens written to {directory}\n\nmean KL(final || lens) on batch {steps}, the next one ({source}), nats"
    )
    typer.echo(f"{'layer':<12} {'logit lens':>10} {'tuned lens':>10}")
    for layer in range(loaded.cfg.n_layers + 1):
        label = f"{layer}_pre" if layer < loaded.cfg.n_layers else "final_post"
        typer.echo(f"{label:<12} {logit[layer]:>10.4f} {tuned[layer]:>10.4f}")


@lens_app.command("show")
def lens_show(
    model: Annotated[str, typer.Argument(help="organism name, training-run folder, or model directory / hub id")],
    prompt: Annotated[str, typer.Option(help="the text to read")],
    tuned: Annotated[Path | None, typer.Option(help="a folder written by `mechscope lens train`")] = None,
) -> None:
    """Print each layer's top prediction at each position of PROMPT (logit lens, or --tuned)."""
    from mechscope.analysis.lens import LensError, LogitLens, TunedLens, prediction_table

    loaded = load_transformer(model, "--prompt text", "mechscope.analysis.logit_lens(model, tokens)")
    try:
        lens = LogitLens(loaded) if tuned is None else TunedLens.load(tuned, loaded)
        result = lens.run(prompt)
    except (LensError, FileNotFoundError) as error:
        fail(error)
    typer.echo(prediction_table(result, loaded.to_str_tokens(prompt), loaded.to_string))


@app.command()
def report(
    model: Annotated[str, typer.Argument(help="organism name, training-run folder, or model directory / hub id")],
    prompt: Annotated[str, typer.Option(help="the (clean) prompt")],
    out: Annotated[Path, typer.Option(help="folder to write index.html (and assets/) into")] = Path("mechscope-report"),
    answer: Annotated[str | None, typer.Option(help="the expected next token, e.g. ' Mary'")] = None,
    wrong: Annotated[str | None, typer.Option(help="the competing token the metric compares against")] = None,
    corrupted: Annotated[
        str | None, typer.Option(help="a corrupted prompt of the same length: adds patching heatmaps")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="refuse prompts longer than this")] = None,
) -> None:
    """Write a self-contained HTML report on one prompt: predictions, attention, logit lens,
    attribution, head detectors, and patching when a corrupted prompt is given."""
    from tqdm.auto import tqdm

    from mechscope.viz.report import report as write

    loaded = load_transformer(model, "a prompt", "mechscope.viz.report.report(model, token_ids, out, labels=...)")
    start = time.perf_counter()
    with tqdm(total=100, desc="patching", unit="%", disable=corrupted is None, leave=False) as bar:

        def advance(fraction: float) -> None:
            bar.update(round(100 * fraction) - bar.n)

        try:
            options = dict(answer=answer, wrong=wrong, corrupted=corrupted, max_tokens=max_tokens, progress=advance)
            path = write(loaded, prompt, out, title=model, **options)
        except (ValueError, KeyError) as error:
            fail(error)
    typer.echo(f"wrote {path} in {time.perf_counter() - start:.1f} s; open it in a browser: {path.resolve().as_uri()}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder to write the report into")] = Path("mechscope-demo"),
) -> None:
    """The main job: a report on the shipped model organisms (induction, language, modular
    addition, superposition), written to OUT/index.html."""
    from mechscope.toys.zoo import shipped
    from mechscope.viz.demo import demo_report

    if not shipped():
        fail("no shipped organisms found; reinstall mechscope")
    start = time.perf_counter()
    path = demo_report(out)
    typer.echo(f"wrote the model-organism report in {time.perf_counter() - start:.1f} s")
    typer.echo(f"open it in a browser: {path.resolve().as_uri()}")


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="organism name, run folder, or model directory / hub id")] = "language",
    host: Annotated[str, typer.Option(help="address to bind; the default is this machine only")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on", min=1, max=65535)] = 8000,
    db: Annotated[Path | None, typer.Option(help="SQLite file for saved experiments")] = None,
    max_tokens: Annotated[int, typer.Option(help="the longest prompt the page accepts", min=1)] = 256,
    sae: Annotated[Path | None, typer.Option(help="an SAE folder trained on MODEL: browse its features")] = None,
) -> None:
    """Start the workbench: a local web page to explore prompts and run patching sweeps."""
    from mechscope.app import serve as run

    try:
        run(model, host=host, port=port, db=db, max_tokens=max_tokens, sae=sae)
    except (OSError, ValueError, KeyError) as error:
        fail(error)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
