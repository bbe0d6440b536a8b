"""Do SAEs travel between mechscope and SAELens? A check against SAELens itself, not a test.

SAELens is not a mechscope dependency, so this is a script run by hand (or in CI where SAELens
is installed): ``python benchmarks/saelens_interop.py [--saelens-python PATH]``. It

1. builds mechscope SAEs with random, non-trivial weights (relu, topk, batchtopk, jumprelu, and
   relu / jumprelu transcoders), saves them with ``SAE.save``, and records their ``encode(x)``,
   ``decode(z)`` and ``forward(x)`` on fixed inputs;
2. in a subprocess under a Python that has ``sae_lens`` (``--saelens-python``), loads each
   directory with ``sae_lens.SAE.load_from_disk`` and computes the same three outputs; it also
   builds SAELens SAEs (StandardSAE, TopKSAE with and without ``rescale_acts_by_decoder_norm``,
   JumpReLUSAE, Transcoder), saves them with ``save_model`` and records their outputs;
3. loads SAELens' directories here with ``SAE.load`` and computes ours;

then prints the largest absolute difference of every output and exits 1 if one exceeds
``--tolerance`` (1e-5).

``--dir tests/sae/saelens_reference`` keeps everything it wrote (both sides' folders, the inputs,
SAELens' outputs and its version) as the fixture of ``tests/sae/test_saelens_reference.py``, which
checks the same agreement in CI, where SAELens is not installed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mechscope.sae import SAE, SAEConfig, build_sae, transcoder_config

D_IN, D_OUT, D_SAE, K, N = 16, 12, 64, 6, 32
HOOK, HOOK_OUT = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"

# Runs under the SAELens Python: argv[1] is the work directory.
THEIRS = r"""
import sys, warnings
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
warnings.filterwarnings("ignore")
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens import Transcoder, TranscoderConfig
from sae_lens.saes.sae import SAEMetadata

work = Path(sys.argv[1])
inputs = load_file(work / "inputs.safetensors")
from importlib.metadata import version
(work / "saelens_version.txt").write_text(version("sae-lens") + "\n")

def outputs(sae, x, z):
    with torch.no_grad():
        return {"encode": sae.encode(x), "decode": sae.decode(z), "forward": sae(x)}

for directory in sorted((work / "ours").iterdir()):
    sae = SAE.load_from_disk(directory)
    x, z = inputs["x_" + ("tc" if "transcoder" in directory.name else "sae")], inputs["z"]
    save_file(outputs(sae, x, z), str(directory / "saelens_outputs.safetensors"))

def meta(**extra):
    return SAEMetadata(hook_name=HOOK, model_name="tiny", **extra)

D_IN, D_OUT, D_SAE, K = (int(v) for v in sys.argv[2:6])
HOOK, HOOK_OUT = sys.argv[6], sys.argv[7]
torch.manual_seed(0)
made = {
    "standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
    "topk": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=meta())),
    "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True,
                                           metadata=meta())),
    "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
    "transcoder": Transcoder(TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
                                              metadata=meta(hook_name_out=HOOK_OUT))),
}
for name, sae in made.items():
    with torch.no_grad():
        for param_name, param in sae.named_parameters():
            param.copy_(torch.randn_like(param) * (0.3 if param_name.startswith("W") else 0.2))
        if name == "jumprelu":
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.5)
        if name == "topk_rescaled":
            sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    directory = work / "theirs" / name
    sae.save_model(directory)
    x = inputs["x_tc" if name == "transcoder" else "x_sae"]
    save_file(outputs(sae, x, inputs["z"]), str(directory / "saelens_outputs.safetensors"))
"""


def randomized(cfg: SAEConfig, seed: int) -> SAE:
    """An SAE with random biases (and thresholds), so every term of the formulas matters."""
    sae = build_sae(cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("b_enc", "b_dec"):
            getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=generator) * 0.2)
        if cfg.architecture == "jumprelu":
            sae.log_threshold.copy_((torch.rand(cfg.d_sae, generator=generator) * 0.5 + 0.01).log())
        if cfg.architecture == "batchtopk":
            sae.threshold.fill_(0.3)
            sae.threshold_updates.fill_(1)
    return sae.eval()


def our_saes() -> dict[str, SAE]:
    """One SAE of every architecture we can hand to SAELens."""
    saes = {}
    for seed, arch in enumerate(("relu", "topk", "batchtopk", "jumprelu")):
        k = K if "topk" in arch else None
        cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, hook_name=HOOK, hook_layer=1, k=k, model_name="tiny")
        saes[arch] = randomized(cfg, seed)
    for seed, arch in enumerate(("relu", "jumprelu"), start=10):
        cfg = transcoder_config(
            d_in=D_IN,
            d_out=D_OUT,
            d_sae=D_SAE,
            architecture=arch,
            hook_name=HOOK,
            output_hook_name=HOOK_OUT,
            hook_layer=1,
        )
        saes[f"{arch}_transcoder"] = randomized(cfg, seed)
    return saes


def outputs(sae: SAE, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three outputs compared."""
    with torch.no_grad():
        return {"encode": sae.encode(x), "decode": sae.decode(z), "forward": sae(x)}


def compare(label: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """Print and return the largest absolute difference between matching outputs."""
    diffs = {name: float((ours[name] - theirs[name]).abs().max()) for name in ours}
    print(f"{label:<34}" + "  ".join(f"{name} {diff:.2e}" for name, diff in diffs.items()))
    return max(diffs.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saelens-python", default=os.environ.get("SAELENS_PYTHON", "/root/peers/bin/python"))
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="saelens-interop-"))
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "x_sae": torch.randn(N, D_IN, generator=generator),
        "x_tc": torch.randn(N, D_IN, generator=generator),
        "z": torch.rand(N, D_SAE, generator=generator) * (torch.rand(N, D_SAE, generator=generator) < 0.1),
    }
    save_file(inputs, str(work / "inputs.safetensors"))
    ours = our_saes()
    for name, sae in ours.items():
        sae.save(work / "ours" / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [args.saelens_python, "-c", THEIRS, str(work), str(D_IN), str(D_OUT), str(D_SAE), str(K), HOOK, HOOK_OUT]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout, result.stderr, sep="\n", file=sys.stderr)
        print(f"the SAELens side failed (exit {result.returncode})", file=sys.stderr)
        return 1
    worst = 0.0
    print(f"max |mechscope - SAELens| on {N} examples, d_in {D_IN}, d_sae {D_SAE}, k {K}")
    print("ours saved, loaded by SAELens:")
    for name, sae in ours.items():
        x = inputs["x_tc" if "transcoder" in name else "x_sae"]
        theirs = load_file(work / "ours" / name / "saelens_outputs.safetensors")
        worst = max(worst, compare(f"  {name}", outputs(sae, x, inputs["z"]), theirs))
    print("SAELens saved, loaded by mechscope:")
    for directory in sorted((work / "theirs").iterdir()):
        sae = SAE.load(directory)
        x = inputs["x_tc" if directory.name == "transcoder" else "x_sae"]
        theirs = load_file(directory / "saelens_outputs.safetensors")
        label = f"  {directory.name} -> {type(sae).__name__}"
        worst = max(worst, compare(label, outputs(sae, x, inputs["z"]), theirs))
    verdict = "ok" if worst <= args.tolerance else "FAILED"
    print(f"largest difference {worst:.2e} (tolerance {args.tolerance:.0e}): {verdict}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
