"""The demo report in a real headless Chromium, opened from disk as a user would open it."""

from __future__ import annotations

import pytest

from mechscope.viz.demo import demo_report
from mechscope.viz.report import report

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    return demo_report(tmp_path_factory.mktemp("demo")).as_uri()


def test_the_report_loads_offline_with_no_errors(watched, demo_page):
    page = watched.page
    page.goto(demo_page)
    page.wait_for_load_state("load")
    n_widgets = page.locator(".ms-widget").count()
    assert n_widgets == page.locator(".mechscope-widget").count() > 10  # every mounted widget drew itself
    assert page.locator(".plotly-graph-div .main-svg").count() >= 2  # the plotly figures drew from the local copy
    watched.assert_clean()


def styles(tokens) -> list[tuple[str, str]]:
    return tokens.evaluate_all("els => els.map(e => [e.className, e.style.backgroundColor])")


def test_hovering_a_token_shows_where_it_attends(watched, demo_page):
    page = watched.page
    page.goto(demo_page)
    view = page.locator('.ms-widget[data-kind="attention"]').first
    tokens = view.locator(".ms-token")
    before = styles(tokens)
    tokens.nth(8).hover()
    during = styles(tokens)
    assert during != before
    assert "ms-focus" in during[8][0]
    assert any("ms-attends-to" in cls for cls, _ in during[:8])
    assert any("ms-attended-by" in cls for cls, _ in during[9:])
    page.mouse.move(0, 0)
    assert styles(tokens) == before
    watched.assert_clean()


def test_token_strings_are_text_never_markup(watched, model, tmp_path):
    ids = model.to_tokens("a b c d")[0]
    labels = ["BOS", XSS, "</script><script>alert(2)</script>", *["x"] * (len(ids) - 3)]
    uri = report(model, ids, tmp_path, labels=labels).as_uri()
    page = watched.page
    page.goto(uri)
    shown = page.locator('.ms-widget[data-kind="attention"] .ms-token').all_inner_texts()
    assert shown[1] == XSS and shown[2] == labels[2]
    assert page.locator("img").count() == 0
    watched.assert_clean()  # no alert() dialog opened


def test_a_cut_attention_view_numbers_tokens_from_where_it_starts(watched, tmp_path):
    import torch

    from mechscope.viz import attention_patterns, page

    pattern = torch.tril(torch.ones(1, 1, 3, 3)) / torch.arange(1, 4)[:, None]
    widget = attention_patterns(["a", "b", "c"], pattern, first_position=60)
    path = tmp_path / "cut.html"
    path.write_text(page("cut", widget.to_html(bundle=False)), encoding="utf-8")
    watched.page.goto(path.as_uri())
    watched.page.locator(".ms-token").nth(2).hover()
    assert "#62" in watched.page.locator(".ms-tooltip").inner_text()
    watched.assert_clean()
