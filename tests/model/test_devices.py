"""The layer-to-device plan. CI has no GPU, so the plan logic is tested directly and the
forward pass's device hand-offs are exercised with every layer on the CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mechscope.model.devices import devices_for, layer_plan, place
from tests.conftest import random_model


@given(n_layers=st.integers(1, 80), n_devices=st.integers(1, 8))
def test_plan_is_contiguous_balanced_and_uses_every_device(n_layers, n_devices):
    if n_devices > n_layers:
        with pytest.raises(ValueError, match=f"at most {n_layers}"):
            layer_plan(n_layers, [f"cuda:{i}" for i in range(n_devices)])
        return
    plan = [d.index for d in layer_plan(n_layers, [f"cuda:{i}" for i in range(n_devices)])]
    assert plan == sorted(plan)  # consecutive layers share a device
    counts = [plan.count(i) for i in range(n_devices)]
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1


def test_plan_examples():
    assert [d.index for d in layer_plan(5, ["cuda:0", "cuda:1"])] == [0, 0, 0, 1, 1]
    assert [d.index for d in layer_plan(4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"])] == [0, 1, 2, 3]


def test_devices_for():
    assert devices_for("cpu", None) == [torch.device("cpu")]
    assert devices_for(["cuda:0", "cuda:1"], None) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert devices_for("cpu", 3) == [torch.device("cpu")] * 3
    with pytest.raises(ValueError, match="n_devices=3 but 2 devices were listed"):
        devices_for(["cuda:0", "cuda:1"], 3)
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="n_devices=64 but only"):
            devices_for("cuda", 64)
    with pytest.raises(ValueError, match="at least one device"):
        layer_plan(3, [])


def test_place_puts_embeddings_first_and_unembedding_last():
    """The meta device stands in for a second GPU: placement only moves modules."""
    model = random_model(n_layers=4)
    place(model, ["cpu", "meta"])
    assert [d.type for d in model.layer_devices] == ["cpu", "cpu", "meta", "meta"]
    assert model.W_E.device.type == "cpu" and model.W_pos.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in model.blocks[1].parameters())
    assert all(p.device.type == "meta" for p in model.blocks[2].parameters())
    assert model.W_U.device.type == "meta" and model.ln_final.w.device.type == "meta"
    single = place(random_model(n_layers=4), ["cpu", "cpu"])
    assert single.layer_devices is None  # one distinct device: no hand-offs needed


def test_forward_with_hand_offs_equals_single_device():
    """The multi-device path moves the residual stream before every block; with every block
    on the CPU it must change nothing (KV cache and rotary angles included)."""
    model = random_model(positional_embedding="rotary", n_key_value_heads=2)
    tokens = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask)
        generated = model.generate(tokens, 5, attention_mask=mask)
        model.layer_devices = [torch.device("cpu")] * model.cfg.n_layers
        torch.testing.assert_close(model(tokens, attention_mask=mask), expected, atol=0, rtol=0)
    assert torch.equal(model.generate(tokens, 5, attention_mask=mask), generated)
