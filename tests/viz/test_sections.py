"""The standard views of a prompt, checked against the library calls they summarise and
against what the language organism is known to do."""

from __future__ import annotations

import random

import pytest
import torch

from mechscope.interventions.metrics import LogitDiff, normalised
from mechscope.interventions.sweeps import head_sweep, resid_sweep
from mechscope.toys.language import grammar
from mechscope.toys.language.evaluation import abc_prompts
from mechscope.toys.zoo import load
from mechscope.viz.attention import unpack_patterns
from mechscope.viz.prompts import InputError
from mechscope.viz.sections import Progress, activation_section, patching_sections, prompt_sections


@pytest.fixture(scope="module")
def language():
    return load("language")


@pytest.fixture(scope="module")
def ioi():
    sample = grammar.ioi(random.Random(3), "held_out", template=1)
    return sample, abc_prompts([sample], 3)[0]


@pytest.fixture(scope="module")
def sections(language, ioi):
    sample, _ = ioi
    return prompt_sections(language, sample.prompt, answer=sample.answer, wrong=" " + sample.subject)


def widgets(section, kind):
    return [w for w in section.widgets if w.kind == kind]


def test_the_prompt_views_come_in_order(sections):
    assert [s.id for s in sections] == ["tokens", "attention", "logit-lens", "attribution", "heads"]
    for section in sections:
        assert section.to_json()["widgets"], section.id


def test_the_predictions_are_the_models(language, ioi, sections):
    sample, _ = ioi
    logits = language(sample.prompt)[0]
    table = widgets(sections[0], "table")[0].data
    assert len(table["rows"]) == logits.shape[0]
    best = logits.argmax(-1).tolist()
    for row, token in zip(table["rows"], best):
        first = next(cell for cell in row if isinstance(cell, dict))
        assert first["text"] == language.to_string([token])
    loss = widgets(sections[0], "tokens")[0].data["values"]
    expected = -logits.log_softmax(-1)[:-1].gather(-1, language.to_tokens(sample.prompt)[0, 1:, None])[:, 0]
    assert loss[0] is None  # the first token has no prediction
    assert torch.allclose(torch.tensor(loss[1:]), expected.detach(), atol=1e-3, rtol=1e-3)


def test_the_attention_view_holds_every_layers_pattern(language, ioi, sections):
    sample, _ = ioi
    _, cache = language.run_with_cache(sample.prompt)
    data = widgets(sections[1], "attention")[0].data
    shown = unpack_patterns(data).float()
    assert shown.shape == (language.cfg.n_layers, language.cfg.n_heads, *cache["blocks.0.attn.hook_pattern"].shape[-2:])
    for layer in range(language.cfg.n_layers):
        assert torch.allclose(shown[layer], cache[f"blocks.{layer}.attn.hook_pattern"][0], atol=1e-4)


def test_the_attribution_adds_up_to_the_logit_difference(language, ioi, sections):
    sample, _ = ioi
    logits = language(sample.prompt)[0, -1].detach()
    difference = (
        logits[language.to_single_token(sample.answer)] - logits[language.to_single_token(" " + sample.subject)]
    )
    bars = widgets(sections[3], "bars")[0].data
    assert bars["total"] == pytest.approx(float(difference), abs=1e-3)


def test_head_detectors_show_the_organisms_induction_head(language, sections):
    """The language organism's induction head is 1.0 (docs/organisms.md): on a repeated list of
    names it scores highest."""
    titles = [w.data["title"] for w in sections[4].widgets]
    assert titles == ["previous-token score", "duplicate-token score", "induction score"]
    repeated = prompt_sections(language, "Mary John Lucy Tom Sam Mary John Lucy Tom Sam")[4]
    induction = torch.tensor(repeated.widgets[2].data["values"])
    assert divmod(int(induction.argmax()), induction.shape[1]) == (1, 0)
    assert repeated.widgets[2].data["zmin"] == 0 and repeated.widgets[2].data["zmax"] == 1


def test_detectors_without_a_template_are_named_not_zeroed(language):
    sections = prompt_sections(language, "Mary went to the store")
    heads = sections[4]
    assert [w.data["title"] for w in heads.widgets] == ["previous-token score"]
    assert "duplicate-token and induction scores are not shown" in heads.description


def test_an_activation_is_shown_per_token(language):
    prompt = "When Mary and John went to the park"
    section = activation_section(language, prompt, "blocks.1.mlp.hook_post", 5)
    _, cache = language.run_with_cache(prompt)
    values = torch.tensor(section.widgets[0].data["values"])
    assert torch.allclose(values, cache["blocks.1.mlp.hook_post"][0, :, 5], atol=1e-4)
    norms = torch.tensor(activation_section(language, prompt, "blocks.0.hook_resid_post").widgets[0].data["values"])
    assert torch.allclose(norms, cache["blocks.0.hook_resid_post"][0].norm(dim=-1), rtol=1e-4)


@pytest.mark.bad_input
def test_bad_activation_requests_say_what_to_do(language):
    with pytest.raises(InputError, match=r"blocks\.1\.mlp\.hook_post"):
        activation_section(language, "Mary", "blocks.1.mlp.hook_pots")
    with pytest.raises(InputError, match=r"index 9999 is out of range: .* \(0\.\.511\)"):
        activation_section(language, "Mary", "blocks.1.mlp.hook_post", 9999)
    with pytest.raises(InputError, match="not one vector per position"):
        activation_section(language, "Mary", "blocks.1.attn.hook_pattern")


def test_patching_maps_are_the_sweeps_normalised(language, ioi):
    sample, corrupted = ioi
    wrong = " " + sample.subject
    fractions = []
    found = patching_sections(
        language, sample.prompt, corrupted, answer=sample.answer, wrong=wrong, progress=fractions.append
    )
    clean, other = language.to_tokens(sample.prompt), language.to_tokens(corrupted)
    base = LogitDiff(answer=language.to_single_token(sample.answer), wrong=language.to_single_token(wrong))
    with torch.no_grad():
        metric = normalised(base, language(clean), language(other))
    resid = torch.tensor(found[0].widgets[0].data["values"])
    heads = torch.tensor(found[0].widgets[1].data["values"])
    assert torch.allclose(resid, resid_sweep(language, clean, other, metric), atol=1e-3)
    assert torch.allclose(heads, head_sweep(language, clean, other, metric), atol=1e-3)
    # docs/techniques.md: under the ABC corruption head 0.1 (which moves the subject's name) restores most
    assert divmod(int(heads.argmax()), heads.shape[1]) == (0, 1)
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert [s.id for s in found] == ["patching", "attribution-patching"]


@pytest.mark.bad_input
def test_patching_refuses_what_it_cannot_compare(language, ioi):
    sample, corrupted = ioi
    options = dict(answer=sample.answer, wrong=" " + sample.subject)
    with pytest.raises(InputError, match="same number of tokens"):
        patching_sections(language, sample.prompt, corrupted + " and more", **options)
    with pytest.raises(InputError, match="same logit difference"):
        patching_sections(language, sample.prompt, sample.prompt, **options)
    with pytest.raises(InputError, match="hook must be one of resid_pre"):
        patching_sections(language, sample.prompt, corrupted, hook="resid_sideways", **options)


def test_progress_weights_each_sweep_by_its_size():
    seen = []
    progress = Progress(seen.append, [30, 10])
    progress.part(0)(1, 2)
    progress.part(1)(1, 1)
    assert seen == [pytest.approx(15 / 40), pytest.approx(1.0)]
    assert Progress(None, [1]).part(0) is False


@pytest.mark.parametrize(
    ("rank", "expected"),
    [
        ([0, 0, 0, 0], "the embeddings on"),
        ([3, 0, 0, 0], "layer 0's output on"),
        ([3, 0, 2, 0], "only at the final layer"),
        ([1, 1, 1, 4], "at no layer"),
    ],
)
def test_where_the_lens_finds_the_answer_is_said_in_words(rank, expected):
    from mechscope.viz.sections import first_top

    assert first_top(rank, ["0_pre", "1_pre", "2_pre", "final_post"]) == expected


def test_a_long_prompt_shows_attention_among_its_last_tokens(language, monkeypatch):
    """Past the widget's budget the attention view keeps the last tokens (and says so), so a
    long prompt on a large model still gets every other section."""
    from mechscope.viz import sections as module

    monkeypatch.setattr(module, "attention_token_budget", lambda n_layers, n_heads: 5)
    prompt = "When Mary and John went to the store, John gave a drink to"
    found = prompt_sections(language, prompt)
    labels = language.to_str_tokens(prompt)
    data = widgets(found[1], "attention")[0].data
    assert data["tokens"] == labels[-5:]
    assert data["first_position"] == len(labels) - 5  # tooltips number tokens as the rest of the page does
    _, cache = language.run_with_cache(prompt)
    shown = unpack_patterns(data).float()
    assert torch.allclose(shown[2, 1], cache["blocks.2.attn.hook_pattern"][0, 1, -5:, -5:], atol=1e-3)
    assert f"The prompt has {len(labels)} tokens" in found[1].description and "the last 5" in found[1].description
    assert len(widgets(found[0], "table")[0].data["rows"]) == len(labels)  # the other sections keep every token


def test_the_loss_view_numbers_tokens_like_the_table(sections, language, ioi):
    data = widgets(sections[0], "tokens")[0].data
    assert data["tokens"] == language.to_str_tokens(ioi[0].prompt)
    assert data["values"][0] is None  # the first token has no prediction, so no loss


def test_hooks_after_the_last_block_can_be_shown(language):
    section = activation_section(language, "Mary went home", "ln_final.hook_normalized", 3)
    _, cache = language.run_with_cache("Mary went home")
    assert torch.allclose(torch.tensor(section.widgets[0].data["values"]), cache["ln_final.hook_normalized"][0, :, 3],
                          atol=1e-4)  # fmt: skip


@pytest.mark.bad_input
def test_the_answer_and_the_wrong_answer_must_differ(language, ioi):
    sample, corrupted = ioi
    with pytest.raises(InputError, match="the answer and the wrong answer are the same token"):
        patching_sections(language, sample.prompt, corrupted, answer=sample.answer, wrong=sample.answer)


def test_estimates_share_their_exact_maps_colour_scale(language, ioi):
    sample, corrupted = ioi
    found = patching_sections(language, sample.prompt, corrupted, answer=sample.answer, wrong=" " + sample.subject)
    exact, estimate = found[0].widgets, found[1].widgets
    for a, b in zip(exact, estimate):
        assert (a.data["zmin"], a.data["zmax"]) == (b.data["zmin"], b.data["zmax"])
        largest = max(abs(v) for row in a.data["values"] + b.data["values"] for v in row)
        assert b.data["zmax"] == pytest.approx(largest, rel=1e-3)
    assert any(fact.startswith("Largest gap between estimate and exact value") for fact in found[1].facts)


def test_runs_too_close_to_normalise_are_named():
    from mechscope.viz.sections import indistinct

    assert indistinct(0.15290, 0.15257)  # the reviewer's GPT-2-sized case: a 3e-4 gap
    assert indistinct(1000.0, 1000.5)
    assert not indistinct(0.857, -4.413)
    assert not indistinct(0.0, 0.01)


@pytest.mark.bad_input
def test_every_view_refuses_the_same_answer_twice(language):
    with pytest.raises(InputError, match="the answer and the wrong answer are the same token"):
        prompt_sections(language, "When Mary and John went to the store, John gave a drink to", answer=" Mary",
                        wrong=" Mary")  # fmt: skip


def test_labels_say_what_is_measured(language, sections):
    assert widgets(sections[3], "bars")[0].data["value_label"] == "logit difference"
    alone = prompt_sections(language, "When Mary and John went to the store")[3]
    assert widgets(alone, "bars")[0].data["value_label"] == "logit"
    norm = activation_section(language, "Mary went", "blocks.1.hook_resid_post")
    assert norm.widgets[0].data["label"] == "blocks.1.hook_resid_post norm"
