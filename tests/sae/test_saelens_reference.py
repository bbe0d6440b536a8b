"""Agreement with SAELens itself, from a fixture SAELens wrote (``tests/sae/saelens_reference``).

``python benchmarks/saelens_interop.py --dir tests/sae/saelens_reference`` (with sae_lens
installed; its version is in ``saelens_version.txt``) saved SAEs of every kind on both sides and
recorded what SAELens computes with each: ``theirs/`` holds SAEs saved by SAELens, ``ours/`` SAEs
saved by mechscope and loaded by SAELens. Here, without SAELens, mechscope loads every folder and
must compute SAELens' outputs; and re-saving ``ours/`` must reproduce those files exactly, so a
change to our format cannot pass while SAELens' recorded verdict goes stale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechscope.sae import SAE

REFERENCE = Path(__file__).parent / "saelens_reference"
INPUTS = load_file(REFERENCE / "inputs.safetensors")
TOLERANCE = 1e-5  # float32 sums in another order; the live script measures at most 9.5e-7 (most outputs exactly equal)


def folders(side: str) -> list[Path]:
    return sorted(p for p in (REFERENCE / side).iterdir() if p.is_dir())


def check_outputs(directory: Path) -> SAE:
    sae = SAE.load(directory)
    x = INPUTS["x_tc" if "transcoder" in directory.name else "x_sae"]
    theirs = load_file(directory / "saelens_outputs.safetensors")
    with torch.no_grad():
        ours = {"encode": sae.encode(x), "decode": sae.decode(INPUTS["z"]), "forward": sae(x)}
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=TOLERANCE, msg=f"{directory.name} {name}")
    return sae


def test_the_fixture_covers_every_kind():
    assert [p.name for p in folders("theirs")] == ["jumprelu", "standard", "topk", "topk_rescaled", "transcoder"]
    assert [p.name for p in folders("ours")] == [
        "batchtopk", "jumprelu", "jumprelu_transcoder", "relu", "relu_transcoder", "topk"
    ]  # fmt: skip
    assert (REFERENCE / "saelens_version.txt").read_text().strip()


@pytest.mark.parametrize("directory", folders("theirs"), ids=lambda p: p.name)
def test_saes_saved_by_saelens_compute_here_what_they_compute_there(directory):
    check_outputs(directory)


@pytest.mark.parametrize("directory", folders("ours"), ids=lambda p: p.name)
def test_our_saes_compute_here_what_saelens_computed_with_them(directory):
    check_outputs(directory)


@pytest.mark.parametrize("directory", folders("ours"), ids=lambda p: p.name)
def test_saving_again_writes_the_files_saelens_read(directory, tmp_path):
    """Today's saver writes what SAELens was shown: the same cfg.json and the same tensors."""
    SAE.load(directory).save(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text()) == json.loads((directory / "cfg.json").read_text())
    fresh, shown = load_file(tmp_path / "sae_weights.safetensors"), load_file(directory / "sae_weights.safetensors")
    assert fresh.keys() == shown.keys()
    for name, tensor in shown.items():
        assert fresh[name].dtype == tensor.dtype and torch.equal(fresh[name], tensor), name
