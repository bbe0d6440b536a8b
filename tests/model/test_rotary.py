"""Rotary position embeddings, checked against HuggingFace's own implementations (Llama's
rotate-half, GPT-J's rotate-every-two, the rope-scaling frequency functions) and against the
property that makes them useful: a score depends on the distance between positions only."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gptj import modeling_gptj
from transformers.models.llama import modeling_llama

from mechscope import ModelConfig
from mechscope.model.rotary import inverse_frequencies, llama3_frequencies, quarter_turn, rotary_angles, rotate
from tests.conftest import random_model

even = st.integers(1, 8).map(lambda n: 2 * n)


def rotary_config(d_head: int, rotary_dim: int | None = None, **overrides) -> ModelConfig:
    fields = dict(n_layers=1, d_model=2 * d_head, n_heads=2, d_vocab=10, n_ctx=256, positional_embedding="rotary")
    return ModelConfig(**{**fields, "rotary_dim": rotary_dim, **overrides})


def hf_config(rotary_dim: int, base: float, max_positions: int = 64, **rope) -> LlamaConfig:
    """A Llama config whose head is exactly the rotated part, so HF's frequencies are comparable."""
    return LlamaConfig(
        hidden_size=rotary_dim,
        num_attention_heads=1,
        head_dim=rotary_dim,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": base, **rope},
    )


# ------------------------------------------------------------------ frequencies
@settings(max_examples=15, deadline=None)
@given(dim=even, base=st.sampled_from([100.0, 10000.0, 500000.0]))
def test_default_frequencies_match_llama(dim, base):
    cfg = rotary_config(dim, rotary_base=base)
    expected, _ = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config(dim, base))
    torch.testing.assert_close(inverse_frequencies(cfg, seq_len=10), expected, atol=0, rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(dim=even, factor=st.floats(1.0, 16.0), partial=st.booleans())
def test_linear_scaling_matches_transformers(dim, factor, partial):
    d_head = dim + 4 if partial else dim  # only the rotary dimensions get frequencies
    cfg = rotary_config(d_head, dim, rope_scaling={"rope_type": "linear", "factor": factor})
    expected, _ = ROPE_INIT_FUNCTIONS["linear"](hf_config(dim, 10000.0, rope_type="linear", factor=factor))
    torch.testing.assert_close(inverse_frequencies(cfg, seq_len=10), expected, atol=0, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(dim=st.integers(2, 8).map(lambda n: 2 * n), factor=st.floats(1.0, 8.0), seq_len=st.integers(1, 200))
def test_dynamic_scaling_matches_transformers(dim, factor, seq_len):
    """Below the trained length the frequencies are the defaults; beyond it the base grows."""
    trained = 32
    scaling = {"rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": trained}
    cfg = rotary_config(dim, rope_scaling=scaling)
    hf = hf_config(dim, 10000.0, max_positions=trained, rope_type="dynamic", factor=factor)
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, seq_len=seq_len)
    torch.testing.assert_close(inverse_frequencies(cfg, seq_len), expected, atol=0, rtol=1e-5)
    default = inverse_frequencies(rotary_config(dim), seq_len)
    assert torch.equal(inverse_frequencies(cfg, seq_len), default) == (seq_len <= trained)


@settings(max_examples=15, deadline=None)
@given(
    dim=st.integers(2, 16).map(lambda n: 2 * n),
    base=st.sampled_from([10000.0, 500000.0]),
    factor=st.floats(1.0, 32.0),
    low=st.floats(0.5, 2.0),
    spread=st.floats(1.5, 8.0),
    trained=st.sampled_from([16, 64, 1024]),
)
def test_llama3_scaling_matches_transformers(dim, base, factor, low, spread, trained):
    params = dict(factor=factor, low_freq_factor=low, high_freq_factor=low * spread)
    params["original_max_position_embeddings"] = trained
    cfg = rotary_config(dim, rotary_base=base, rope_scaling={"rope_type": "llama3", **params})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config(dim, base, rope_type="llama3", **params))
    torch.testing.assert_close(inverse_frequencies(cfg, seq_len=10), expected, atol=0, rtol=1e-5)


def test_llama3_scaling_has_three_bands():
    """Short wavelengths kept, long ones divided by the factor, the band between blended."""
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    inv_freq = inverse_frequencies(rotary_config(16), 0)
    scaled = llama3_frequencies(inv_freq, scaling)
    wavelength = 2 * math.pi / inv_freq
    short, long = wavelength < 64 / 4, wavelength > 64 / 1
    middle = ~short & ~long
    assert short.any() and long.any() and middle.any()
    assert torch.equal(scaled[short], inv_freq[short])
    torch.testing.assert_close(scaled[long], inv_freq[long] / 8)
    assert ((scaled[middle] < inv_freq[middle]) & (scaled[middle] > inv_freq[middle] / 8)).all()


# ------------------------------------------------------------------ angles and rotation
@settings(max_examples=15, deadline=None)
@given(
    dim=even,
    kind=st.sampled_from(["default", "linear", "dynamic", "llama3"]),
    batch=st.integers(1, 3),
    length=st.integers(1, 12),
    offset=st.integers(0, 100),
)
def test_angles_match_llama_rotary_embedding(dim, kind, batch, length, offset):
    """cos and sin of every position, NeoX layout, rope-scaling included (dynamic past its length)."""
    dim = max(dim, 4) if kind == "dynamic" else dim  # dynamic's exponent dim / (dim - 2) needs dim > 2
    params = {
        "default": {},
        "linear": {"factor": 4.0},
        "dynamic": {"factor": 2.0},
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    }[kind]
    trained = 32  # HF's dynamic kind reads it from max_position_embeddings, llama3 from the parameters
    length_key = {"original_max_position_embeddings": trained}
    scaling = None if kind == "default" else {"rope_type": kind, **params}
    if kind in ("dynamic", "llama3"):
        scaling.update(length_key)
    cfg = rotary_config(dim, rope_scaling=scaling)
    hf_params = {**params, **length_key} if kind == "llama3" else params
    max_positions = 2 * trained if kind == "llama3" else trained
    hf = modeling_llama.LlamaRotaryEmbedding(hf_config(dim, 10000.0, max_positions, rope_type=kind, **hf_params))
    positions = torch.randint(0, 100, (batch, length))
    positions[0, -1] = offset  # the largest position decides the dynamic base
    cos, sin = rotary_angles(cfg, positions, torch.float32)
    expected_cos, expected_sin = hf(torch.zeros(1), positions)
    torch.testing.assert_close(cos, expected_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, expected_sin, atol=1e-6, rtol=0)


@settings(max_examples=20, deadline=None)
@given(d_head=even, rotary_half=st.integers(1, 8), heads=st.integers(1, 3), length=st.integers(1, 8))
def test_neox_rotation_matches_llama_apply_rotary_pos_emb(d_head, rotary_half, heads, length):
    rotary_dim = min(2 * rotary_half, d_head)  # partial rotary: the remaining dimensions pass through
    cfg = rotary_config(d_head, rotary_dim)
    q, k = torch.randn(2, 2, length, heads, d_head).unbind(0)
    positions = torch.randint(0, 64, (2, length))
    cos_sin = rotary_angles(cfg, positions, torch.float32)
    hf_cos, hf_sin = modeling_llama.LlamaRotaryEmbedding(hf_config(rotary_dim, 10000.0))(q, positions)
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(
        q[..., :rotary_dim], k[..., :rotary_dim], hf_cos, hf_sin, unsqueeze_dim=2
    )
    for original, theirs in ((q, hf_q), (k, hf_k)):
        ours = rotate(original, cos_sin, rotary_dim, "neox")
        torch.testing.assert_close(ours[..., :rotary_dim], theirs, atol=1e-5, rtol=0)
        assert torch.equal(ours[..., rotary_dim:], original[..., rotary_dim:])


@settings(max_examples=20, deadline=None)
@given(d_head=even, rotary_half=st.integers(1, 8), heads=st.integers(1, 3), length=st.integers(1, 8))
def test_gptj_rotation_matches_gptj_apply_rotary_pos_emb(d_head, rotary_half, heads, length):
    rotary_dim = min(2 * rotary_half, d_head)
    cfg = rotary_config(d_head, rotary_dim, rotary_style="gptj")
    x = torch.randn(2, length, heads, d_head)
    positions = torch.randint(0, 64, (2, length))
    sincos = modeling_gptj.create_sinusoidal_positions(64, rotary_dim)[positions]
    sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
    expected = modeling_gptj.apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos)
    ours = rotate(x, rotary_angles(cfg, positions, torch.float32), rotary_dim, "gptj")
    torch.testing.assert_close(ours[..., :rotary_dim], expected, atol=1e-5, rtol=0)
    assert torch.equal(ours[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_quarter_turn_matches_transformers_and_is_a_right_angle(style):
    x = torch.randn(2, 3, 4, 8)
    reference = modeling_llama.rotate_half(x) if style == "neox" else modeling_gptj.rotate_every_two(x)
    turned = quarter_turn(x, style)
    assert torch.equal(turned, reference)
    assert torch.equal(quarter_turn(turned, style), -x)  # two quarter turns: a half turn
    torch.testing.assert_close((x * turned).sum(-1), torch.zeros(2, 3, 4), atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    d_head=even,
    rotary_half=st.integers(1, 8),
    style=st.sampled_from(["neox", "gptj"]),
    m=st.integers(0, 60),
    n=st.integers(0, 60),
    shift=st.integers(0, 60),
)
def test_scores_depend_on_relative_position_only(d_head, rotary_half, style, m, n, shift):
    rotary_dim = min(2 * rotary_half, d_head)
    cfg = rotary_config(d_head, rotary_dim, rotary_style=style)
    q, k = torch.randn(2, 1, 1, 1, d_head).unbind(0)

    def score(query_pos: int, key_pos: int) -> torch.Tensor:
        rot_q = rotate(q, rotary_angles(cfg, torch.tensor([[query_pos]]), torch.float32), rotary_dim, style)
        rot_k = rotate(k, rotary_angles(cfg, torch.tensor([[key_pos]]), torch.float32), rotary_dim, style)
        return (rot_q * rot_k).sum()

    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_rotation_preserves_norms_and_is_the_identity_at_position_zero(style):
    cfg = rotary_config(8, rotary_style=style)
    x = torch.randn(1, 5, 2, 8)
    rotated = rotate(x, rotary_angles(cfg, torch.arange(5)[None], torch.float32), 8, style)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(rotated[:, 0], x[:, 0])
    unit = torch.zeros(1, 2, 1, 8)
    unit[..., 0] = 1.0  # the first pair turns by exactly 1 radian per position
    turned = rotate(unit, rotary_angles(cfg, torch.tensor([[0, 1]]), torch.float32), 8, style)
    torch.testing.assert_close((turned[0, 0] * turned[0, 1]).sum(), torch.tensor(math.cos(1.0)))


# ------------------------------------------------------------------ in the model
ROTARY_MODELS = {
    "neox": dict(positional_embedding="rotary"),
    "gptj-partial": dict(positional_embedding="rotary", rotary_style="gptj", rotary_dim=4),
    "llama3": dict(
        positional_embedding="rotary",
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8,
        ),
    ),
}


@pytest.mark.parametrize("overrides", ROTARY_MODELS.values(), ids=ROTARY_MODELS.keys())
def test_shifting_every_position_leaves_a_rotary_model_unchanged(overrides):
    """End to end: only distances between positions matter (a learned-position model differs)."""
    tokens = torch.randint(0, 50, (2, 7))
    shifted = (torch.arange(7) + 9).expand(2, 7)
    with torch.no_grad():
        model = random_model(**overrides)
        torch.testing.assert_close(model(tokens, position_ids=shifted), model(tokens), atol=1e-4, rtol=0)
        learned = random_model()
        assert not torch.allclose(learned(tokens, position_ids=shifted), learned(tokens), atol=1e-3)


def test_partial_rotary_leaves_the_remaining_dimensions_alone():
    model = random_model(positional_embedding="rotary", rotary_dim=4)
    _, cache = model.run_with_cache(torch.randint(0, 50, (2, 6)), names_filter=lambda n: "blocks.0.attn.hook_" in n)
    for name in ("q", "k"):
        before, after = cache[f"blocks.0.attn.hook_{name}"], cache[f"blocks.0.attn.hook_rot_{name}"]
        assert torch.equal(after[..., 4:], before[..., 4:])
        assert not torch.allclose(after[:, 1:, :, :4], before[:, 1:, :, :4])  # position 0 is not rotated
        torch.testing.assert_close(after[:, 0], before[:, 0])


def test_rotary_positions_count_real_tokens_only():
    """A left-padded row is rotated exactly like the same prompt without padding."""
    model = random_model(positional_embedding="rotary")
    tokens = torch.randint(0, 50, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    names = "blocks.0.attn.hook_rot_k"
    _, alone = model.run_with_cache(tokens, names_filter=names)
    _, left = model.run_with_cache(padded, attention_mask=mask, names_filter=names)
    torch.testing.assert_close(left[names][:, 3:], alone[names], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], model(tokens), atol=1e-5, rtol=0)
