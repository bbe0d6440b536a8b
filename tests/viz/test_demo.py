"""The main job's report, checked against what each shipped organism is known to do."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mechscope.viz.demo import demo_report


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = demo_report(tmp_path_factory.mktemp("demo"))
    return path, path.read_text(encoding="utf-8")


def chapters(html: str) -> list[str]:
    return re.split(r'<section class="ms-chapter"', html)[1:]


def widgets(chapter: str) -> list[dict]:
    blobs = re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', chapter, flags=re.S)
    return [json.loads(blob) for blob in blobs]


def titled(chapter: str, title: str) -> torch.Tensor:
    found = [w["data"]["values"] for w in widgets(chapter) if w["data"].get("title") == title]
    assert found, f"no widget titled {title!r}"
    return torch.tensor(found[0], dtype=torch.float)


def best(values: torch.Tensor) -> tuple[int, int]:
    return divmod(int(values.argmax()), values.shape[1])


def test_every_organism_has_a_chapter(page):
    path, html = page
    parts = chapters(html)
    assert len(parts) == 4
    for part, name in zip(parts, ["Induction", "Synthetic language", "Modular addition", "superposition"]):
        assert name in part
    assert (path.parent / "assets" / "plotly.min.js").exists()


def test_the_induction_chapter_shows_its_heads(page):
    induction = chapters(page[1])[0]
    assert best(titled(induction, "previous-token score")) == (0, 1)
    assert best(titled(induction, "induction score"))[0] == 1
    # the corrupted token is the one the induction heads copy: each of them restores part of it
    # (21-25% each in docs/techniques.md), more than any layer-0 head
    heads = titled(induction, "Head outputs (z), all positions")
    assert bool((heads[1] > 0.1).all()) and heads[1].min() > heads[0].max()


def test_the_language_chapter_patches_the_subject_mover(page):
    language = chapters(page[1])[1]
    assert best(titled(language, "Head outputs (z), all positions")) == (0, 1)


def test_the_toy_chapters_carry_their_figures(page):
    for part in chapters(page[1])[2:]:
        assert part.count('class="plotly-graph-div"') >= 1
        assert "What it learned" in part
