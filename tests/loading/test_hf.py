"""The loading paths: safetensors (single and sharded), pickles with weights_only, hub-style
prefixes, and the errors for checkpoints that do not fit."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechscope import Model
from mechscope.loading.families import family_for, supported_model_types
from mechscope.loading.hf import CheckpointError
from mechscope.loading.tiny import save_tiny_gpt2, tiny_gpt2


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_sharded_safetensors(tmp_path, tokens):
    hf = tiny_gpt2()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    torch.testing.assert_close(logits(Model.from_pretrained(tmp_path), tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_pickled_weights_load_with_weights_only(tmp_path, tokens):
    hf = tiny_gpt2()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    torch.testing.assert_close(logits(Model.from_pretrained(tmp_path), tokens), hf(tokens).logits, atol=1e-4, rtol=0)


class _Payload:
    """A pickle that runs code when loaded without weights_only."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_malicious_pickle_is_refused(tmp_path):
    tiny_gpt2().config.save_pretrained(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": _Payload(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Model.from_pretrained(tmp_path)
    assert not marker.exists()


def test_unprefixed_hub_layout(tmp_path, gpt2_dir, tokens):
    """The original GPT-2 checkpoint names its tensors without the 'transformer.' prefix."""
    state = load_file(gpt2_dir / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((gpt2_dir / "config.json").read_text())
    reference = Model.from_pretrained(gpt2_dir)
    torch.testing.assert_close(logits(Model.from_pretrained(tmp_path), tokens), logits(reference, tokens))


def test_missing_weights_are_named(tmp_path, gpt2_dir):
    (tmp_path / "config.json").write_text((gpt2_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no weights in.*model\.safetensors"):
        Model.from_pretrained(tmp_path)
    state = load_file(gpt2_dir / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.bias"):
        Model.from_pretrained(tmp_path)


def test_unread_and_misshapen_tensors_are_errors(tmp_path, gpt2_dir):
    (tmp_path / "config.json").write_text((gpt2_dir / "config.json").read_text())
    state = load_file(gpt2_dir / "model.safetensors")
    save_file({**state, "transformer.h.0.mystery.weight": torch.zeros(3)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="mystery"):
        Model.from_pretrained(tmp_path)
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:10]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"wpe\.weight gives shape \(10, 32\).*needs \(64, 32\)"):
        Model.from_pretrained(tmp_path)


ISSUE_FAMILIES = (
    "gpt2",
    "gpt_neo",
    "gptj",
    "gpt_neox",
    "opt",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi3",
    "olmo2",
)


def test_unsupported_architecture_lists_the_supported(tmp_path, gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="'bert' is not supported; supported model types: ") as info:
        Model.from_pretrained(tmp_path)
    listed = str(info.value).split("supported model types: ")[1].split(", ")
    assert listed == supported_model_types()
    assert set(ISSUE_FAMILIES) <= set(listed)
    with pytest.raises(NotImplementedError):
        family_for("bert")


def test_unsupported_option_is_refused(tmp_path):
    save_tiny_gpt2(tmp_path, with_tokenizer=False, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(NotImplementedError, match="scale_attn_by_inverse_layer_idx"):
        Model.from_pretrained(tmp_path)


def test_not_a_directory(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a model directory"):
        Model.from_pretrained(tmp_path / "file.txt")


def test_dtype_and_tokenizer_loading(gpt2_dir):
    model = Model.from_pretrained(gpt2_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.cfg.original_architecture == "gpt2"
    assert model.tokenizer is not None and model.tokenizer.bos_token == "<|endoftext|>"
    out = model("When Mary and John")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_loading_does_not_compute_random_weights(gpt2_dir, monkeypatch):
    """Parameters are allocated on the meta device and filled from the checkpoint only."""
    from mechscope.model.transformer import Transformer

    def forbidden(self):
        raise AssertionError("init_weights ran during loading")

    monkeypatch.setattr(Transformer, "init_weights", forbidden)
    Model.from_pretrained(gpt2_dir)


def test_hub_ids_download_config_tokenizer_and_safetensors_only(monkeypatch, gpt2_dir, tokens):
    """A name that is not a local folder goes to the hub (stubbed here: no network in tests);
    pickles are only fetched when a repository has no safetensors."""
    import huggingface_hub

    asked = []

    def fake_snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(gpt2_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = Model.from_pretrained("openai-community/gpt2")
    assert [repo for repo, _ in asked] == ["openai-community/gpt2"]
    assert "*.safetensors" in asked[0][1] and not any(p.endswith(".bin") for p in asked[0][1])
    assert model.cfg.tokenizer_name == "openai-community/gpt2"
    torch.testing.assert_close(logits(model, tokens), logits(Model.from_pretrained(gpt2_dir), tokens))


def test_unknown_config_override_is_a_clear_error(gpt2_dir):
    with pytest.raises(
        TypeError, match=r"unknown ModelConfig field\(s\) \['ungroup_gqa'\]; valid fields: .*ungroup_grouped"
    ):
        Model.from_pretrained(gpt2_dir, ungroup_gqa=True)
    model = Model.from_pretrained(gpt2_dir, ungroup_grouped_query_attention=True)  # a valid one reaches the config
    assert model.cfg.ungroup_grouped_query_attention
