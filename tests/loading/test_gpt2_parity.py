"""mechscope against HuggingFace's own GPT-2 on the same tiny random checkpoint, in float32.

Tolerance: 1e-4 absolute on logits, hidden states, attention probabilities and the loss
(DESIGN.md §3). Observed differences are ~1e-7: the two implementations order a few float
operations differently.
"""

from __future__ import annotations

import pytest
import torch

from mechscope import Model

ATOL = 1e-4


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, which is what mechscope does by default; HF's GPT-2
    counts 0, 1, 2, ... unless told, so the tests tell it."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [12, 7, 3]
    tokens = torch.randint(1, 320, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, 12 - n :] = 1
        else:
            mask[row, :n] = 1
    return tokens.masked_fill(mask == 0, 0), mask


def test_logits_match_huggingface(model, hf_gpt2, tokens):
    with torch.no_grad():
        ours, theirs = model(tokens), hf_gpt2(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_single_prompt_from_text_matches(model, hf_gpt2):
    prompt = "When Mary and John went to the store, John gave a bag to"
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), hf_gpt2(tokens).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_at_real_positions(model, hf_gpt2, side):
    tokens, mask = padded_batch(side)
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
        theirs = hf_gpt2(tokens, attention_mask=mask, position_ids=hf_positions(mask)).logits
    real = mask.bool()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_real_tokens(model, side):
    """Each padded row equals the same sequence run alone: padding is fully masked."""
    tokens, mask = padded_batch(side)
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask)
        for row in range(tokens.shape[0]):
            real = mask[row].bool()
            alone = model(tokens[row, real][None])
            torch.testing.assert_close(batched[row, real], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("hook", "hf_output"), [("resid_pre", "hidden_states"), ("pattern", "attentions")], ids=["resid", "pattern"]
)
def test_activations_equal_huggingface_outputs(model, hf_gpt2, tokens, hook, hf_output):
    """hook_resid_pre of block i is HF's hidden state i; hook_pattern is HF's attention probabilities."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(f"hook_{hook}"))
    with torch.no_grad():
        theirs = getattr(hf_gpt2(tokens, output_hidden_states=True, output_attentions=True), hf_output)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[hook, layer], theirs[layer], atol=ATOL, rtol=0)


def test_pattern_matches_with_left_padding(model, hf_gpt2):
    tokens, mask = padded_batch("left")
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.endswith("hook_pattern"))
    with torch.no_grad():
        attentions = hf_gpt2(tokens, attention_mask=mask, position_ids=hf_positions(mask), output_attentions=True)
    real_queries = mask.bool()
    for layer in range(model.cfg.n_layers):
        ours = cache["pattern", layer].transpose(1, 2)[real_queries]  # [query, head, key]
        theirs = attentions.attentions[layer].transpose(1, 2)[real_queries]
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_loss_equals_huggingface_loss(model, hf_gpt2, tokens):
    with torch.no_grad():
        ours = model(tokens, return_type="loss")
        theirs = hf_gpt2(tokens, labels=tokens).loss
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_loss_equals_huggingface_loss(model, hf_gpt2, side):
    """Only (real → real) next-token pairs count: a label is ignored when it or the token
    predicting it is padding."""
    tokens, mask = padded_batch(side)
    counted = torch.zeros_like(mask)
    counted[:, 1:] = mask[:, 1:] * mask[:, :-1]
    labels = tokens.masked_fill(counted == 0, -100)
    with torch.no_grad():
        ours = model(tokens, return_type="loss", attention_mask=mask)
        theirs = hf_gpt2(tokens, attention_mask=mask, position_ids=hf_positions(mask), labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_from_hf_equals_from_pretrained(model, hf_gpt2, tokens):
    converted = Model.from_hf(hf_gpt2)
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens), model(tokens), atol=0, rtol=0)


def test_untied_unembedding_is_read_from_lm_head(tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    from mechscope.loading.tiny import save_tiny_gpt2

    directory = save_tiny_gpt2(tmp_path, with_tokenizer=False, tie_word_embeddings=False, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    with torch.no_grad():
        torch.testing.assert_close(Model.from_pretrained(directory)(tokens), hf(tokens).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_new"])
def test_activation_functions_match(tmp_path, tokens, activation):
    from transformers import AutoModelForCausalLM

    from mechscope.loading.tiny import save_tiny_gpt2

    directory = save_tiny_gpt2(tmp_path, with_tokenizer=False, activation_function=activation, n_inner=48)
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(Model.from_pretrained(directory)(tokens), hf(tokens).logits, atol=ATOL, rtol=0)
