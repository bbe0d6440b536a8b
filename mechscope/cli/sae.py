"""``mechscope sae train | eval | dashboard``: sparse autoencoders on any hook point, from the shell.

    mechscope sae train --model language --hook blocks.1.hook_resid_post --arch topk --k 32 \\
        --width 4096 --tokens 2000000 --out runs/sae
    mechscope sae eval runs/sae --model language
    torchrun --nproc_per_node 2 -m mechscope.cli sae train --distributed ...   # data-parallel
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import fail, load_transformer
from mechscope.cli.sae_dashboard import dashboard

sae_app = typer.Typer(help="Train, evaluate and browse sparse autoencoders.", no_args_is_help=True)
sae_app.command("dashboard")(dashboard)

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


@sae_app.command("train")
def train(
    model: Annotated[str, typer.Option(help="organism name, run folder, or model directory / hub id")],
    hook: Annotated[str, typer.Option(help="the hook point to read, e.g. blocks.1.hook_resid_post")],
    out: Annotated[Path, typer.Option(help="folder for checkpoints, metrics.jsonl and the final SAE")],
    arch: Annotated[str, typer.Option(help=f"one of {', '.join(ARCHITECTURES)}")] = "topk",
    width: Annotated[int, typer.Option(help="number of latents (d_sae)", min=1)] = 4096,
    k: Annotated[int, typer.Option(help="active latents per token (topk, batchtopk)", min=1)] = 32,
    l1: Annotated[float, typer.Option(help="sparsity coefficient (relu: L1, jumprelu: L0)", min=0)] = 1.0,
    output_hook: Annotated[str | None, typer.Option(help="train a transcoder predicting this hook")] = None,
    data: Annotated[str, typer.Option(help="'language' (the synthetic generator) or a .txt/.jsonl/.parquet file")] = (
        "language"
    ),
    tokens: Annotated[int, typer.Option(help="training tokens in all", min=1)] = 2_000_000,
    batch_tokens: Annotated[int, typer.Option(help="activations per step", min=1)] = 4096,
    context: Annotated[int, typer.Option(help="tokens per sequence fed to the model", min=2)] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate", min=0)] = 3e-4,
    seed: Annotated[int, typer.Option(help="seeds the initialisation and the data order")] = 0,
    normalize: Annotated[
        str, typer.Option(help="'none' or 'expected_average_only_in' (mean norm sqrt(d_in) while training)")
    ] = "none",
    autocast: Annotated[bool, typer.Option(help="bfloat16 autocast of the SAE's step")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="cache activations here and train from the cache")] = None,
    cache_tokens: Annotated[
        int | None, typer.Option(help="activations to cache in --cache-dir (default: --tokens)", min=1)
    ] = None,
    buffer_batches: Annotated[
        int | None, typer.Option(help="batches in the shuffle buffer (default: 256 contexts' worth, at least 8)", min=1)
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="steps between checkpoints (default: 1/20 of the run, at most 1000)", min=1)
    ] = None,
    log_every: Annotated[
        int | None, typer.Option(help="steps between metrics lines (default: 1/100 of the run, at most 100)", min=1)
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in OUT after an interruption")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    distributed: Annotated[
        bool, typer.Option(help="data-parallel across torchrun's processes (NCCL on GPUs, gloo on CPU)")
    ] = False,
) -> None:
    """Train an SAE (or a transcoder) on one hook point; saved in OUT in the SAELens format."""
    from mechscope.sae import SAEConfig, TrainSAEConfig, build_sae, train_sae
    from mechscope.sae.distributed import close_distributed, init_distributed, is_main, rank_store
    from mechscope.sae.run_folder import RunExistsError

    loaded = load_transformer(model, "training text", "mechscope.sae.train_sae(sae, store, config, out)")
    try:
        device = init_distributed() if distributed else None
        if device is not None:
            loaded = loaded.to(device)
        layer = hook_layer(loaded, hook, output_hook)
        cfg = SAEConfig(
            d_in=width_of(loaded, hook),
            d_sae=width,
            architecture=arch,
            hook_name=hook,
            hook_layer=layer,
            output_hook_name=output_hook,
            d_out=None if output_hook is None else width_of(loaded, output_hook),
            k=k if arch in ("topk", "batchtopk") else None,
            l1_coefficient=l1,
            model_name=model,
            apply_b_dec_to_input=output_hook is None,
            normalize_activations=normalize,
        )
        # each process streams its own share of the rows; with one process this is the plain store
        store = rank_store(
            loaded,
            hook,
            data,
            batch_tokens=batch_tokens,
            context=context,
            seed=seed,
            output_hook_name=output_hook,
            cache_dir=cache_dir,
            cache_tokens=cache_tokens or tokens,  # the cache holds the run's activations
            buffer_batches=buffer_batches,
        )
        steps = tokens // batch_tokens
        config = TrainSAEConfig(
            total_tokens=tokens,
            batch_tokens=batch_tokens,
            lr=lr,
            seed=seed,
            autocast=autocast,
            checkpoint_every=checkpoint_every or min(1000, max(1, steps // 20)),  # a kill loses at most 1/20
            log_every=log_every or min(100, max(1, steps // 100)),
        )
        sae = build_sae(cfg, seed=seed, device=device)
        main = is_main()  # asked before the process group closes
        command = shlex.join(["mechscope", *sys.argv[1:]])
        train_sae(sae, store, config, out, resume=resume, progress=progress and main, command=command)
    except RunExistsError:
        fail(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    except (ValueError, KeyError, OSError) as error:
        fail(error)
    finally:
        close_distributed()
    if main:
        typer.echo(f"saved the SAE (SAELens format) in {out}")


@sae_app.command("eval")
def evaluate(
    directory: Annotated[Path, typer.Argument(help="an SAE folder (cfg.json + sae_weights.safetensors)")],
    model: Annotated[str, typer.Option(help="the model it was trained on")],
    data: Annotated[str, typer.Option(help="'language' or a .txt/.jsonl/.parquet file")] = "language",
    sequences: Annotated[int, typer.Option(help="sequences to evaluate on", min=1)] = 64,
    context: Annotated[int, typer.Option(help="tokens per sequence", min=2)] = 128,
    seed: Annotated[int, typer.Option(help="which sequences")] = 1,
) -> None:
    """Print an SAE's L0, variance explained, loss recovered, KL, dead/dense fractions, shrinkage."""
    import itertools

    import torch

    from mechscope.sae import SAE, evaluate_sae, token_source

    loaded = load_transformer(model, "evaluation text", "mechscope.sae.evaluate_sae(model, sae, tokens)")
    try:
        sae = SAE.load(directory)
        source = token_source(data, tokenizer=loaded.tokenizer, seq_len=context, seed=seed)
        tokens = torch.stack(list(itertools.islice(source, sequences))).to(loaded.W_E.device)
        metrics = evaluate_sae(loaded, sae, tokens)
    except (ValueError, KeyError, FileNotFoundError) as error:
        fail(error)
    typer.echo(metrics.table() if hasattr(metrics, "table") else str(metrics))


def hook_layer(model, hook: str, output_hook: str | None) -> int:
    """The last block the store must run: the deeper of the input and output hooks."""
    from mechscope.model.hooks import HookNameError, unknown_name_message

    names = [hook] if output_hook is None else [hook, output_hook]
    for name in names:
        if name not in model.hook_dict:
            raise HookNameError(unknown_name_message(name, model.hook_dict))
    layers = [model.hook_dict[name].layer() if name.startswith("blocks.") else 0 for name in names]
    return max(layers)


def width_of(model, hook: str) -> int:
    """The size of one position's activation at ``hook`` (d_model, d_mlp, ...)."""
    import torch

    one = torch.zeros(1, 2, dtype=torch.long, device=model.W_E.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(one, names_filter=[hook])
    return cache[hook][0, 0].numel()
