"""Shared fixtures: tiny random HuggingFace GPT-2 checkpoints written to temporary folders and
loaded through the same code path as a hub model. Nothing touches the network."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from mechscope import Model, ModelConfig, Transformer
from mechscope.loading.tiny import save_tiny_gpt2

# CI explores the same examples every run, so a red build reproduces; locally, examples vary.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; more only contend with the other xdist workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def hf_gpt2(gpt2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_implementation="eager").eval()


@pytest.fixture
def model(gpt2_dir) -> Model:
    return Model.from_pretrained(gpt2_dir)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(1))


def random_model(**overrides) -> Transformer:
    """A small randomly initialised model built from a ModelConfig alone."""
    fields = dict(n_layers=3, d_model=32, n_heads=4, d_vocab=50, n_ctx=24, seed=0, initializer_range=0.2)
    fields.update(overrides)
    model = Transformer(ModelConfig(**fields)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so tests see them
        for name, param in model.named_parameters():
            if not name.split(".")[-1].startswith("W_"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


# A 2-layer attention-only induction organism small enough to train in a second.
TINY_INDUCTION = {
    "d_vocab": 24,
    "n_ctx": 20,
    "d_model": 16,
    "n_heads": 2,
    "batch_size": 4,
    "min_run": 2,
    "max_run": 4,
    "eval_length": 6,
}
