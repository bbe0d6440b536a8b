"""The main job: a report on the four shipped model organisms, whose mechanisms are known, so
every picture in it can be checked against what the model is known to do.

- induction: a repeated random sequence, where the induction heads of layer 1 look back to
  the token after the current token's earlier copy, helped by the previous-token head 0.1;
- language: an indirect-object prompt ("When Mary and John went to the store, John gave a
  drink to"), with the ABC corruption for patching;
- modular addition: the Fourier spectrum of the embedding and how the model grokked;
- superposition: how many features each sparsity packs into 5 dimensions.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from mechscope.toys.language import grammar
from mechscope.toys.language.evaluation import abc_prompts
from mechscope.toys.zoo import load_run
from mechscope.viz.report import Chapter, write_report
from mechscope.viz.sections import Section, patching_sections, prompt_sections

SEED = 0
RUN_LENGTH = 10  # random tokens before they repeat
CORRUPTED_AT = 7  # the first-half token the induction prediction copies


def demo_report(out: str | Path) -> Path:
    """Write the report on every shipped organism to ``out/index.html``; return its path."""
    chapters = [induction_chapter(), language_chapter(), modular_chapter(), superposition_chapter()]
    intro = (
        "Four small models that mechscope trained itself, each with a known mechanism. Hover the "
        "attention views and heatmaps for the numbers; every section says how to read it."
    )
    return write_report(out, chapters, title="mechscope: the model organisms", intro=intro)


def findings_section(organism, model, metrics, record) -> Section:
    findings = organism.explain(model, metrics)
    return Section(
        "findings",
        "What it learned",
        f"Recovered by the organism's own analysis; trained with: {record['command']}",
        facts=list(findings.lines),
        figures=list(organism.figures(model, metrics, findings).values()),
    )


def induction_chapter() -> Chapter:
    """[BOS, x1..x10, x1..x6]: at the last x6 an induction head predicts x7. The corrupted run
    changes the first x7, so only the induction mechanism can tell the two apart."""
    model, organism, record, metrics = load_run("induction")
    generator = torch.Generator().manual_seed(SEED)
    run = torch.randint(1, model.cfg.d_vocab, (RUN_LENGTH,), generator=generator)
    clean = torch.cat([torch.tensor([0]), run, run[:6]])
    replacement = int((run[CORRUPTED_AT - 1] % (model.cfg.d_vocab - 1)) + 1)
    corrupted = clean.clone()
    corrupted[CORRUPTED_AT] = replacement
    labels = ["BOS", *(f"#{t}" for t in clean[1:].tolist())]
    answer = int(run[6])
    sections = prompt_sections(model, clean, labels=labels)
    sections += patching_sections(model, clean, corrupted, answer=answer, wrong=replacement, labels=labels)
    findings = findings_section(organism, model, metrics, record)
    findings.figures = []  # its figure is the training curve; the sections above show the heads themselves
    return Chapter(
        "Induction (2 layers, attention only)",
        f"Ten random tokens, then the first six again: after #{int(run[5])} the model should predict "
        f"#{answer}. The corrupted run changes the first #{answer} to #{replacement}.",
        [findings, *sections],
    )


def language_chapter() -> Chapter:
    model, organism, record, metrics = load_run("language")
    sample = grammar.ioi(random.Random(SEED), "held_out", template=0)
    corrupted = abc_prompts([sample], SEED)[0]
    wrong = " " + sample.subject
    sections = prompt_sections(model, sample.prompt, answer=sample.answer, wrong=wrong)
    sections += patching_sections(model, sample.prompt, corrupted, answer=sample.answer, wrong=wrong)
    return Chapter(
        "Synthetic language (3 layers): an indirect object",
        f"Prompt: {sample.prompt!r}; the answer is {sample.answer!r}, not {wrong!r}. Corrupted (ABC): "
        f"{corrupted!r}, where nothing says which name comes next.",
        [findings_section(organism, model, metrics, record), *sections],
    )


def modular_chapter() -> Chapter:
    model, organism, record, metrics = load_run("modular_addition")
    return Chapter(
        "Modular addition (a + b mod 113)",
        "A one-layer transformer that grokked: it memorised the training pairs first, then found an "
        "algorithm built from a few Fourier frequencies.",
        [findings_section(organism, model, metrics, record)],
    )


def superposition_chapter() -> Chapter:
    model, organism, record, metrics = load_run("superposition")
    return Chapter(
        "Toy models of superposition (20 features, 5 dimensions)",
        "The sparser the features, the more of them the model packs into its 5 dimensions.",
        [findings_section(organism, model, metrics, record)],
    )
