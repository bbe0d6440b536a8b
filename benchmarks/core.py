"""How much mechscope's hooks cost, relative to the plain HuggingFace forward pass.

A GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocabulary 50257, context 1024)
is built with random weights by transformers' own ``GPT2LMHeadModel`` (nothing is downloaded)
and converted with ``mechscope.Model.from_hf``, so both run identical weights. On a batch of
8 x 128 random token ids, in float32 under ``torch.inference_mode()``, it times:

- ``forward``: ``model(tokens)``, no hooks;
- ``resid cache``: ``run_with_cache`` of the residual stream only, every
  ``blocks.{i}.hook_resid_pre`` plus the last ``hook_resid_post`` (n_layers + 1 tensors);
- ``full cache``: ``run_with_cache(tokens)``, every standard (non-opt-in) hook point;

each divided by the time of ``hf_model(tokens)`` (HuggingFace's default attention, sdpa).
Every configuration is timed in blocks alternating with blocks of the HuggingFace pass (HF, it,
HF, it, ...) after a warm-up round. A block is one untimed call then ``runs`` timed calls (their
median), so each figure is a steady state and no configuration pays for the memory another one
freed; a ratio is the median over rounds of the per-round ratio, so slow drift cancels out.
The targets printed alongside are goals, not assertions.

When TransformerLens is importable, the same three rows are timed for a ``HookedTransformer``
holding the same weights (no weight processing); when nnsight is importable, the residual-stream
cache is timed for ``nnsight.NNsight`` wrapping the same HuggingFace model. Each peer's outputs
are checked against the others before it is timed.

Run it with mechscope's environment::

    python benchmarks/core.py
    python benchmarks/core.py --layers 2 --batch 2 --seq 32 --repeats 2   # a quick smoke run

and, to include the peers, with a Python that has transformer-lens and/or nnsight installed
and mechscope on its path, e.g. ``PYTHONPATH=. /path/to/peers/bin/python benchmarks/core.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import mechscope

TARGETS = {"forward": 1.00, "resid cache": 1.03, "full cache": 1.15}
PEERS = {"transformer_lens": "transformer-lens", "nnsight": "nnsight"}  # module: distribution
LOGIT_TOLERANCE = 1e-3  # a peer's logits against HuggingFace's
RESID_TOLERANCE = 1e-4  # nnsight's saved residual stream against mechscope's cache


@dataclass
class Case:
    """One timed configuration: ``run`` does the work; ``nbytes`` measures what it returned."""

    label: str
    run: Callable[[], object]
    target: float | None = None
    nbytes: Callable[[object], int] | None = None


@dataclass
class Result:
    label: str
    seconds: float
    ratio: float
    target: float | None
    cache_bytes: int | None


# ---------------------------------------------------------------- setup
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_hf_model(n_layers: int, device: str, seed: int) -> GPT2LMHeadModel:
    """GPT-2 small's shape with random weights, initialised by transformers itself."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    return GPT2LMHeadModel(config).to(device=device, dtype=torch.float32).eval()


def resid_names(n_layers: int) -> list[str]:
    """The residual stream: entering every block, and leaving the last one."""
    return [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def is_importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check(what: str, diff: float, tolerance: float) -> None:
    """Print an agreement check; timing computations that disagree would be meaningless."""
    print(f"check: {what}: max |diff| = {diff:.2e} (tolerance {tolerance:.0e})")
    if not diff <= tolerance:
        raise SystemExit(f"{what} disagree by {diff:.2e} > {tolerance:.0e}; not timing them")


# ---------------------------------------------------------------- cases
def hooked_model_cases(name: str, model, tokens: torch.Tensor) -> list[Case]:
    """The three configurations for any model with TransformerLens' API (mechscope's is the same):
    ``model(tokens)`` and ``model.run_with_cache(tokens, names_filter=...)``."""
    names = resid_names(model.cfg.n_layers)

    def cache_bytes(out) -> int:
        return tensor_bytes(out[1].values())

    return [
        Case(f"{name} forward", lambda: model(tokens), TARGETS["forward"]),
        Case(
            f"{name} resid cache",
            lambda: model.run_with_cache(tokens, names_filter=names),
            TARGETS["resid cache"],
            cache_bytes,
        ),
        Case(f"{name} full cache", lambda: model.run_with_cache(tokens), TARGETS["full cache"], cache_bytes),
    ]


def build_tl_model(hf_model: GPT2LMHeadModel, device: str):
    """A TransformerLens ``HookedTransformer`` holding the HuggingFace weights unprocessed."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn=c.activation_function,
        eps=c.layer_norm_epsilon,
        normalization_type="LN",
        original_architecture="GPT2LMHeadModel",
        device=device,
        dtype=torch.float32,
        init_weights=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # HookedTransformer is deprecated in TL 3.x
        model = HookedTransformer(cfg)
    state = convert_gpt2_weights(hf_model, cfg)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


def transformer_lens_cases(hf_model: GPT2LMHeadModel, tokens: torch.Tensor, device: str) -> list[Case]:
    # HookedTransformer's attention has one implementation, its default: scores and pattern are
    # always computed explicitly (einsum, mask, softmax); it never calls a fused kernel.
    # Its full cache also holds unembed.hook_in and unembed.hook_out (the logits), which
    # mechscope has no hook points for, hence its larger size.
    tl_model = build_tl_model(hf_model, device)
    check("TransformerLens vs HF logits", max_diff(tl_model(tokens), hf_model(tokens).logits), LOGIT_TOLERANCE)
    return hooked_model_cases("TransformerLens", tl_model, tokens)


def nnsight_resid(wrapped, tokens: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
    """The residual stream as nnsight saves it: each block's input, then the last block's output."""
    saved: list[torch.Tensor] = []
    with wrapped.trace(tokens):
        for i in range(n_layers):
            saved.append(wrapped.transformer.h[i].input.save())
        saved.append(wrapped.transformer.h[n_layers - 1].output.save())
    return saved


def nnsight_cases(hf_model: GPT2LMHeadModel, tokens: torch.Tensor, model: mechscope.Model) -> list[Case]:
    import nnsight

    wrapped = nnsight.NNsight(hf_model)
    n_layers = hf_model.config.n_layer
    saved = nnsight_resid(wrapped, tokens, n_layers)
    names = resid_names(n_layers)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    diff = max(max_diff(saved_tensor, cache[name]) for saved_tensor, name in zip(saved, names))
    check("nnsight resid vs mechscope cache", diff, RESID_TOLERANCE)

    def run() -> list[torch.Tensor]:
        return nnsight_resid(wrapped, tokens, n_layers)

    return [Case("nnsight resid cache", run, TARGETS["resid cache"], tensor_bytes)]


# ---------------------------------------------------------------- timing
def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def steady(fn: Callable[[], object], sync, runs: int) -> tuple[float, object]:
    """Median time of ``runs`` consecutive calls, after one untimed call.

    The untimed call absorbs what the previous configuration left behind: freeing a large
    cache lets the C allocator return its pages to the operating system, and whoever
    allocates next pays to fault them in again. Without this, that cost lands on whichever
    configuration happens to run next (in an HF, case, HF, case order, on the HF baseline).
    """
    timed(fn, sync)
    times, out = [], None
    for _ in range(runs):
        del out  # free the previous result before the next call allocates
        seconds, out = timed(fn, sync)
        times.append(seconds)
    return statistics.median(times), out


def measure(
    cases: list[Case], baseline: Callable[[], object], repeats: int, sync, runs: int = 2
) -> tuple[float, list[Result]]:
    """Alternate blocks of the baseline and of each case (HF, case, HF, case, ...): one warm-up
    round, then ``repeats`` timed rounds. A case's ratio is the median of its per-round ratios
    of steady-state times (see :func:`steady`)."""
    pairs: dict[str, list[tuple[float, float]]] = {case.label: [] for case in cases}  # (baseline, case) seconds
    nbytes: dict[str, int | None] = {}
    for round_ in range(repeats + 1):
        for case in cases:
            base = steady(baseline, sync, runs)[0]  # its output is dropped at once
            seconds, out = steady(case.run, sync, runs)
            if round_ == 0:  # the warm-up round is not counted; it is where the cache is measured
                nbytes[case.label] = case.nbytes(out) if case.nbytes else None
            else:
                pairs[case.label].append((base, seconds))
            del out  # free the cache before the next pass runs
    results = [
        Result(
            label=case.label,
            seconds=statistics.median(s for _, s in pairs[case.label]),
            ratio=statistics.median(s / b for b, s in pairs[case.label]),
            target=case.target,
            cache_bytes=nbytes[case.label],
        )
        for case in cases
    ]
    base_seconds = statistics.median(b for timings in pairs.values() for b, _ in timings)
    return base_seconds, results


# ---------------------------------------------------------------- report
def print_machine(args: argparse.Namespace) -> None:
    device = args.device
    if torch.device(device).type == "cuda":
        device += f" ({torch.cuda.get_device_name(device)})"
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    versions += [f"transformers {transformers.__version__}", f"mechscope {mechscope.__version__}"]
    versions += [f"{dist} {version(dist)}" for module, dist in PEERS.items() if is_importable(module)]
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    print(f"versions: {', '.join(versions)}")
    print(f"device: {device}, float32, inference_mode")
    print(f"model: GPT-2 small shape, {args.layers} layers, random weights (seed {args.seed})")
    print(f"input: batch {args.batch} x seq {args.seq}; {args.repeats} timed rounds after 1 warm-up; medians")


def print_table(base_seconds: float, attn: str, results: list[Result]) -> None:
    header = f"{'configuration':<30} {'ms':>9} {'ratio':>7} {'target':>7} {'meets':>6} {'cache MiB':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    print(f"{'HF forward (' + attn + ')':<30} {base_seconds * 1e3:>9.1f} {1.0:>7.3f}")
    for r in results:
        target = f"{r.target:.2f}" if r.target is not None else ""
        meets = ("yes" if r.ratio <= r.target else "no") if r.target is not None else ""
        mib = f"{r.cache_bytes / 2**20:.1f}" if r.cache_bytes is not None else ""
        print(f"{r.label:<30} {r.seconds * 1e3:>9.1f} {r.ratio:>7.3f} {target:>7} {meets:>6} {mib:>10}".rstrip())


def main() -> None:
    args = parse_args()
    print_machine(args)
    hf_model = build_hf_model(args.layers, args.device, args.seed)
    model = mechscope.Model.from_hf(hf_model)
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, hf_model.config.vocab_size, (args.batch, args.seq), generator=generator).to(args.device)
    with torch.inference_mode():
        check("mechscope vs HF logits", max_diff(model(tokens), hf_model(tokens).logits), LOGIT_TOLERANCE)
        cases = hooked_model_cases("mechscope", model, tokens)
        if is_importable("transformer_lens"):
            cases += transformer_lens_cases(hf_model, tokens, args.device)
        if is_importable("nnsight"):
            cases += nnsight_cases(hf_model, tokens, model)
        # The baseline is the plain call, with transformers' defaults (sdpa attention, use_cache=True).
        base_seconds, results = measure(cases, lambda: hf_model(tokens), args.repeats, synchronizer(args.device))
    print_table(base_seconds, hf_model.config._attn_implementation, results)


if __name__ == "__main__":
    main()
