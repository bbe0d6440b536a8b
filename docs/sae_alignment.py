"""Best alignment of a TopK SAE's latents with the synthetic language's latent variables (docs/sae.md).

Trains a TopK SAE on ``blocks.1.hook_resid_post`` of the shipped language organism (activations of
packed training rows, as the organism trains on), then scores every latent variable of the generator
on fresh documents: the AUROC of the single best latent, and that latent's F1 at its best threshold.
An untrained SAE of the same shape is scored beside it as the floor.

    OMP_NUM_THREADS=1 .venv/bin/python docs/sae_alignment.py            # about a minute on one CPU thread
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from mechscope.sae.base import SAEConfig, build_sae
from mechscope.sae.ground_truth import latent_alignment
from mechscope.sae.training import TrainSAEConfig, train_sae
from mechscope.toys.language import grammar
from mechscope.toys.zoo import load


@torch.no_grad()
def activations(model, hook: str, rows: int, seed: int) -> torch.Tensor:
    """``hook`` on ``rows`` packed training rows of the organism, the first (BOS) position dropped."""
    generator = torch.Generator().manual_seed(seed)
    layer = model.hook_dict[hook].layer()
    out = []
    for step in range(0, rows, model.organism.batch_size):
        tokens = model.organism.batch(step, generator)
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=layer + 1)
        out.append(cache[hook][:, 1:].flatten(0, 1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hook", default="blocks.1.hook_resid_post")
    parser.add_argument("--d-sae", type=int, default=256)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rows", type=int, default=256, help="packed rows of 128 tokens to train on")
    parser.add_argument("--documents", type=int, default=1000, help="fresh documents to score on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    model = load("language")
    start = time.perf_counter()
    acts = activations(model, args.hook, args.rows, args.seed)
    cfg = SAEConfig(acts.shape[1], args.d_sae, "topk", args.hook, model.hook_dict[args.hook].layer(), k=args.k)
    untrained, sae = build_sae(cfg, seed=args.seed), build_sae(cfg, seed=args.seed)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))
    acts = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(args.seed))]  # shuffled once
    config = TrainSAEConfig(
        total_tokens=args.steps * args.batch, batch_tokens=args.batch, lr=args.lr, log_every=args.steps, seed=args.seed
    )
    with tempfile.TemporaryDirectory() as run:
        train_sae(sae, acts, config, run, progress=False)
    with torch.no_grad():
        fvu = float((sae(acts) - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
    seconds = time.perf_counter() - start

    rng = random.Random(args.seed + 1)
    samples = [grammar.sample(rng) for _ in range(args.documents)]
    with torch.no_grad():
        trained, floor = (latent_alignment(model, s, args.hook, samples) for s in (sae, untrained))
    print(
        f"TopK SAE on {args.hook}: d_sae={args.d_sae}, k={args.k}, {args.steps} steps of {args.batch} "
        f"(lr {args.lr}) from {len(acts)} activations; trained in {seconds:.0f} s; FVU {fvu:.3f}; "
        f"{args.documents} documents scored\n"
    )
    print("| variable | best latent | AUROC | F1 | positives / negatives | untrained SAE AUROC |")
    print("|---|---|---|---|---|---|")
    for name, a in trained.items():
        print(
            f"| `{name}` | {a.latent} | {a.auroc:.3f} | {a.f1:.3f} | {a.n_positive} / {a.n_negative} "
            f"| {floor[name].auroc:.3f} |"
        )


if __name__ == "__main__":
    main()
