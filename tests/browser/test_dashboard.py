"""The SAE feature dashboard in a real headless Chromium, opened from disk: the index loads clean
and offline, a click reaches a feature, and its examples draw with the focus token outlined."""

from __future__ import annotations

import pytest
import torch

from mechscope.sae import SAEConfig, build_sae
from mechscope.sae.features import feature_statistics
from mechscope.toys.zoo import load
from mechscope.viz.dashboard import write_dashboard
from mechscope.viz.prompts import decoder

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A hand-built SAE on the language organism: feature f reads the embedding of a common token."""
    model = load("language")
    tokens = model.to_tokens(
        ["Alice gave the book to Bob because Bob was tired.", "The cats near the door are hungry."]
    )
    common = tokens[0, 1:5].tolist()
    sae = build_sae(SAEConfig(128, len(common), "relu", HOOK, 0), seed=0)
    with torch.no_grad():
        directions = model.W_E[common]
        sae.W_enc.copy_((directions / directions.norm(dim=-1, keepdim=True)).T)
        sae.W_dec.copy_(directions / directions.norm(dim=-1, keepdim=True))
    stats = feature_statistics(model, sae, tokens, top=5, quantiles=2, per_quantile=2)
    return write_dashboard(tmp_path_factory.mktemp("dash"), stats, decoder(model), title="<b>dash</b>"), stats


def test_the_index_leads_to_a_feature_that_draws(watched, dashboard):
    index, stats = dashboard
    page = watched.page
    page.goto(index.as_uri())
    page.wait_for_load_state("load")
    assert page.locator(".ms-feature-link").count() == len(stats.features)
    assert page.title() == "<b>dash</b>"
    feature = next(f for f in stats.features if f.top)
    page.locator(f'.ms-feature-link[href="feature-{feature.index}.html"]').click()
    page.wait_for_load_state("load")
    assert page.url.endswith(f"feature-{feature.index}.html")
    examples = page.locator('.ms-widget[data-kind="tokens"]')
    assert examples.count() == len(feature.top) + sum(len(i.examples) for i in feature.intervals)
    assert page.locator('.ms-widget[data-kind="bars"] .ms-bar').count() > 0
    first = feature.top[0]
    token = examples.first.locator(f'.ms-token[data-index="{first.focus}"]')
    assert token.evaluate("e => getComputedStyle(e).outlineStyle") == "solid"
    other = examples.first.locator(".ms-token").nth(0 if first.focus else 1)
    if examples.first.locator(".ms-token").count() > 1:
        assert other.evaluate("e => getComputedStyle(e).outlineStyle") == "none"
    page.locator('a[href="index.html"]').click()
    page.wait_for_load_state("load")
    assert page.locator(".ms-feature-link").count() == len(stats.features)
    watched.assert_clean()


def test_every_feature_page_loads_clean(watched, dashboard):
    index, stats = dashboard
    for feature in stats.features:
        watched.page.goto(index.with_name(f"feature-{feature.index}.html").as_uri())
        assert watched.page.locator(".ms-widget").count() == watched.page.locator(".mechscope-widget").count()
    watched.assert_clean()
