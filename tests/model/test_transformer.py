from __future__ import annotations

import pytest
import torch

from mechscope import ModelConfig, Transformer
from mechscope.model.transformer import next_token_loss
from tests.conftest import random_model


def test_config_defaults_and_validation():
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=4, d_vocab=10, n_ctx=8)
    assert (cfg.d_head, cfg.d_mlp, cfg.attn_scale) == (4, 64, 2.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(n_layers=1, d_model=10, n_heads=4, d_vocab=10, n_ctx=8)
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        ModelConfig(n_layers=0, d_model=16, n_heads=4, d_vocab=10, n_ctx=8)
    with pytest.raises(ValueError, match="n_heads must be a positive integer"):
        ModelConfig(n_layers=1, d_model=16, n_heads=0, d_vocab=10, n_ctx=8)
    assert ModelConfig.from_dict({**cfg.to_dict(), "dtype": "bfloat16"}).dtype == torch.bfloat16


@pytest.mark.bad_input
def test_config_refuses_values_outside_its_choices():
    with pytest.raises(ValueError, match=r"act_fn='swish' is not one of \('gelu'"):
        ModelConfig(n_layers=1, d_model=16, n_heads=4, d_vocab=10, n_ctx=8, act_fn="swish")
    with pytest.raises(ValueError, match="normalization='rms'"):
        ModelConfig(n_layers=1, d_model=16, n_heads=4, d_vocab=10, n_ctx=8, normalization="rms")
    with pytest.raises(ValueError, match=r"dtype must be a torch\.dtype"):
        ModelConfig(n_layers=1, d_model=16, n_heads=4, d_vocab=10, n_ctx=8, dtype="float32")


def test_seeded_models_are_reproducible():
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_vocab=20, n_ctx=8)
    a, b = Transformer(ModelConfig(**cfg, seed=5)), Transformer(ModelConfig(**cfg, seed=5))
    c = Transformer(ModelConfig(**cfg, seed=6))
    tokens = torch.arange(6)
    torch.testing.assert_close(a(tokens), b(tokens), atol=0, rtol=0)
    assert not torch.allclose(a(tokens), c(tokens))


def test_stop_then_start_at_layer_recomposes_the_forward_pass():
    model = random_model()
    tokens = torch.randint(0, 50, (2, 8))
    for layer in range(model.cfg.n_layers + 1):
        resid = model(tokens, stop_at_layer=layer)
        assert resid.shape == (2, 8, 32)
        logits = model(resid, start_at_layer=layer)
        torch.testing.assert_close(logits, model(tokens), atol=1e-5, rtol=0)


def test_stop_at_layer_returns_the_cached_residual_stream():
    model = random_model()
    tokens = torch.randint(0, 50, (2, 8))
    _, cache = model.run_with_cache(tokens, stop_at_layer=-1)
    torch.testing.assert_close(model(tokens, stop_at_layer=-1), cache["resid_post", 1])
    assert "blocks.2.hook_resid_pre" not in cache  # block 2 never ran
    assert "ln_final.hook_scale" not in cache


def test_start_at_layer_with_padding_and_loss():
    model = random_model()
    tokens = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    resid = model(tokens, attention_mask=mask, stop_at_layer=1)
    loss = model(resid, "loss", start_at_layer=1, tokens=tokens, attention_mask=mask)
    torch.testing.assert_close(loss, model(tokens, "loss", attention_mask=mask), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs the tokens"):
        model(resid, "loss", start_at_layer=1)


def test_return_types():
    model = random_model()
    tokens = torch.randint(0, 50, (2, 8))
    logits = model(tokens)
    loss = model(tokens, "loss")
    both = model(tokens, "both")
    assert model(tokens, None) is None
    torch.testing.assert_close(both[0], logits)
    torch.testing.assert_close(both[1], loss)
    per_token = model(tokens, "loss", loss_per_token=True)
    assert per_token.shape == (2, 7)
    torch.testing.assert_close(per_token.mean(), loss)


def test_loss_is_cross_entropy_of_the_next_token():
    logits = torch.randn(2, 5, 11)
    tokens = torch.randint(0, 11, (2, 5))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(next_token_loss(logits, tokens), expected)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        next_token_loss(logits[:, :1], tokens[:, :1])


def test_attention_only_model_has_no_mlp_hooks():
    model = random_model(attn_only=True)
    assert not any("mlp" in name or "resid_mid" in name for name in model.hook_dict)
    _, cache = model.run_with_cache(torch.arange(5))
    decomposed = cache.decompose_resid()
    torch.testing.assert_close(decomposed.sum(0), cache["resid_post", -1], atol=1e-5, rtol=0)


def test_model_without_norms_or_positions_runs():
    model = Transformer(
        ModelConfig(
            n_layers=2, d_model=16, n_heads=2, d_vocab=20, n_ctx=8, normalization="none", positional_embedding="none"
        )
    )
    assert "hook_pos_embed" not in model.hook_dict
    assert model(torch.arange(5)).shape == (1, 5, 20)


def test_trains_by_gradient_descent():
    model = random_model().train()
    tokens = torch.randint(0, 50, (4, 12))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(tokens, "loss").item()
    for _ in range(20):
        optimiser.zero_grad()
        model(tokens, "loss").backward()
        optimiser.step()
    assert model(tokens, "loss").item() < first - 0.5
    assert model.blocks[0].attn.W_Q.stride() == model.blocks[0].attn.W_K.stride()  # layout survives steps


def test_stacked_weight_views():
    model = random_model()
    assert model.W_Q.shape == (3, 4, 32, 8)
    assert model.W_O.shape == (3, 4, 8, 32)
    assert model.W_U.shape == (32, 50)
    assert model.W_E.shape == (50, 32)
    assert model.W_pos.shape == (24, 32)


def test_stacked_weights_index_query_heads_with_grouped_query_attention():
    model = random_model(n_key_value_heads=2)
    assert model.blocks[0].attn.W_K.shape == (2, 32, 8)
    assert model.W_K.shape == model.W_Q.shape == (3, 4, 32, 8)
    # query heads 0 and 1 share key/value head 0; heads 2 and 3 share head 1
    assert torch.equal(model.W_K[1, 1], model.blocks[1].attn.W_K[0])
    assert torch.equal(model.W_V[2, 3], model.blocks[2].attn.W_V[1])
