"""SAELens' format: our round trip, the file layout SAELens 6.x writes and reads, and its own files.

The SAELens-written files here are built by hand from what ``sae_lens`` 6.x writes (its
``SAE.save_model``: ``cfg.json`` fields and tensor names, copied from its source); the check
against ``sae_lens`` itself is ``benchmarks/saelens_interop.py``, since it is no dependency.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechscope.sae import SAE, SAEError, load_saelens
from mechscope.sae.base import ARCHITECTURES
from mechscope.sae.saelens import CFG_FILE, WEIGHTS_FILE
from tests.sae import random_sae

SAELENS_TOP_LEVEL = {
    "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
    "metadata", "architecture",
}  # fmt: skip


def same_weights(a: SAE, b: SAE) -> None:
    for (name, pa), (name_b, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert name == name_b
        if name == "log_threshold":  # stored as θ = exp(log θ): one rounding each way
            torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
        else:
            assert torch.equal(pa, pb), name


@pytest.mark.parametrize("d_out", [None, 5])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_round_trip_keeps_config_weights_and_function(tmp_path, architecture, d_out):
    sae = random_sae(architecture, d_out=d_out, model_name="tiny-gpt2").eval()
    if architecture == "batchtopk":
        with torch.no_grad():
            sae.threshold.fill_(0.2)
    assert sae.save(tmp_path / "sae") == tmp_path / "sae"
    loaded = SAE.load(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert loaded.cfg == sae.cfg
    same_weights(sae, loaded)
    x = torch.randn(9, 8)
    torch.testing.assert_close(loaded.eval()(x), sae(x))
    if architecture == "batchtopk":
        assert loaded.threshold == sae.threshold


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_files_are_laid_out_as_saelens_writes_them(tmp_path, architecture):
    sae = random_sae(architecture)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / CFG_FILE).read_text())
    assert set(cfg) >= SAELENS_TOP_LEVEL
    name = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[architecture]
    assert cfg["architecture"] == name
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (8, 32, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["hook_layer"] == 1
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # else SAELens reads it as its 5.x layout
    if architecture == "topk":
        assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    expected = {"W_enc": (8, 32), "b_enc": (32,), "W_dec": (32, 8), "b_dec": (8,)}
    if name == "jumprelu":
        expected["threshold"] = (32,)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    if architecture == "jumprelu":
        torch.testing.assert_close(tensors["threshold"], sae.log_threshold.detach().exp())
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary files


def test_transcoder_files_carry_the_output_hook(tmp_path):
    random_sae("relu", d_out=5).save(tmp_path)
    cfg = json.loads((tmp_path / CFG_FILE).read_text())
    assert cfg["architecture"] == "transcoder" and cfg["d_out"] == 5 and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"


def write_saelens(directory: Path, architecture: str, tensors: dict, **fields) -> Path:
    """A directory as SAELens 6.x's ``save_model`` writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {
        "d_in": tensors["W_enc"].shape[0], "d_sae": tensors["W_enc"].shape[1], "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                     "hook_name": "blocks.2.hook_resid_pre", "model_name": "gpt2"},
        "architecture": architecture,
    }  # fmt: skip
    cfg.update(fields)
    (directory / CFG_FILE).write_text(json.dumps(cfg))
    save_file(tensors, str(directory / WEIGHTS_FILE))
    return directory


def saelens_weights(d_in=6, d_sae=20, d_out=None, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_out = d_out or d_in
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g) * 0.2,
        "W_dec": torch.randn(d_sae, d_out, generator=g), "b_dec": torch.randn(d_out, generator=g) * 0.2,
    }  # fmt: skip


def test_loads_saelens_standard_and_jumprelu(tmp_path):
    w = saelens_weights()
    threshold = torch.rand(20) * 0.5
    relu = load_saelens(write_saelens(tmp_path / "std", "standard", w))
    jump = load_saelens(write_saelens(tmp_path / "jr", "jumprelu", {**w, "threshold": threshold}))
    assert relu.cfg.architecture == "relu" and jump.cfg.architecture == "jumprelu"
    assert relu.cfg.hook_name == "blocks.2.hook_resid_pre" and relu.cfg.hook_layer == 2  # layer from the name
    assert relu.cfg.model_name == "gpt2"
    x = torch.randn(7, 6)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # SAELens: process_sae_in, then the affine map
    torch.testing.assert_close(relu.encode(x), pre.relu())
    torch.testing.assert_close(jump.encode(x), pre.relu() * (pre > threshold))
    torch.testing.assert_close(jump(x), (pre.relu() * (pre > threshold)) @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("rescale", [False, True])
def test_loads_saelens_topk_folding_decoder_norms(tmp_path, rescale):
    w = saelens_weights()
    sae = load_saelens(write_saelens(tmp_path, "topk", w, k=3, rescale_acts_by_decoder_norm=rescale))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 3
    x = torch.randn(7, 6)
    norms = w["W_dec"].norm(dim=-1) if rescale else torch.ones(20)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms  # SAELens' TopKSAE.encode
    values, indices = pre.topk(3)
    acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), (acts / norms) @ w["W_dec"] + w["b_dec"])  # SAELens' decode


def test_loads_saelens_transcoder(tmp_path):
    w = saelens_weights(d_out=4)
    meta = {"sae_lens_version": "6.54.12", "hook_name": "blocks.0.ln2.hook_normalized",
            "hook_name_out": "blocks.0.hook_mlp_out"}  # fmt: skip
    sae = load_saelens(write_saelens(tmp_path, "transcoder", w, d_out=4, apply_b_dec_to_input=False, metadata=meta))
    assert sae.cfg.is_transcoder and sae.cfg.output_hook_name == "blocks.0.hook_mlp_out" and sae.cfg.d_out == 4
    x = torch.randn(5, 6)
    torch.testing.assert_close(sae(x), (x @ w["W_enc"] + w["b_enc"]).relu() @ w["W_dec"] + w["b_dec"])


def test_batchtopk_reads_back_and_also_loads_as_plain_jumprelu(tmp_path):
    sae = random_sae("batchtopk").eval()
    with torch.no_grad():
        sae.threshold.fill_(0.15)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / CFG_FILE).read_text())
    del cfg["metadata"]["mechscope_architecture"]  # what SAELens' loader sees: a JumpReLU
    (tmp_path / CFG_FILE).write_text(json.dumps(cfg))
    as_jumprelu = load_saelens(tmp_path)
    assert as_jumprelu.cfg.architecture == "jumprelu"
    x = torch.randn(8, 8)
    torch.testing.assert_close(as_jumprelu(x), sae(x))


def test_loads_a_saelens_batchtopk_training_checkpoint(tmp_path):
    w = saelens_weights()
    directory = write_saelens(tmp_path, "batchtopk", {**w, "topk_threshold": torch.tensor(0.3)}, k=2.0)
    sae = load_saelens(directory).eval()
    assert sae.cfg.architecture == "batchtopk" and sae.cfg.k == 2 and float(sae.threshold) == pytest.approx(0.3)


def test_loads_the_saelens_5_layout(tmp_path):
    w = saelens_weights()
    directory = tmp_path / "old"
    directory.mkdir()
    old = {"d_in": 6, "d_sae": 20, "dtype": "torch.float32", "hook_point": "blocks.3.hook_resid_post",
           "hook_point_layer": 3, "activation_fn": "topk", "activation_fn_kwargs": {"k": 5},
           "normalize_activations": False, "model_name": "gpt2"}  # fmt: skip
    (directory / CFG_FILE).write_text(json.dumps(old))
    save_file(w, str(directory / WEIGHTS_FILE))
    sae = load_saelens(directory)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name, sae.cfg.hook_layer) == (
        "topk", 5, "blocks.3.hook_resid_post", 3)  # fmt: skip
    assert sae.cfg.normalize_activations == "none" and sae.cfg.model_name == "gpt2"


def test_hook_can_be_supplied_when_the_file_has_none(tmp_path):
    w = saelens_weights()
    directory = write_saelens(tmp_path, "standard", w, metadata={"sae_lens_version": "6.54.12"})
    with pytest.raises(SAEError, match="hook_name"):
        load_saelens(directory)
    assert load_saelens(directory, hook_name="blocks.4.hook_mlp_out").cfg.hook_layer == 4


def test_save_overwrites_an_earlier_save(tmp_path):
    random_sae("relu", seed=1).save(tmp_path)
    second = random_sae("topk", seed=2)
    second.save(tmp_path)
    assert torch.equal(SAE.load(tmp_path).W_enc, second.W_enc)


@pytest.mark.bad_input
def test_bad_directories_are_named(tmp_path):
    with pytest.raises(SAEError, match=CFG_FILE):
        load_saelens(tmp_path / "missing")
    w = saelens_weights()
    (write_saelens(tmp_path / "json", "standard", w) / CFG_FILE).write_text("{not json")
    with pytest.raises(SAEError, match="JSON"):
        load_saelens(tmp_path / "json")
    with pytest.raises(SAEError, match="gated"):
        load_saelens(write_saelens(tmp_path / "gated", "gated", w))
    with pytest.raises(SAEError, match="reshape_activations"):
        load_saelens(write_saelens(tmp_path / "z", "standard", w, reshape_activations="hook_z"))
    with pytest.raises(SAEError, match="W_dec"):
        load_saelens(write_saelens(tmp_path / "shape", "standard", {**w, "W_dec": torch.zeros(20, 5)}))
    with pytest.raises(SAEError, match="threshold"):
        load_saelens(write_saelens(tmp_path / "extra", "standard", {**w, "threshold": torch.zeros(20)}))
    with pytest.raises(SAEError, match="threshold"):
        load_saelens(write_saelens(tmp_path / "neg", "jumprelu", {**w, "threshold": -torch.ones(20)}))
    with pytest.raises(SAEError, match="normalize_activations"):
        load_saelens(write_saelens(tmp_path / "ln", "standard", w, normalize_activations="layer_norm"))
    with pytest.raises(SAEError, match="metadata must be a JSON object"):
        load_saelens(write_saelens(tmp_path / "meta", "standard", w, metadata=["blocks.2.hook_resid_pre"]))
    for name in ("d_in", "d_sae"):
        directory = write_saelens(tmp_path / name, "standard", w)
        cfg = json.loads((directory / CFG_FILE).read_text())
        del cfg[name]
        (directory / CFG_FILE).write_text(json.dumps(cfg))
        with pytest.raises(SAEError, match=f"no {name}"):
            load_saelens(directory)
    tc = saelens_weights(d_out=4)
    with pytest.raises(SAEError, match="output_hook_name"):
        load_saelens(write_saelens(tmp_path / "tc", "transcoder", tc, d_out=4, apply_b_dec_to_input=False))


def test_a_loaded_batchtopk_sae_infers_with_its_threshold(tmp_path):
    """Loading gives an SAE in eval mode: a BatchTopK's latents then do not depend on the rest of the batch."""
    sae = random_sae("batchtopk", k=3)
    with torch.no_grad():
        sae.threshold.fill_(0.2)
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert not loaded.training
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.encode(x)[:1], loaded.encode(x[:1]))
