"""The widgets in a real Chromium: every kind draws with no console error, no request off the
machine and no dialog; hovering and clicking change what is highlighted as the contract says;
token strings that look like markup (in widgets and in plotly figures) stay text, and ones with
lone surrogates are written and drawn; a notebook fragment works alone, twice, inserted the way
JupyterLab inserts it, and says what it needs where no script runs."""

from __future__ import annotations

import math

import torch

from mechscope.analysis.lens import logit_lens
from mechscope.viz import (
    attention_heatmap,
    attention_patterns,
    attribution_bars,
    colored_tokens,
    figure_html,
    heatmap,
    imshow,
    line,
    logit_lens_heatmap,
    page,
    patching_heatmap,
    plotly_script,
    top_k_table,
    write_plotly_js,
)
from mechscope.viz.figures import PLOTLY_FILE
from mechscope.viz.html import FALLBACK
from tests.conftest import random_model

IMG = "<img src=x onerror=alert(1)>"
SCRIPT = "</script><script>alert(1)</script>"
TOKENS = ["<bos>", " The", " cat", IMG, " sat", "\n", SCRIPT, " mat"]
N = len(TOKENS)
LINK = '<a href="https://example.com/x">l</a>'
# JupyterLab's renderHTML: the output's HTML set as innerHTML (where scripts do not run), then
# every <script> re-created with its text and type only (evalInnerHTMLScriptTags), so that it runs.
JUPYTERLAB = """html => {
  const container = document.createElement('div');
  container.innerHTML = html;
  document.body.appendChild(container);
  for (const old of Array.from(container.querySelectorAll('script'))) {
    const script = document.createElement('script');
    script.textContent = old.textContent;
    if (old.type) { script.type = old.type; }
    old.replaceWith(script);
  }
}"""
INNER_HTML = (
    """html => { const d = document.createElement('div'); d.innerHTML = html; document.body.appendChild(d); }"""
)


def patterns() -> torch.Tensor:
    """[layer=2, head=2, query, key]: head 0 attends to itself, head 1 evenly to every earlier token."""
    itself = torch.eye(N)
    even = torch.tril(torch.ones(N, N))
    even = even / even.sum(-1, keepdim=True)
    return torch.stack([torch.stack([itself, even]), torch.stack([even, itself])])


def show(watched, tmp_path, *widgets, name: str = "page.html"):
    """Write the widgets into one page, open it from disk and return the Playwright page."""
    path = tmp_path / name
    path.write_text(page("widgets", "\n".join(w.to_html(bundle=False) for w in widgets)), encoding="utf-8")
    watched.page.goto(path.as_uri())
    return watched.page


def widget(browser_page, kind: str, index: int = 0):
    return browser_page.locator(f".ms-widget[data-kind={kind}]").nth(index)


def backgrounds(tokens) -> list[str]:
    return tokens.evaluate_all("spans => spans.map(s => getComputedStyle(s).backgroundColor)")


def away(browser_page) -> None:
    """Move the mouse off every widget (the page's top-left margin)."""
    browser_page.mouse.move(1, 1)


def test_every_kind_of_widget_renders(watched, tmp_path):
    values = torch.tensor([[0.5, -1.25, 0.75], [2.5, 0.125, -0.375]])
    widgets = [
        attention_patterns(TOKENS, patterns(), layers=[3, 4], title="Attention patterns"),
        attention_heatmap(TOKENS, patterns()[0, 1], title="One head"),
        colored_tokens(TOKENS, torch.linspace(-1, 1, N), label="neuron 7", title="Coloured"),
        heatmap(
            values,
            rows=["r0", "r1"],
            cols=["a", "b", "c"],
            title="Grid",
            x_label="col",
            y_label="row",
            value_label="effect",
        ),
        attribution_bars((["embed", "L0", "L1"], [0.5, -1.0, 2.0]), title="Bars"),
        top_k_table(TOKENS[:3], [[" a", " b"]] * 3, torch.tensor([[0.5, 0.25]] * 3), title="Table"),
    ]
    browser_page = show(watched, tmp_path, *widgets)
    attention = widget(browser_page, "attention")
    assert attention.locator(".ms-title").inner_text() == "Attention patterns"
    assert attention.locator(".ms-token").count() == N
    assert attention.locator(".ms-head").count() == 4
    assert attention.locator(".ms-head[data-layer='4'][data-head='1'] canvas").count() == 1
    assert attention.locator(".ms-head[data-layer='4'][data-head='1']").inner_text() == "L4H1"
    assert attention.locator(".ms-selected").get_attribute("data-layer") == "3"  # the first layer, head 0
    one_head = widget(browser_page, "heatmap", 0)
    assert one_head.locator(".ms-cell").count() == N * N
    assert one_head.locator(".ms-row-label").count() == one_head.locator(".ms-col-label").count() == N
    grid = widget(browser_page, "heatmap", 1)
    assert grid.locator(".ms-cell[data-row='1'][data-col='2']").get_attribute("data-value") == "-0.375"
    legend = grid.locator(".ms-legend").inner_text()
    assert "effect" in legend and "-2.5" in legend and "2.5" in legend
    coloured = widget(browser_page, "tokens")
    assert coloured.locator(".ms-token[data-index='0']").get_attribute("data-value") == "-1"
    assert "neuron 7" in coloured.locator(".ms-legend").inner_text()
    bars = widget(browser_page, "bars")
    assert bars.locator(".ms-bar.ms-positive").count() == 2 and bars.locator(".ms-bar.ms-negative").count() == 1
    assert bars.locator(".ms-bar[data-label='L0']").get_attribute("data-value") == "-1"
    assert "embed" in bars.inner_text()
    table = widget(browser_page, "table").locator("table.ms-table")
    assert table.locator("th").all_inner_texts() == ["#", "token", "1st", "2nd"]
    assert table.locator("tbody tr").count() == 3
    watched.assert_clean()


def test_hovering_a_token_shows_what_it_attends_to_and_what_attends_to_it(watched, tmp_path):
    browser_page = show(watched, tmp_path, attention_patterns(TOKENS, patterns()))
    attention = widget(browser_page, "attention")
    tokens = attention.locator(".ms-token")
    thumbnail = attention.locator(".ms-head[data-layer='0'][data-head='1'] canvas")
    before = backgrounds(tokens)
    picture = thumbnail.evaluate("canvas => canvas.toDataURL()")
    attention.locator(".ms-head[data-layer='0'][data-head='1']").click()
    focus = 4
    tokens.nth(focus).hover()
    assert "ms-focus" in tokens.nth(focus).get_attribute("class")
    even = patterns()[0, 1]
    for j in range(N):
        if j == focus:
            continue
        span = tokens.nth(j)
        expected_class, weight = ("ms-attends-to", even[focus, j]) if j < focus else ("ms-attended-by", even[j, focus])
        assert expected_class in span.get_attribute("class")
        assert float(span.get_attribute("data-weight")) == round(weight.item(), 4)
    after = backgrounds(tokens)
    assert after[0] != before[0] and after[focus + 1] != before[focus + 1]
    assert after[0] != after[focus + 1]  # attends-to and attended-by in different colours
    assert thumbnail.evaluate("canvas => canvas.toDataURL()") != picture  # row and column outlined
    away(browser_page)
    assert attention.locator(".ms-focus, .ms-attends-to, .ms-attended-by, [data-weight]").count() == 0
    assert backgrounds(tokens) == before
    assert thumbnail.evaluate("canvas => canvas.toDataURL()") == picture
    watched.assert_clean()


def test_clicking_a_head_selects_it_and_changes_the_hover_colours(watched, tmp_path):
    browser_page = show(watched, tmp_path, attention_patterns(TOKENS, patterns()))
    attention = widget(browser_page, "attention")
    tokens = attention.locator(".ms-token")
    tokens.nth(5).hover()
    itself = backgrounds(tokens)
    weights = [tokens.nth(j).get_attribute("data-weight") for j in range(N)]
    away(browser_page)
    attention.locator(".ms-head[data-layer='0'][data-head='1']").click()
    selected = attention.locator(".ms-head.ms-selected")
    assert selected.count() == 1
    assert (selected.get_attribute("data-layer"), selected.get_attribute("data-head")) == ("0", "1")
    tokens.nth(5).hover()
    assert backgrounds(tokens) != itself
    assert [tokens.nth(j).get_attribute("data-weight") for j in range(N)] != weights
    assert float(tokens.nth(0).get_attribute("data-weight")) == round(1 / 6, 4)  # evenly over 6 tokens
    watched.assert_clean()


def test_hovering_a_heatmap_cell_shows_its_value_and_the_tooltip_follows_the_mouse(watched, tmp_path):
    values = torch.tensor([[0.5, -1.25, 0.75], [2.5, 0.125, -0.375]])
    grid = heatmap(values, rows=["L0", "L1"], cols=[" a", IMG, "c"], value_label="effect")
    browser_page = show(watched, tmp_path, grid)
    cell = browser_page.locator(".ms-cell[data-row='1'][data-col='1']")
    tooltip = browser_page.locator(".ms-tooltip")
    assert not tooltip.is_visible()
    box = cell.bounding_box()
    browser_page.mouse.move(box["x"] + 2, box["y"] + 2)
    assert tooltip.is_visible()
    assert tooltip.text_content() == f"L1 · {IMG}: 0.125"
    first = tooltip.bounding_box()
    browser_page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] - 2)
    moved = tooltip.bounding_box()
    assert (moved["x"], moved["y"]) != (first["x"], first["y"])
    assert "ms-active" in browser_page.locator(".ms-row-label").nth(1).get_attribute("class")
    away(browser_page)
    assert not tooltip.is_visible()
    watched.assert_clean()


def test_the_logit_lens_cells_show_the_top_token_and_the_top_k_on_hover(watched, tmp_path):
    model = random_model()
    result = logit_lens(model, torch.randint(0, model.cfg.d_vocab, (1, 5)), top_k=3)
    lens = logit_lens_heatmap(result, [f"t{i}" for i in range(5)], lambda t: f" id{t}")
    browser_page = show(watched, tmp_path, lens)
    cell = browser_page.locator(".ms-cell[data-row='0'][data-col='2']")
    assert cell.inner_text() == lens.data["text"][0][2]
    cell.hover()
    lines = browser_page.locator(".ms-tooltip").text_content().split("\n")
    assert lines[0] == f"{result.labels[0]} · t2: {cell.get_attribute('data-value')}"
    assert lines[2:] == lens.data["hover"][0][2].split("\n")
    watched.assert_clean()


def test_hovering_a_coloured_token_shows_its_value(watched, tmp_path):
    browser_page = show(watched, tmp_path, colored_tokens(TOKENS, torch.arange(N) - 2.5, label="loss"))
    token = browser_page.locator(".ms-token[data-index='3']")
    token.hover()
    assert token.get_attribute("data-value") == "0.5"
    assert browser_page.locator(".ms-tooltip").text_content().endswith("loss: 0.5")
    watched.assert_clean()


def test_token_strings_that_look_like_markup_stay_text(watched, tmp_path):
    hostile = [IMG, SCRIPT, " <b>bold</b>", "\n"]
    widgets = [
        attention_patterns(hostile, patterns()[:, :, :4, :4], title=IMG),
        colored_tokens(hostile, torch.tensor([1.0, -1.0, 0.5, 0.0]), label=SCRIPT),
        attention_heatmap(hostile, torch.eye(4)),
        attribution_bars((hostile, [1.0, -1.0, 0.5, 0.0])),
        top_k_table(hostile, [[IMG]] * 4, torch.full((4, 1), 0.5)),
    ]
    browser_page = show(watched, tmp_path, *widgets)
    for kind in ("attention", "tokens"):
        spans = widget(browser_page, kind).locator(".ms-token")
        assert spans.nth(0).inner_text() == IMG
        assert spans.nth(1).inner_text() == SCRIPT
        assert spans.nth(2).inner_text() == " <b>bold</b>"  # the leading space kept
        assert spans.nth(3).inner_text() == "\u23ce"  # a newline shown as a visible mark
    assert widget(browser_page, "attention").locator(".ms-title").inner_text() == IMG
    assert widget(browser_page, "heatmap").locator(".ms-row-label").nth(0).inner_text() == IMG
    assert widget(browser_page, "bars").locator(".ms-bar").nth(1).get_attribute("data-label") == SCRIPT
    assert IMG in widget(browser_page, "table").inner_text()
    assert browser_page.locator("img, b").count() == 0
    assert browser_page.locator("script").count() == 1 + 2 * len(widgets)  # the bundle, then data + mount each
    browser_page.locator(".ms-token").nth(0).hover()
    watched.assert_clean()


def test_a_notebook_fragment_renders_alone_and_twice(watched):
    first = colored_tokens(TOKENS, torch.arange(N) * 1.0, title="first")
    second = attention_patterns(TOKENS, patterns(), title="second")
    browser_page = watched.page
    browser_page.set_content(first._repr_html_())
    assert widget(browser_page, "tokens").locator(".ms-token").count() == N
    marker = "<script>window.firstMechscope = window.mechscope</script>"
    browser_page.set_content(first._repr_html_() + marker + second._repr_html_())
    assert browser_page.locator(".ms-widget .ms-title").all_inner_texts() == ["first", "second"]
    assert browser_page.evaluate("window.firstMechscope === window.mechscope")  # the second bundle kept the first
    widget(browser_page, "attention").locator(".ms-token").nth(2).hover()
    assert widget(browser_page, "attention").locator(".ms-focus").count() == 1
    watched.assert_clean()


def test_a_wide_heatmap_shrinks_its_cells_and_scrolls(watched, tmp_path):
    wide = patching_heatmap(torch.randn(3, 300), cols=[f" token{i}" for i in range(300)], metric="m")
    narrow = patching_heatmap(torch.randn(3, 4), cols=["a", "b", "c", "d"], metric="m")
    browser_page = show(watched, tmp_path, wide, narrow)
    widths = [widget(browser_page, "heatmap", i).locator(".ms-cell").first.bounding_box()["width"] for i in (0, 1)]
    assert widths[0] >= 14 and widths[1] > widths[0]
    scroll = widget(browser_page, "heatmap", 0).locator(".ms-scroll")
    assert scroll.evaluate("box => box.scrollWidth > box.clientWidth")
    assert widget(browser_page, "heatmap", 0).bounding_box()["width"] <= 1200
    label = widget(browser_page, "heatmap", 0).locator(".ms-col-label").nth(7)
    assert label.get_attribute("title") == " token7"  # the full text, however it is cut on screen
    watched.assert_clean()


def test_plotly_figures_draw_offline_inline_and_from_a_local_file(watched, tmp_path):
    fig = line([0, 1, 2], {"train": [3.0, 2.0, 1.0]}, title="Loss", x_label="step", y_label="loss")
    write_plotly_js(tmp_path / "assets")
    linked = tmp_path / "linked.html"
    body = figure_html(fig, plotly_js=f"assets/{PLOTLY_FILE}")
    linked.write_text(page("linked", body, head=plotly_script(f"assets/{PLOTLY_FILE}")), encoding="utf-8")
    inline = tmp_path / "inline.html"
    inline.write_text(page("inline", figure_html(fig)), encoding="utf-8")
    for path in (linked, inline):
        watched.page.goto(path.as_uri())
        watched.page.wait_for_selector(".main-svg")
        assert watched.page.locator(".gtitle").text_content() == "Loss"  # an SVG text node
    watched.assert_clean()


def test_the_tooltip_names_the_strongest_earlier_keys_and_skips_missing_weights(watched, tmp_path):
    missing = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [math.nan, math.nan, math.nan]])
    later = torch.tensor([[0.1, 0.0, 0.9], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])  # query 0 attends to key 2
    browser_page = show(watched, tmp_path, attention_patterns(["a", "b", "c"], torch.stack([missing, later])))
    attention = widget(browser_page, "attention")
    tokens, tip = attention.locator(".ms-token"), attention.locator(".ms-tooltip")
    tokens.nth(1).hover()
    assert tip.text_content().split("\n")[1:] == ["  #1 \u201cb\u201d: 0.75", "  #0 \u201ca\u201d: 0.25"]
    tokens.nth(2).hover()
    assert tip.text_content() == "L0H0 \u00b7 #2 \u201cc\u201d attends most to\n  n/a"
    away(browser_page)
    attention.locator(".ms-head[data-layer='0'][data-head='1']").click()
    tokens.nth(0).hover()
    assert tip.text_content().split("\n")[1:] == ["  #0 \u201ca\u201d: 0.1"]  # not key 2, after the query
    watched.assert_clean()


def test_tokens_with_lone_surrogates_are_written_and_drawn(watched, tmp_path):
    tokens = ["a", "\udce2\udc80", " b\ud83d"]  # what byte-level tokenizers decode with surrogateescape
    widgets = [
        colored_tokens(tokens, [1.0, 2.0, 3.0], title="\udce2"),
        attention_patterns(tokens, patterns()[:, :, :3, :3]),
        heatmap(torch.rand(3, 3), rows=tokens, cols=tokens, text=[tokens] * 3),
        top_k_table(tokens, [[t] for t in tokens], torch.full((3, 1), 0.5)),
    ]
    browser_page = show(watched, tmp_path, *widgets)
    assert browser_page.locator(".ms-widget").count() == len(widgets)
    spans = widget(browser_page, "tokens").locator(".ms-token")
    assert spans.all_inner_texts() == tokens  # the JSON carried them exactly; the font shows U+FFFD
    widget(browser_page, "attention").locator(".ms-token").nth(1).hover()
    assert widget(browser_page, "attention").locator(".ms-focus").count() == 1
    watched.assert_clean()


def test_a_notebook_fragment_inserted_the_way_jupyterlab_does_renders(watched):
    fragment = attention_patterns(TOKENS, patterns(), title="lab")._repr_html_()
    browser_page = watched.page
    browser_page.set_content("<!doctype html><html><body></body></html>")
    browser_page.evaluate(JUPYTERLAB, fragment)
    attention = widget(browser_page, "attention")
    assert attention.locator(".ms-title").inner_text() == "lab"
    attention.locator(".ms-token").nth(3).hover()
    assert attention.locator(".ms-focus").count() == 1
    assert FALLBACK not in browser_page.inner_text("body")
    watched.assert_clean()


def test_the_same_fragment_shown_twice_renders_both_copies(watched):
    fragment = colored_tokens(TOKENS, torch.arange(N) * 1.0, title="twice")._repr_html_()
    browser_page = watched.page
    browser_page.set_content("<!doctype html><html><body></body></html>")
    browser_page.evaluate(JUPYTERLAB, fragment)
    browser_page.evaluate(JUPYTERLAB, fragment)  # JupyterLab showing one output in two places: same ids
    assert browser_page.locator(".mechscope-widget").count() == 2
    assert browser_page.locator(".mechscope-widget[data-mounted] .ms-widget").count() == 2
    for copy in range(2):
        assert widget(browser_page, "tokens", copy).locator(".ms-token").count() == N
    browser_page.set_content(fragment + fragment)  # and in a plain page, where both scripts run
    assert browser_page.locator(".ms-widget[data-kind=tokens]").count() == 2
    watched.assert_clean()


def test_a_fragment_whose_scripts_never_run_says_what_it_needs(watched):
    fragment = colored_tokens(TOKENS, torch.arange(N) * 1.0)._repr_html_()
    browser_page = watched.page
    browser_page.set_content("<!doctype html><html><body></body></html>")
    browser_page.evaluate(INNER_HTML, fragment)  # an untrusted notebook: HTML shown, scripts not run
    holder = browser_page.locator(".mechscope-widget")
    assert holder.is_visible() and holder.inner_text() == FALLBACK
    assert browser_page.inner_text("body").strip() == FALLBACK  # the JSON is not shown as text
    assert browser_page.locator(".ms-widget").count() == 0
    watched.assert_clean()


def test_plotly_strings_that_look_like_markup_stay_text(watched, tmp_path):
    x_ticks, y_ticks = ["<b>bold</b>", LINK], ["a&b", "<br>"]
    fig = imshow(torch.rand(2, 2), title="<i>T</i>", x_label="<b>k</b>", y_label="q", x_ticks=x_ticks, y_ticks=y_ticks)
    path = tmp_path / "plotly.html"
    path.write_text(page("plotly", figure_html(fig)), encoding="utf-8")
    browser_page = watched.page
    browser_page.goto(path.as_uri())
    browser_page.wait_for_selector(".main-svg")
    assert browser_page.locator(".xtick text").all_text_contents() == x_ticks
    assert sorted(browser_page.locator(".ytick text").all_text_contents()) == sorted(y_ticks)  # row 0 on top
    assert browser_page.locator(".gtitle").text_content() == "<i>T</i>"
    assert browser_page.locator(".xtitle").text_content() == "<b>k</b>"
    links = browser_page.evaluate(
        "() => Array.from(document.querySelectorAll('a'))"
        ".map(a => a.getAttribute('href') || a.getAttribute('xlink:href'))"
    )
    assert not any("example.com" in (href or "") for href in links)
    assert browser_page.locator("svg b, svg a, svg tspan[style*='bold'], svg tspan[style*='italic']").count() == 0
    watched.assert_clean()
