"""The report: one self-contained page, every widget's data embedded as inert JSON, written
atomically."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mechscope.viz import report as report_module
from mechscope.viz.report import Chapter, report, write_report
from mechscope.viz.sections import Section

XSS = "<img src=x onerror=alert(1)>"


def embedded(html: str) -> list[dict]:
    """Every widget's JSON, read back the way the page's script reads it."""
    blobs = re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', html, flags=re.S)
    return [json.loads(blob) for blob in blobs]


def test_a_report_holds_every_view_of_the_prompt(model, tmp_path):
    path = report(model, "the cat sat on the mat", tmp_path / "out", title="tiny")
    html = path.read_text(encoding="utf-8")
    assert path == tmp_path / "out" / "index.html"
    for section in ["tokens", "attention", "logit-lens", "attribution", "heads"]:
        assert f'data-id="{section}"' in html
    kinds = {widget["kind"] for widget in embedded(html)}
    assert kinds == {"tokens", "table", "attention", "heatmap", "bars"}
    assert "patching" not in html


def test_a_corrupted_prompt_adds_patching(model, tmp_path):
    clean = torch.tensor([5, 17, 42, 99, 7, 250])
    corrupted = clean.clone()
    corrupted[2] = 43
    html = report(model, clean, tmp_path, answer=11, wrong=12, corrupted=corrupted).read_text(encoding="utf-8")
    assert 'data-id="patching"' in html and 'data-id="attribution-patching"' in html


@pytest.mark.bad_input
def test_patching_needs_an_answer_and_a_wrong_one(model, tmp_path):
    with pytest.raises(ValueError, match="give both answer and wrong"):
        report(model, "the cat", tmp_path, corrupted="the dog")


def test_nothing_in_the_page_leaves_the_machine_or_runs_as_markup(model, tmp_path):
    ids = model.to_tokens("a b c d")[0]
    labels = ["BOS", XSS, "</script><script>alert(2)</script>", "&amp;"] + ["x"] * (len(ids) - 4)
    html = report(model, ids, tmp_path, labels=labels, title=f"title {XSS}").read_text(encoding="utf-8")
    assert "<img" not in html and "alert(2)</script>" not in html
    assert "title &lt;img src=x onerror=alert(1)&gt;" in html
    shown = next(w["data"]["tokens"] for w in embedded(html) if w["kind"] == "attention")
    assert shown[:4] == labels[:4]  # the JSON round-trips the strings exactly
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)


def test_figures_bring_a_local_copy_of_plotly(tmp_path):
    import plotly.graph_objects as go

    figure = go.Figure(go.Bar(x=[1, 2], y=[3, 4]))
    chapter = Chapter("one", "", [Section("fig", "A figure", "bars", figures=[figure])])
    html = write_report(tmp_path, [chapter], title="figures").read_text(encoding="utf-8")
    assert '<script src="assets/plotly.min.js"></script>' in html
    assert (tmp_path / "assets" / "plotly.min.js").stat().st_size > 100_000


def test_a_failed_write_leaves_the_old_report(model, tmp_path, monkeypatch):
    path = report(model, "the cat", tmp_path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module.os, "fsync", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report(model, "the dog ran", tmp_path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_model_without_a_tokenizer_reports_on_ids(tmp_path):
    from tests.conftest import random_model

    model = random_model()
    ids = torch.tensor([1, 2, 3, 1, 2, 3])
    html = report(model, ids, tmp_path).read_text(encoding="utf-8")
    tokens = next(w["data"]["tokens"] for w in embedded(html) if w["kind"] == "attention")
    assert tokens == ["#1", "#2", "#3", "#1", "#2", "#3"]


def test_a_report_says_how_far_its_patching_has_got(model, tmp_path):
    clean = torch.tensor([5, 17, 42, 99, 7, 250])
    corrupted = clean.clone()
    corrupted[2] = 43
    fractions = []
    report(model, clean, tmp_path, answer=11, wrong=12, corrupted=corrupted, progress=fractions.append)
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
