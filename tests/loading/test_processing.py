"""Weight processing (mechscope.loading.processing) on every family of the zoo.

Each step must leave the log-probabilities where they were (1e-4 in float32, a single prompt
and a left-padded batch), alone and all together; a step that would not be exact for a model
must be refused before anything changes. Which steps apply is written here per family, not
read from the module under test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mechscope import Model, Transformer
from mechscope.loading import processing
from mechscope.loading.processing import is_norm, process_weights
from tests.conftest import random_model
from tests.loading.zoo import VARIANTS, VOCAB, save_variant

ATOL = 1e-4
STEPS = list(processing.STEPS)
# Families whose every reader of the residual stream is a LayerNorm: the mean is invisible.
CENTRED_FAMILIES = {"gpt2", "gpt_neo", "gpt_neox", "gptj", "opt"}
WRITERS = {"W_E", "W_pos", "W_O", "b_O", "W_out", "b_out"}  # what writes to the residual stream


def refusals(variant: str, model: Model) -> dict[str, str]:
    """The steps this variant must refuse, with a phrase the error must contain."""
    refused = {}
    if variant.split("-")[0] not in CENTRED_FAMILIES:
        refused["center_writing_weights"] = "center_writing_weights does not apply"
    if model.cfg.final_softcap is not None:
        refused["center_unembed"] = "final_softcap"
    return refused


def inputs() -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """A single prompt, and a left-padded batch (rows of 12, 7 and 3 real tokens)."""
    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(12) >= torch.tensor([[0], [5], [9]])).long()
    return [(prompt, None), (tokens.masked_fill(mask == 0, 0), mask)]


def log_probs(model: Transformer) -> list[torch.Tensor]:
    """Log-probabilities at every real position of each input."""
    out = []
    with torch.no_grad():
        for tokens, mask in inputs():
            lp = model(tokens, attention_mask=mask).log_softmax(-1)
            out.append(lp if mask is None else lp[mask.bool()])
    return out


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, checkpoint directory, log-probabilities of the unprocessed model)."""
    directory = save_variant(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, directory, log_probs(Model.from_pretrained(directory))


def load(variant) -> tuple[str, Model, list[torch.Tensor]]:
    name, directory, reference = variant
    return name, Model.from_pretrained(directory), reference


def applicable(name: str, model: Model) -> dict[str, bool]:
    return {step: step not in refusals(name, model) for step in STEPS}


def assert_same_log_probs(model: Model, reference: list[torch.Tensor]) -> None:
    for ours, theirs in zip(log_probs(model), reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def state(model: Model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("step", STEPS)
def test_step_alone_keeps_log_probs_or_is_refused(variant, step):
    name, model, reference = load(variant)
    refused = refusals(name, model)
    if step in refused:
        before = state(model)
        with pytest.raises(ValueError, match=refused[step]):
            process_weights(model, **{step: True})
        torch.testing.assert_close(state(model), before, atol=0, rtol=0)
        assert model.cfg.extra.get("processed", []) == []
        return
    process_weights(model, **{step: True})
    assert model.cfg.extra["processed"] == [step]
    assert_same_log_probs(model, reference)


def test_all_applicable_steps_keep_log_probs(variant):
    name, model, reference = load(variant)
    flags = applicable(name, model)
    process_weights(model, **flags)
    assert model.cfg.extra["processed"] == [step for step in STEPS if flags[step]]
    assert_same_log_probs(model, reference)


def test_a_refused_request_changes_nothing(variant):
    """All four flags at once: either all are exact, or nothing is applied."""
    name, model, reference = load(variant)
    if all(applicable(name, model).values()):
        process_weights(model, **dict.fromkeys(STEPS, True))
        assert model.cfg.extra["processed"] == STEPS
    else:
        before = state(model)
        with pytest.raises(ValueError, match="does not apply to this model"):
            process_weights(model, **dict.fromkeys(STEPS, True))
        torch.testing.assert_close(state(model), before, atol=0, rtol=0)
    assert_same_log_probs(model, reference)


def test_processed_weights_have_their_promised_form(variant):
    name, model, _ = load(variant)
    flags = applicable(name, model)
    post_norms = {k: v.clone() for k, v in model.state_dict().items() if "_post." in k or "_norm." in k}
    process_weights(model, **flags)
    pre_norms = [model.ln_final] + [b.ln1 for b in model.blocks] + [b.ln2 for b in model.blocks if b.has_mlp]
    for norm in filter(is_norm, pre_norms):  # fold_ln: the norm only normalises
        torch.testing.assert_close(norm.w + getattr(norm, "offset", 0.0), torch.ones_like(norm.w), atol=0, rtol=0)
        if getattr(norm, "b", None) is not None:
            assert not norm.b.any()
    for key, value in post_norms.items():  # post-norms and Q/K norms are never folded
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0)
    for block in model.blocks:  # fold_value_biases
        assert block.attn.b_V is None or not block.attn.b_V.any()
    if flags["center_writing_weights"]:
        writers = {k: v for k, v in model.state_dict().items() if k.split(".")[-1] in WRITERS}
        assert {"embed.W_E", "blocks.0.attn.W_O"} <= set(writers)
        for key, W in writers.items():
            torch.testing.assert_close(W.mean(-1), torch.zeros_like(W.mean(-1)), atol=1e-6, rtol=0, msg=key)
    if flags["center_unembed"]:  # mean over the vocabulary
        assert model.W_U.mean(-1).abs().max() < 1e-6
        assert model.unembed.b_U is None or model.unembed.b_U.mean().abs() < 1e-6


def test_config_describes_the_processed_model(variant):
    """Biases created by folding are in the config: a model built from it loads the state dict."""
    name, model, reference = load(variant)
    process_weights(model, **applicable(name, model))
    rebuilt = Transformer(model.cfg).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert_same_log_probs(rebuilt, reference)


def test_applying_twice_is_harmless(variant):
    name, model, reference = load(variant)
    flags = applicable(name, model)
    process_weights(model, **flags)
    once, record = state(model), list(model.cfg.extra["processed"])
    process_weights(model, **flags)
    for step in STEPS:
        if flags[step]:
            processing.STEPS[step](model)
    assert model.cfg.extra["processed"] == record
    torch.testing.assert_close(state(model), once, atol=0, rtol=0)
    assert_same_log_probs(model, reference)


def test_residual_decomposition_still_sums(variant):
    """The parts of the final residual stream sum to it; after fold_ln the final norm is only
    its scale, so the normalised parts sum to the norm's output and their logit attributions
    to the logit (less b_U, and before any soft-cap)."""
    name, model, _ = load(variant)
    process_weights(model, **applicable(name, model))
    tokens, mask = inputs()[1]
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    final, parts = cache["resid_post", -1], cache.decompose_resid()
    torch.testing.assert_close(parts.sum(0), final, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.accumulated_resid()[-1], final, atol=0, rtol=0)
    normalised = cache["ln_final.hook_normalized"]
    torch.testing.assert_close(cache.decompose_resid(apply_ln=True).sum(0), normalised, atol=ATOL, rtol=0)
    target = torch.randint(0, VOCAB, tokens.shape, generator=torch.Generator().manual_seed(3))
    logit = (normalised @ model.W_U).gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(cache.logit_attrs(parts, target).sum(0), logit, atol=ATOL, rtol=0)


def test_tied_unembedding_is_refused(model):
    """Rewriting W_U in place would rewrite a W_E that shares its memory."""
    model.unembed.W_U = nn.Parameter(model.embed.W_E.T)
    for step in ("fold_ln", "center_writing_weights", "center_unembed"):
        with pytest.raises(ValueError, match="share memory"):
            process_weights(model, **{step: True})
    process_weights(model, fold_value_biases=True)


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"post_norm": True}, "post_norm=True"),
        ({"pre_norm": False, "post_norm": True}, "pre_norm=False"),
        ({"normalization": "none"}, "normalization='none'"),
        ({"attn_only": True, "attn_bias": False, "attn_out_bias": False}, None),
    ],
)
def test_configurations_outside_the_zoo(options, refused):
    """Readers that are not all LayerNorms refuse centring; everything else stays exact (a
    model without norms has nothing to fold; an attention-only one has no MLP to touch)."""
    model = random_model(**options)
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(tokens).log_softmax(-1)
    if refused is not None:
        with pytest.raises(ValueError, match=refused):
            process_weights(model, center_writing_weights=True)
    flags = dict.fromkeys(STEPS, True) | {"center_writing_weights": refused is None}
    process_weights(model, **flags)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).log_softmax(-1), before, atol=ATOL, rtol=0)


def test_from_pretrained_flags_equal_processing_afterwards(gpt2_dir):
    steps = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    loaded = Model.from_pretrained(gpt2_dir, **steps)
    afterwards = Model.from_pretrained(gpt2_dir).process_weights(**steps)
    assert loaded.cfg.extra["processed"] == afterwards.cfg.extra["processed"] == list(steps)
    assert state(loaded).keys() == state(afterwards).keys()
    for name, value in state(loaded).items():
        torch.testing.assert_close(value, state(afterwards)[name], atol=0, rtol=0)
    assert "processed" not in Model.from_pretrained(gpt2_dir).cfg.extra  # raw by default
