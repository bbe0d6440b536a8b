"""Every supported family against HuggingFace's own implementation, on tiny random checkpoints
built with transformers' config classes (tests/loading/zoo) and loaded through
``Model.from_pretrained(directory)``, exactly as a hub model would be.

Tolerance: 1e-4 absolute in float32 on logits, hidden states and the loss (DESIGN.md §3).
Padded batches give HuggingFace the positions counted over real tokens, as its ``generate``
does; mechscope derives them from the attention mask by itself.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from mechscope import Model
from tests.loading.zoo import VARIANTS, VOCAB, save_variant

ATOL = 1e-4
SEQ = 12


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(mechscope model, HuggingFace model) loaded from the same saved checkpoint."""
    from transformers import AutoModelForCausalLM

    directory = save_variant(request.param, tmp_path_factory.mktemp(request.param))
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    return Model.from_pretrained(directory), hf


def hf_logits(hf, tokens, mask=None, **kwargs):
    extra = {}
    if mask is not None:
        extra["attention_mask"] = mask
        if "position_ids" in inspect.signature(hf.forward).parameters:
            extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(tokens, **extra, **kwargs)


def padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [SEQ, 7, 3]
    tokens = torch.randint(1, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(3, SEQ, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, SEQ - n :] = 1
        else:
            mask[row, :n] = 1
    return tokens.masked_fill(mask == 0, 0), mask


def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))


def test_single_prompt_logits(pair):
    model, hf = pair
    tokens = prompt()
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(ours, hf_logits(hf, tokens).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_logits(pair, side):
    model, hf = pair
    tokens, mask = padded_batch(side)
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
    theirs = hf_logits(hf, tokens, mask).logits
    real = mask.bool()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)


def test_resid_pre_equals_hidden_states(pair):
    model, hf = pair
    tokens = prompt()
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
    hidden = hf_logits(hf, tokens, output_hidden_states=True).hidden_states
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache["resid_pre", layer], hidden[layer], atol=ATOL, rtol=0)


def test_loss(pair):
    model, hf = pair
    tokens = prompt()
    with torch.no_grad():
        ours = model(tokens, return_type="loss")
    torch.testing.assert_close(ours, hf_logits(hf, tokens, labels=tokens).loss, atol=ATOL, rtol=0)


def test_pattern_hooked_path_agrees(pair):
    """Hooking the pattern switches to the explicit attention path; logits must not move."""
    model, _ = pair
    tokens, mask = padded_batch("left")
    with torch.no_grad():
        fused = model(tokens, attention_mask=mask)
    explicit, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: "hook_pattern" in n)
    real = mask.bool()
    assert len(cache) == model.cfg.n_layers
    torch.testing.assert_close(explicit[real], fused[real], atol=ATOL, rtol=0)
