"""ModelConfig's architecture options: their defaults, what is refused with a clear error, the
per-layer window, and the round trip through a dict and JSON."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope import ModelConfig

BASE = dict(n_layers=3, d_model=32, n_heads=4, d_vocab=10, n_ctx=16)


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


def test_architecture_defaults():
    cfg = config()
    assert cfg.n_key_value_heads == 4 and cfg.n_kv_heads_exposed == 4
    assert cfg.rotary_dim is None  # only rotary models have one
    assert (cfg.normalization, cfg.pre_norm, cfg.post_norm, cfg.qk_norm) == ("layernorm", True, False, "none")
    assert cfg.window(0) is None and not cfg.parallel_attn_mlp and not cfg.gated_mlp
    assert config(positional_embedding="rotary").rotary_dim == 8
    assert config(positional_embedding="rotary", d_head=6).rotary_dim == 6
    assert config(d_head=16).attn_scale == 4.0  # sqrt(d_head), not sqrt(d_model / n_heads)
    assert config(attn_scale=2.5).attn_scale == 2.5


def test_grouped_query_heads():
    assert config(n_key_value_heads=2).n_kv_heads_exposed == 2
    assert config(n_key_value_heads=2, ungroup_grouped_query_attention=True).n_kv_heads_exposed == 4
    assert config(n_key_value_heads=1).n_key_value_heads == 1
    with pytest.raises(ValueError, match="n_heads=4 must be a multiple of n_key_value_heads=3"):
        config(n_key_value_heads=3)
    with pytest.raises(ValueError, match="n_heads=4 must be a multiple of n_key_value_heads=8"):
        config(n_key_value_heads=8)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="n_key_value_heads must be a positive integer"):
            config(n_key_value_heads=bad)


@pytest.mark.parametrize("rotary_dim", [2, 4, 8])
def test_partial_rotary_dimensions_are_kept(rotary_dim):
    assert config(positional_embedding="rotary", rotary_dim=rotary_dim).rotary_dim == rotary_dim


@pytest.mark.parametrize("rotary_dim", [0, 3, 10, -2])
def test_rotary_dim_must_be_even_and_fit_the_head(rotary_dim):
    with pytest.raises(ValueError, match=r"rotary_dim must be an even integer in \[2, d_head=8\]"):
        config(positional_embedding="rotary", rotary_dim=rotary_dim)


@pytest.mark.bad_input
def test_rotary_dim_must_be_an_integer():
    with pytest.raises(ValueError, match="rotary_dim must be an even integer"):
        config(positional_embedding="rotary", rotary_dim=4.0)


@pytest.mark.parametrize("kind", ["default", "linear", "dynamic", "llama3"])
def test_supported_rope_scaling_is_accepted(kind):
    scaling = {
        "rope_type": kind,
        "factor": 2.0,
        "original_max_position_embeddings": 16,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    assert config(positional_embedding="rotary", rope_scaling=scaling).rope_scaling == scaling


def test_unsupported_rope_scaling_is_refused_naming_the_supported_kinds():
    with pytest.raises(ValueError, match=r"rope_scaling type 'yarn' is not supported; supported: \('default', "):
        config(positional_embedding="rotary", rope_scaling={"rope_type": "yarn", "factor": 4.0})


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("qk_norm", "per_layer"),
        ("rotary_style", "llama"),
        ("positional_embedding", "alibi"),
        ("normalization", "batch"),
    ],
)
def test_choices_are_refused_outside_their_literal(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}='{value}' is not one of \("):
        config(**{field: value})


@pytest.mark.parametrize("window", [0, -1])
def test_sliding_window_must_be_positive(window):
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        config(sliding_window=window)


def test_window_applies_to_the_chosen_layers_only():
    assert [config(sliding_window=4).window(i) for i in range(3)] == [4, 4, 4]
    assert [config(sliding_window=4, sliding_window_layers=[1]).window(i) for i in range(3)] == [None, 4, None]
    assert [config(sliding_window=4, sliding_window_layers=[]).window(i) for i in range(3)] == [None, None, None]
    assert config(sliding_window_layers=[0]).window(0) is None  # no window length, no window


def test_attention_only_models_have_no_mlp():
    cfg = config(attn_only=True, d_mlp=64)
    assert cfg.d_mlp == 0 and not cfg.has_mlp
    assert not config(d_mlp=0).has_mlp and config().has_mlp and config().d_mlp == 128


def test_every_option_survives_a_round_trip_through_json():
    cfg = config(
        n_key_value_heads=2,
        act_fn="silu",
        gated_mlp=True,
        normalization="rmsnorm",
        eps=1e-6,
        norm_weight_offset=1.0,
        pre_norm=True,
        post_norm=True,
        qk_norm="per_head",
        positional_embedding="rotary",
        rotary_dim=4,
        rotary_style="gptj",
        rotary_base=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        attn_scale=3.0,
        attn_softcap=50.0,
        final_softcap=30.0,
        sliding_window=8,
        sliding_window_layers=[0, 2],
        ungroup_grouped_query_attention=True,
        parallel_attn_mlp=True,
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        embed_scale=32**0.5,
        unembed_bias=True,
        dtype=torch.bfloat16,
    )
    restored = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert restored == cfg
    assert restored.window(1) is None and restored.window(2) == 8
    assert json.loads(cfg.to_json())["dtype"] == "bfloat16"


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields: \['n_kv_heads'\]"):
        ModelConfig.from_dict({**BASE, "n_kv_heads": 2})


@pytest.mark.parametrize(
    ("scaling", "missing"),
    [
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "dynamic", "factor": 2.0}, "original_max_position_embeddings"),
        ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}, "low_freq_factor"),
    ],
)
def test_rope_scaling_must_give_what_its_kind_needs(scaling, missing):
    with pytest.raises(ValueError, match=f"needs .*{missing}"):
        ModelConfig(
            n_layers=1, d_model=16, n_heads=2, d_vocab=10, n_ctx=8, positional_embedding="rotary", rope_scaling=scaling
        )


def test_dynamic_rope_needs_more_than_two_rotary_dimensions():
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}
    with pytest.raises(ValueError, match="rotary_dim > 2"):
        ModelConfig(
            n_layers=1,
            d_model=16,
            n_heads=2,
            d_vocab=10,
            n_ctx=8,
            positional_embedding="rotary",
            rotary_dim=2,
            rope_scaling=scaling,
        )
