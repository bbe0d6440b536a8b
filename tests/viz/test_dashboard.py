"""Feature dashboards: every example, interval, histogram bin and logit of the statistics reaches
the page as widget data, token text stays inert, and the pages link to each other; the CLI
command writes them for a saved SAE."""

from __future__ import annotations

import json
import re

import pytest
import torch
import typer
from typer.testing import CliRunner

from mechscope.cli.sae_dashboard import dashboard
from mechscope.sae import SAE, SAEConfig, SAEError, build_sae
from mechscope.sae.features import feature_statistics
from mechscope.viz.dashboard import feature_dashboard, write_dashboard
from tests.conftest import random_model

XSS = "<img src=x onerror=alert(1)>"
FEATURES = [0, 3, 5]


def decode(token: int) -> str:
    return XSS if token == 7 else f"t{token}"


@pytest.fixture(scope="module")
def stats():
    model = random_model(d_vocab=40)
    cfg = SAEConfig(d_in=32, d_sae=8, architecture="topk", hook_name="blocks.1.hook_resid_post", hook_layer=1, k=3)
    sae = build_sae(cfg, seed=0)
    with torch.no_grad():
        sae.W_enc[:, 5] = -1e3  # feature 5 never fires
    tokens = torch.randint(0, 40, (12, 16), generator=torch.Generator().manual_seed(0))
    tokens[0, 4] = 7
    return feature_statistics(model, sae, tokens, features=FEATURES, top=6, quantiles=3, per_quantile=2, logits=4)


def embedded(html: str) -> list[dict]:
    blobs = re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', html, flags=re.S)
    return [json.loads(blob) for blob in blobs]


def test_each_feature_gets_its_sections(stats):
    sections = feature_dashboard(stats, decode)
    assert [s.id for s in sections] == [
        f"feature-{f}-{part}" for f in FEATURES for part in ("summary", "top", "intervals", "logits")
    ]
    assert [s.id for s in feature_dashboard(stats, decode, feature=3)] == [
        f"feature-3-{part}" for part in ("summary", "top", "intervals", "logits")
    ]
    with pytest.raises(SAEError, match="feature 4"):
        feature_dashboard(stats, decode, feature=4)


def test_examples_histogram_and_logits_reach_the_widgets(stats):
    for feature in stats.features:
        summary, top, intervals, logits = feature_dashboard(stats, decode, feature=feature.index)
        assert len(top.widgets) == len(feature.top)
        for widget, example in zip(top.widgets, feature.top, strict=True):
            assert widget.kind == "tokens"
            assert widget.data["tokens"] == [decode(t) for t in example.tokens]
            assert widget.data["focus"] == example.focus
            assert widget.data["values"][example.focus] == pytest.approx(example.value, rel=1e-4)
            assert widget.data["zmax"] == pytest.approx(feature.max_activation, rel=1e-4)
        assert len(intervals.widgets) == sum(len(i.examples) for i in feature.intervals)
        if feature.firings:
            (bars,) = summary.widgets
            assert bars.data["values"] == feature.histogram_counts and sum(bars.data["values"]) == feature.firings
        else:
            assert summary.widgets == [] and any("never fired" in fact for fact in summary.facts)
        (effect,) = logits.widgets
        expected = [*feature.top_logits, *reversed(feature.bottom_logits)]
        assert effect.data["labels"] == [decode(t) for t, _ in expected]
        assert effect.data["values"] == pytest.approx([v for _, v in expected], rel=1e-4)


def test_the_pages_link_and_keep_token_text_inert(stats, tmp_path):
    index = write_dashboard(tmp_path / "dash", stats, decode, title=f"SAE {XSS}")
    html = index.read_text(encoding="utf-8")
    for feature in FEATURES:
        assert f'href="feature-{feature}.html"' in html
        page = (tmp_path / "dash" / f"feature-{feature}.html").read_text(encoding="utf-8")
        assert 'href="index.html"' in page and XSS not in page.split("<body", 1)[1].replace("\\u003c", "")
        widgets = embedded(page)
        assert len(widgets) == sum(len(s.widgets) for s in feature_dashboard(stats, decode, feature=feature))
    assert XSS not in html and "&lt;img src=x" in html
    assert 'rel="next"' in (tmp_path / "dash" / "feature-0.html").read_text()
    assert 'rel="prev"' in (tmp_path / "dash" / "feature-5.html").read_text()
    assert "http://" not in html and "https://" not in html


def test_the_focus_token_is_outlined(stats, tmp_path):
    write_dashboard(tmp_path, stats, decode)
    page = (tmp_path / "feature-0.html").read_text(encoding="utf-8")
    for focus in {e.focus for e in stats.feature(0).top}:
        assert f'.ms-example[data-focus="{focus}"] .ms-token[data-index="{focus}"]' in page
        assert f'<div class="ms-example" data-focus="{focus}">' in page


# ------------------------------------------------------------------ the CLI command

runner = CliRunner()


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.command()(dashboard)
    return app


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    cfg = SAEConfig(d_in=128, d_sae=16, architecture="topk", hook_name="blocks.0.hook_resid_post", hook_layer=0, k=4)
    return build_sae(cfg, seed=0).save(tmp_path_factory.mktemp("sae") / "sae")


def test_the_command_writes_the_most_frequent_features(cli, sae_dir, tmp_path):
    args = [str(sae_dir), "--model", "language", "--out", str(tmp_path), "--sequences", "4", "--context", "24"]
    result = runner.invoke(cli, [*args, "--top-features", "3"])
    assert result.exit_code == 0, result.output
    pages = sorted(tmp_path.glob("feature-*.html"))
    assert len(pages) == 3 and (tmp_path / "index.html").exists()
    result = runner.invoke(cli, [*args, "--features", "2,9"])
    assert result.exit_code == 0, result.output
    assert 'href="feature-9.html"' in (tmp_path / "index.html").read_text()
    assert SAE.load(sae_dir).cfg.d_sae == 16


@pytest.mark.bad_input
@pytest.mark.parametrize(("features", "message"), [("2,x", "comma-separated integers"), ("16", "d_sae=16")])
def test_the_command_refuses_bad_feature_ids(cli, sae_dir, tmp_path, features, message):
    args = [str(sae_dir), "--model", "language", "--out", str(tmp_path), "--sequences", "2", "--context", "16"]
    result = runner.invoke(cli, [*args, "--features", features])
    assert result.exit_code == 1 and message in result.output
