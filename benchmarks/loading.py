"""What ``mechscope.Model.from_pretrained(dir)`` costs in memory and time, next to transformers'
own ``AutoModelForCausalLM.from_pretrained`` on the same directory (and TransformerLens' loader
when it is installed).

The checkpoint is built here, with random weights and nothing downloaded: transformers' own
model for a GPT-2-small-shaped ``GPT2Config`` (124M parameters, 475 MiB of float32 safetensors,
tied embeddings) is saved with ``save_pretrained``; ``--arch llama`` builds a Llama-shaped one
instead (155M parameters, grouped-query attention, untied embeddings). The directory is kept
(under the temp dir, or ``--dir``) and reused by later runs.

Method. Every measured load runs in a fresh Python process, so one loader's memory never
counts toward another's, and the rounds are interleaved (each round runs every loader once,
in rotating order) so slow drift on a shared machine does not favour one of them. A process
imports everything first (torch, transformers, the loader's library, the model class's module)
and reads the config, so imports are not counted; then, in float32 on the CPU:

- the baseline is its resident set size (``VmRSS``) just before the load;
- the peak is the kernel's own high-water mark ``VmHWM``, reset to the current RSS just before
  the load by writing ``5`` to ``/proc/self/clear_refs``. The kernel raises it before any
  unmapping lowers RSS and whenever it is read, so it misses no spike and costs nothing,
  where a sampling thread would add work to the timed load and miss short spikes. Only
  where that file cannot be written (old kernels, some sandboxes) a thread reads
  ``/proc/self/statm`` every millisecond instead; the output says which method ran;
- ``peak MiB`` is the peak minus the baseline; ``/model`` divides it by the bytes of the
  parameters of the model that loader produced (``numel * element_size`` summed over its
  distinct parameters). mechscope (like TransformerLens) keeps ``W_U`` apart from ``W_E``
  even when the checkpoint ties them, so its model is larger than transformers' for GPT-2;
  each loader is divided by its own size, and the sizes are printed. The target for
  mechscope is 1.3: no second full copy of the weights;
- ``load s`` is the wall time of the load call (median over ``--repeats`` processes) and
  ``x HF`` its ratio to transformers' median; ``cpu s`` is the CPU time of the process
  (all threads) during the load, which a busy machine disturbs less than wall time.

RSS counts file pages mapped into the process as well as its own memory. transformers maps
the safetensors file and its parameters are views of that mapping, read lazily: its load
returns before most weights have been read, and they are paged in by the first forward pass.
So every process then reads each parameter once (``torch.sum`` over it), and ``+touch s``
and ``peak touched MiB`` give the time and the peak including that pass: the figures to
compare for a model that is actually in memory. For transformers those pages are the page
cache's, shared with other processes reading the same file, not a private copy.

The file is read once before the first round, so every load reads from the page cache (a
cold cache would need dropping the system's caches, which this script does not do).

TransformerLens has no loader for a local directory: ``HookedTransformer.from_pretrained``
accepts only official model names. Its worker runs in a temporary directory where a link
named after an official model of the same architecture (``gpt2``; ``01-ai/Yi-6B`` for Llama,
an official name without "llama" in it, so TransformerLens reads the config rather than a
built-in table) points to the checkpoint, with ``HF_HUB_OFFLINE=1``: transformers resolves the
name to that local directory, so TransformerLens' whole path runs (its own
``AutoModelForCausalLM.from_pretrained``, weight conversion, ``HookedTransformer``), via
``from_pretrained_no_processing`` since mechscope does not process weights either. The
tokenizer it insists on is a four-token stand-in built before the measurement.

Run it with mechscope's environment; ``--peers-python`` names a Python with transformer-lens
installed for the TransformerLens row (it need not have mechscope)::

    python benchmarks/loading.py
    python benchmarks/loading.py --peers-python /path/to/peers/bin/python --repeats 5
    python benchmarks/loading.py --arch llama
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET = 1.3  # mechscope's peak extra RSS over its model's size
LOADERS = ("transformers", "mechscope", "transformer_lens")
LABELS = {"transformers": "transformers (HF)", "mechscope": "mechscope", "transformer_lens": "TransformerLens"}
# The configs built (transformers' config class and its arguments), and the official
# TransformerLens name whose loader reads that config.
ARCHES = {
    "gpt2": {
        "config": "GPT2Config",
        # n_ctx: the hub's gpt2 config.json has it, and TransformerLens reads it.
        "kwargs": {"n_ctx": 1024},
        "tl_name": "gpt2",
    },
    "llama": {
        "config": "LlamaConfig",
        "kwargs": {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        },
        "tl_name": "01-ai/Yi-6B",
    },
}
WEIGHTS = "model.safetensors"
MIB = 2**20


# ---------------------------------------------------------------- the checkpoint
def checkpoint(arch: str, directory: Path | None, rebuild: bool) -> Path:
    """The checkpoint's directory, built (random weights, seed 0) unless an identical one is there."""
    directory = directory or Path(tempfile.gettempdir()) / "mechscope-bench-loading" / arch
    spec = json.dumps(ARCHES[arch], sort_keys=True)
    marker = directory / "bench-spec.json"
    if rebuild or not (marker.exists() and marker.read_text() == spec and (directory / WEIGHTS).exists()):
        import torch
        import transformers

        print(f"building a random {arch} checkpoint in {directory} ...", flush=True)
        torch.manual_seed(0)
        config = getattr(transformers, ARCHES[arch]["config"])(**ARCHES[arch]["kwargs"])
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(directory)  # safetensors, one file below transformers' shard size
        del model
        marker.write_text(spec)
    with open(directory / WEIGHTS, "rb", buffering=0) as file:  # into the page cache: every load reads warm
        while file.read(64 * MIB):
            pass
    return directory


# ---------------------------------------------------------------- inside a worker process
def proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    fields = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    return {f: int(m.group(1)) * 1024 for f in fields if (m := re.search(rf"^{f}:\s+(\d+) kB", text, re.M))}


class PeakMeter:
    """The peak RSS since :meth:`reset`: the kernel's ``VmHWM`` where it can be reset, else a
    thread reading ``/proc/self/statm`` every millisecond."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM reset through /proc/self/clear_refs"
        except OSError:
            self.method = "a thread sampling /proc/self/statm every 1 ms"
            self._page = os.sysconf("SC_PAGE_SIZE")
            self._peak = 0
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        with open("/proc/self/statm") as statm:
            while True:
                statm.seek(0)
                self._peak = max(self._peak, int(statm.read().split()[1]) * self._page)
                time.sleep(0.001)

    def reset(self) -> None:
        if self.method.startswith("VmHWM"):
            Path("/proc/self/clear_refs").write_text("5")
        else:
            self._peak = proc_status()["VmRSS"]

    def peak(self) -> int:
        if self.method.startswith("VmHWM"):
            return proc_status()["VmHWM"]
        return max(self._peak, proc_status()["VmRSS"])


def stand_in_tokenizer(directory: Path):
    """A four-token tokenizer saved to and loaded from ``directory`` (TransformerLens reloads a
    tokenizer by its ``name_or_path``, which must therefore be a real directory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, "a": 2, "b": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def prepare(loader: str, directory: Path, arch: str, scratch: Path):
    """Import what ``loader`` needs and return its load call (nothing is loaded yet)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(directory)
    AutoModelForCausalLM._model_mapping[type(config)]  # imports the model class's module
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if loader == "transformers":
        return lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), versions
    if loader == "mechscope":
        import mechscope
        from mechscope.loading import hf  # noqa: F401 (imported here, not during the load)

        versions["mechscope"] = mechscope.__version__
        return lambda: mechscope.Model.from_pretrained(directory, dtype=torch.float32), versions
    import warnings
    from importlib.metadata import version

    from transformer_lens import HookedTransformer

    warnings.simplefilter("ignore")  # HookedTransformer is deprecated in TransformerLens 3
    versions["transformer-lens"] = version("transformer-lens")
    tokenizer = stand_in_tokenizer(scratch / "tokenizer")
    name = ARCHES[arch]["tl_name"]
    (scratch / name).parent.mkdir(parents=True, exist_ok=True)
    (scratch / name).symlink_to(directory.resolve(), target_is_directory=True)
    os.chdir(scratch)  # transformers resolves ``name`` to the linked local directory

    def load():
        return HookedTransformer.from_pretrained_no_processing(
            name, tokenizer=tokenizer, device="cpu", dtype=torch.float32
        )

    return load, versions


def worker(loader: str, directory: Path, arch: str) -> dict:
    """One measured load, in this (fresh) process; the figures go to stdout as one JSON line."""
    import gc

    with tempfile.TemporaryDirectory() as scratch:
        load, versions = prepare(loader, directory, arch, Path(scratch))
        import torch

        meter = PeakMeter()
        gc.collect()
        base = proc_status()
        meter.reset()
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            model = load()
        except NotImplementedError as error:
            return {"error": f"NotImplementedError: {str(error).splitlines()[0]}"}
        except Exception as error:  # a peer's failure is reported, mechscope's is not hidden
            if loader == "mechscope":
                raise
            return {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        peak = meter.peak()
        with torch.no_grad():
            for p in model.parameters():
                torch.sum(p)
        touched_seconds = time.perf_counter() - wall
        peak_touched, after = meter.peak(), proc_status()
        params = list(model.parameters())  # distinct: tied parameters are listed once
        return {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "touched_seconds": touched_seconds,
            "peak": peak - base["VmRSS"],
            "peak_touched": peak_touched - base["VmRSS"],
            "anon_after": after["RssAnon"] - base["RssAnon"],
            "file_after": after["RssFile"] - base["RssFile"],
            "model_bytes": sum(p.numel() * p.element_size() for p in params),
            "n_params": sum(p.numel() for p in params),
            "method": meter.method,
            "versions": versions,
        }


# ---------------------------------------------------------------- the driver
def run_worker(python: str, loader: str, directory: Path, arch: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parent.parent)  # mechscope, for a Python where it is not installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [python, str(Path(__file__).resolve()), "--worker", loader, "--dir", str(directory), "--arch", arch]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"the {loader} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def has_module(python: str, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def summarise(runs: list[dict]) -> dict:
    if "error" in runs[0]:
        return runs[0]
    keys = ("seconds", "cpu_seconds", "touched_seconds", "peak", "peak_touched", "anon_after", "file_after")
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys}}


def print_machine(args: argparse.Namespace, directory: Path) -> None:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    ram = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs ({cpu.group(1) if cpu else platform.processor()}), "
        f"{int(ram.group(1)) / 2**20:.1f} GiB RAM" + (f", load average {load[0]:.2f} at start" if load else "")
    )
    size = (directory / WEIGHTS).stat().st_size
    print(f"checkpoint: {directory} ({args.arch}, random weights, {size / MIB:.1f} MiB of float32 safetensors)")
    rounds = f"{args.repeats} round{'s' if args.repeats != 1 else ''}"
    print(f"method: a fresh process per load, {rounds} interleaved, medians; float32, CPU")


def print_table(results: dict[str, dict], notes: list[str]) -> None:
    header = (
        f"{'loader':<18} {'load s':>7} {'x HF':>6} {'+touch s':>9} {'cpu s':>6} {'model MiB':>10} "
        f"{'peak MiB':>9} {'/model':>7} {'peak touched MiB':>17} {'/model':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    hf = results.get("transformers", {}).get("seconds")
    for loader, r in results.items():
        if "error" in r:
            print(f"{LABELS[loader]:<18} {'n/a':>7}   ({r['error']})")
            continue
        model = r["model_bytes"]
        ratio = f"{r['seconds'] / hf:.2f}" if hf else "n/a"
        print(
            f"{LABELS[loader]:<18} {r['seconds']:>7.2f} {ratio:>6} {r['touched_seconds']:>9.2f} "
            f"{r['cpu_seconds']:>6.2f} "
            f"{model / MIB:>10.1f} {r['peak'] / MIB:>9.1f} {r['peak'] / model:>7.2f} "
            f"{r['peak_touched'] / MIB:>17.1f} {r['peak_touched'] / model:>7.2f}"
        )
    for note in notes:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHES), default="gpt2")
    parser.add_argument("--dir", type=Path, help="where the checkpoint is built and kept (default: the temp dir)")
    parser.add_argument("--repeats", type=int, default=3, help="measured processes per loader")
    parser.add_argument(
        "--peers-python",
        default=os.environ.get("MECHSCOPE_PEERS_PYTHON", sys.executable),
        help="the Python that runs the TransformerLens loader (default: this one, or $MECHSCOPE_PEERS_PYTHON)",
    )
    parser.add_argument("--rebuild", action="store_true", help="build the checkpoint again even if it is there")
    parser.add_argument("--worker", choices=LOADERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir, args.arch)))
        return

    directory = checkpoint(args.arch, args.dir, args.rebuild)
    print_machine(args, directory)
    pythons = {"transformers": sys.executable, "mechscope": sys.executable, "transformer_lens": args.peers_python}
    runs: dict[str, list[dict]] = {loader: [] for loader in LOADERS}
    if not has_module(args.peers_python, "transformer_lens"):
        runs["transformer_lens"] = [{"error": f"transformer_lens is not importable by {args.peers_python}"}]
    active = [loader for loader in LOADERS if not runs[loader]]
    for round_ in range(args.repeats):
        for i in range(len(active)):
            loader = active[(round_ + i) % len(active)]
            if runs[loader] and "error" in runs[loader][0]:
                continue  # a loader that cannot load this checkpoint is not tried again
            runs[loader].append(run_worker(pythons[loader], loader, directory, args.arch))
    results = {loader: summarise(r) for loader, r in runs.items()}

    versions: dict[str, str] = {}
    for r in results.values():
        versions.update(r.get("versions", {}))
    print(f"versions: python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"peak RSS: {next((r['method'] for r in results.values() if 'method' in r), 'n/a')}")
    notes = [f"mechscope target: peak / model <= {TARGET}"]
    ms = results["mechscope"]
    if "error" not in ms:
        meets = "meets" if ms["peak"] / ms["model_bytes"] <= TARGET else "MISSES"
        notes[0] += f" ({meets} it: {ms['peak'] / ms['model_bytes']:.2f})"
    for loader, r in results.items():
        if "error" not in r:
            notes.append(
                f"{LABELS[loader]}: {r['n_params'] / 1e6:.1f}M parameters; resident after the touch pass: "
                f"{r['anon_after'] / MIB:.0f} MiB private, {r['file_after'] / MIB:.0f} MiB mapped file pages"
            )
    print_table(results, notes)


if __name__ == "__main__":
    main()
