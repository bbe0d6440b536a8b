"""Half-precision weights: bfloat16 and float16 checkpoints load in that precision, and their
logits stay as close to the float32 reference as HuggingFace's own half-precision logits do."""

from __future__ import annotations

import pytest
import torch

from mechscope import Model
from tests.loading.zoo import VOCAB, save_variant


@pytest.fixture(scope="module", params=["llama-gqa2", "gemma2", "gpt_neox"])
def directory(request, tmp_path_factory):
    return save_variant(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_is_as_close_to_float32_as_huggingface(directory, dtype):
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    model = Model.from_pretrained(directory, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        ours = model(tokens)
        reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)(tokens).logits
        theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)(tokens).logits
    assert ours.dtype == dtype == theirs.dtype and torch.isfinite(ours).all()
    their_error = (theirs.float() - reference).abs().max().item()
    our_error = (ours.float() - reference).abs().max().item()
    assert our_error <= 2 * their_error + 1e-3, (our_error, their_error)
