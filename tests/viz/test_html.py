"""The Widget and its HTML: fragments that draw themselves (found by a data-ms key, with a
sentence for pages without JavaScript), JSON that no token string can break out of and that
carries lone surrogates as escapes, numbers rounded for the page, and a bundle of the static
files that makes no network request."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.viz.html import (
    FALLBACK,
    JS_FILES,
    KINDS,
    VizError,
    Widget,
    as_tensor,
    bundle_css,
    bundle_html,
    bundle_js,
    displayable,
    escape,
    json_for_script,
    numbers,
    page,
    rounded,
    static_file,
)

FRAGMENT = re.compile(
    r'<div class="mechscope-widget" id="(ms-[0-9a-f]+)" data-ms="(ms-[0-9a-f]+)">([^<]*)</div>\n'
    r'<script type="application/json" id="(ms-[0-9a-f]+)-data">(.*)</script>\n'
    r'<script>mechscope.mount\("(ms-[0-9a-f]+)"\)</script>\n$',
    re.DOTALL,
)
HOSTILE = ["<img src=x onerror=alert(1)>", "</script><script>alert(1)</script>", "<!--", "a\u2028b\u2029c", "&amp;"]
LONE = "\ud83d"  # half of an emoji: what a byte-level tokenizer's surrogateescape decoding leaves
# Any text, with lone surrogates (category Cs) and the characters a <script> tag fears made common: joined
# from pieces, as one text() pools its alphabets and would then almost never draw a surrogate.
TEXT = st.lists(
    st.one_of(
        st.characters(categories=["Cs"]), st.sampled_from(["<", ">", "&", "/", "\n", "\u2028"]), st.text(max_size=3)
    ),
    max_size=4,
).map("".join)


def a_widget(tokens=("a", " b")) -> Widget:
    return Widget("tokens", {"title": "t", "tokens": list(tokens), "values": [0.5, None]})


def test_a_fragment_holds_its_data_and_mounts_itself():
    widget = a_widget()
    match = FRAGMENT.search(widget.to_html(bundle=False))
    assert match is not None
    element, key, fallback, data_id, payload, mounted = match.groups()
    assert element == key == data_id == mounted
    assert fallback == FALLBACK and "JavaScript" in fallback  # what a page that runs no script shows
    assert json.loads(payload) == {"kind": "tokens", "data": widget.data} == widget.to_json()


def test_every_fragment_has_its_own_id():
    widget = a_widget()
    ids = {FRAGMENT.search(widget.to_html(bundle=False)).group(1) for _ in range(5)}
    assert len(ids) == 5


def test_the_bundle_comes_first_unless_the_page_has_it():
    widget = a_widget()
    alone, bare = widget.to_html(bundle=True), widget.to_html(bundle=False)
    assert alone.startswith(bundle_html())
    assert bundle_html() not in bare
    assert widget._repr_html_().startswith(bundle_html())
    assert FRAGMENT.search(alone[len(bundle_html()) :]) is not None


def test_the_bundle_inlines_the_package_files_in_order():
    bundle, js = bundle_html(), bundle_js()
    assert f"<script>{js}</script>" in bundle and f"<style>{bundle_css()}</style>" in bundle
    assert bundle.count("<script>") == 1 and bundle.count("<style>") == 1
    assert bundle_css() == static_file("mechscope.css")
    starts = [js.index(static_file(name)) for name in JS_FILES]
    assert starts == sorted(starts)
    assert js.index("'use strict'") < starts[0]  # strict mode for every file, in one function
    assert "window.mechscope = " in static_file(JS_FILES[-1])  # exported once everything is defined


def test_the_bundle_names_no_host_and_builds_no_markup_from_strings():
    js, css = bundle_js(), bundle_css()
    for text in (js, css):
        assert "http:" not in text and "https:" not in text and "//cdn" not in text
        assert "@import" not in text and "url(" not in text
    for dangerous in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert dangerous not in js
    assert "getElementById" not in js  # ids repeat when a notebook shows one output twice
    assert "<script" not in js.lower() and "<!--" not in js  # nothing an HTML parser could read as a tag
    assert "window.mechscope && typeof window.mechscope.render === 'function'" in js  # defined once per page


@pytest.mark.parametrize("text", HOSTILE)
def test_json_for_script_cannot_close_the_tag(text):
    encoded = json_for_script({"tokens": [text]})
    for raw in ("<", ">", "&", "\u2028", "\u2029"):
        assert raw not in encoded
    assert json.loads(encoded) == {"tokens": [text]}


@settings(max_examples=20, deadline=None)
@given(st.lists(TEXT, max_size=5))
def test_json_for_script_round_trips_any_text(tokens):
    encoded = json_for_script(tokens)
    assert encoded.isascii()  # writable in any encoding, lone surrogates included
    assert "<" not in encoded and ">" not in encoded and "&" not in encoded
    assert [utf16(token) for token in json.loads(encoded)] == [utf16(token) for token in tokens]


def utf16(text: str) -> bytes:
    """Text as a JavaScript string holds it: two surrogates that form a pair are one character there
    (and JSON's escapes read back into Python join them too)."""
    return text.encode("utf-16-le", "surrogatepass")


def test_a_fragment_with_lone_surrogates_can_be_written_as_utf8(tmp_path):
    widget = a_widget(tokens=("a", LONE))
    path = tmp_path / "page.html"
    path.write_text(page(f"title {LONE}", widget.to_html(bundle=True)), encoding="utf-8")
    written = path.read_text(encoding="utf-8")
    assert "<title>title \ufffd</title>" in written
    payload = FRAGMENT.search(widget.to_html(bundle=False)).group(5)
    assert json.loads(payload)["data"]["tokens"] == ["a", LONE]  # the data keeps what it was given


@settings(max_examples=20, deadline=None)
@given(TEXT)
def test_escape_makes_any_text_writable_and_inert(text):
    escaped = escape(text)
    escaped.encode("utf-8")
    assert "<" not in escaped and ">" not in escaped and '"' not in escaped
    shown = displayable(text)
    assert not any(surrogate(c) for c in shown) and len(shown) <= len(text)
    if not any(surrogate(c) for c in text):
        assert shown == text


def surrogate(character: str) -> bool:
    return 0xD800 <= ord(character) <= 0xDFFF


def test_displayable_replaces_lone_surrogates_and_joins_pairs():
    assert displayable("a\udce2\udc80b") == "a\ufffd\ufffdb"  # surrogateescape's bytes 0xE2 0x80
    assert displayable(LONE + "x") == "\ufffdx"
    assert displayable("\ud83d\ude00") == "\U0001f600"  # a pair is one character
    assert escape(f"<{LONE}>", quote=False) == "&lt;\ufffd&gt;"


def test_json_for_script_writes_null_for_nan_and_infinities():
    encoded = json_for_script({"values": [1.5, math.nan, [math.inf, -math.inf]], "total": math.nan})
    assert json.loads(encoded) == {"values": [1.5, None, [None, None]], "total": None}


def test_a_page_inlines_the_bundle_once_and_escapes_its_title():
    body = a_widget().to_html(bundle=False) + a_widget().to_html(bundle=False)
    document = page("<b>Report</b> & co", body, head='<meta name="x" content="y">')
    assert document.lower().startswith("<!doctype html>")
    assert document.count(bundle_html()) == 1
    assert "<title>&lt;b&gt;Report&lt;/b&gt; &amp; co</title>" in document
    assert document.index(bundle_html()) < document.index("</head>") < document.index(body)
    assert '<meta name="x" content="y">' in document.split("</head>")[0]


@settings(max_examples=20, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, width=64))
def test_rounded_keeps_five_significant_digits(value):
    result = rounded(value)
    if not math.isfinite(value):
        assert result is None
        return
    short = float(f"{value:.5g}")
    assert result == (short if math.isfinite(short) else value)  # 1.79765e308 would round up to inf
    assert math.isclose(result, value, rel_tol=5e-5, abs_tol=0)


def test_rounded_never_turns_a_finite_number_into_infinity():
    largest = 1.7976931348623157e308
    assert rounded(largest) == largest and rounded(-largest) == -largest


def test_numbers_keep_the_shape_and_replace_nan():
    values = torch.tensor([[1.234567, math.nan, -0.000123456789], [math.inf, 2.0, 1e-9]])
    out = numbers(values)
    assert [len(row) for row in out] == [3, 3]
    assert out[0][1] is None and out[1][0] is None
    assert out[0][0] == rounded(values[0, 0].item())
    assert out[1][2] == rounded(values[1, 2].item())
    assert numbers(torch.tensor(0.5)) == 0.5
    assert numbers(torch.zeros(2, 0)) == [[], []]


def test_as_tensor_detaches_and_converts_to_float():
    with_grad = torch.randn(3, requires_grad=True) * 2
    half = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert not as_tensor(with_grad, "x").requires_grad
    assert as_tensor(half, "x").dtype == torch.float32
    assert as_tensor([[1, 2], [3, 4]], "x").tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.bad_input
def test_unknown_kinds_and_values_are_refused_by_name():
    with pytest.raises(VizError, match="kind must be one of"):
        Widget("pie", {})
    with pytest.raises(VizError, match="values must be a tensor"):
        as_tensor(["a", "b"], "values")
    assert all(Widget(kind, {}).kind == kind for kind in KINDS)
