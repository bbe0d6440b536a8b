"""Decoding and the generation loop on random models built from a ModelConfig alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.model.generate import next_token, nucleus
from mechscope.model.inputs import InputError
from tests.conftest import random_model

ROTARY_GQA = dict(positional_embedding="rotary", normalization="rmsnorm", n_key_value_heads=2, gated_mlp=True)


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.0, 4.5]])
    assert next_token(logits).tolist() == [1, 0]


@given(seed=st.integers(0, 10_000), k=st.integers(1, 6))
@settings(max_examples=30, deadline=None)
def test_top_k_samples_only_among_the_k_most_likely(seed, k):
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(seed))
    allowed = logits.topk(k, dim=-1).indices
    for _ in range(5):
        chosen = next_token(logits, temperature=1.0, top_k=k, generator=torch.Generator().manual_seed(seed))
        assert all(chosen[row] in allowed[row] for row in range(4))


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(nucleus(probs.log(), top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert torch.isfinite(nucleus(probs.log(), top_p=0.01)).sum() == 1  # always at least the best token
    shuffled = probs[:, [2, 0, 3, 1]]
    assert torch.isfinite(nucleus(shuffled.log(), top_p=0.7)).tolist() == [[False, True, False, True]]


def test_sampling_is_reproducible_with_a_generator_and_temperature_sharpens():
    model = random_model()
    tokens = torch.randint(0, 50, (2, 4))
    first = model.generate(tokens, 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    again = model.generate(tokens, 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    cold = model.generate(tokens, 6, temperature=1e-4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(cold, model.generate(tokens, 6))  # near-zero temperature is greedy


@pytest.mark.parametrize("overrides", [{}, ROTARY_GQA], ids=["learned", "rotary-gqa"])
def test_cache_and_no_cache_give_the_same_tokens_and_stream_equals_generate(overrides):
    model = random_model(**overrides)
    tokens = torch.randint(0, 50, (3, 5))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    cached = model.generate(tokens, 8, attention_mask=mask)
    assert torch.equal(cached, model.generate(tokens, 8, attention_mask=mask, use_kv_cache=False))
    streamed = torch.stack(list(model.generate_stream(tokens, 8, attention_mask=mask)), dim=1)
    assert torch.equal(streamed, cached[:, 5:])


def test_stop_tokens_finish_rows_and_pad_them():
    model = random_model()
    tokens = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(0))
    free = model.generate(tokens, 8)
    stop = int(free[0, 6])  # a token row 0 produces on its third step
    stopped = model.generate(tokens, 8, stop_tokens=[stop], pad_token=49)
    first_stop = (free[0, 4:] == stop).nonzero()[0].item()
    assert torch.equal(stopped[0, 4 : 4 + first_stop + 1], free[0, 4 : 4 + first_stop + 1])
    assert (stopped[0, 4 + first_stop + 1 :] == 49).all()  # finished rows get the pad token
    if stop not in free[1, 4:].tolist():  # the other row carries on until every row stopped or the limit
        assert torch.equal(stopped[1, : stopped.shape[1]], free[1, : stopped.shape[1]])


def test_hooks_are_active_on_every_step():
    model = random_model(**ROTARY_GQA)
    seen: list[tuple[int, ...]] = []
    model.generate(
        torch.randint(0, 50, (1, 5)),
        4,
        fwd_hooks=[("blocks.0.attn.hook_pattern", lambda pattern, hook: seen.append(tuple(pattern.shape)))],
    )
    # the prompt once, then one new query per step attending to everything so far
    assert seen == [(1, 4, 5, 5), (1, 4, 1, 6), (1, 4, 1, 7), (1, 4, 1, 8)]


def test_a_hook_steers_generation():
    model = random_model()
    tokens = torch.randint(0, 50, (1, 4))

    def force_token_7(resid, hook):
        return resid + 100.0 * model.W_U[:, 7] / model.W_U[:, 7].norm()

    steered = model.generate(tokens, 5, fwd_hooks=[("blocks.2.hook_resid_post", force_token_7)])
    assert (steered[0, 4:] == 7).all()
    assert not (model.generate(tokens, 5)[0, 4:] == 7).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature must be >= 0"),
        (dict(max_new_tokens=2, top_k=0), "top_k must be a positive integer"),
        (dict(max_new_tokens=2, top_p=1.5), r"top_p must lie in \(0, 1\]"),
        (dict(max_new_tokens=30), "exceeds the model's context of n_ctx=24"),
    ],
)
def test_bad_generation_options_are_clear_errors(options, message):
    model = random_model()
    with pytest.raises(InputError, match=message):
        model.generate(torch.randint(0, 50, (1, 4)), **options)
