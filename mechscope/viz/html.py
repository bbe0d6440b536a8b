"""The Widget: a kind and JSON-ready data that ``mechscope.js`` turns into a picture.

A widget becomes a self-contained HTML fragment: a ``<div>`` holding a sentence for pages
that run no JavaScript, its data as JSON in the ``<script type="application/json">`` tag right
after it, and one call to ``mechscope.mount``. The JavaScript and CSS come from files inside the
package and are inlined, so nothing is ever fetched from a network. Token strings are untrusted:
the JSON is escaped so that no string can close the ``<script>`` tag, and the JavaScript builds
its DOM with ``textContent`` only. Byte-level tokenizers can hand us lone surrogates (half of a
character); they travel as ``\\udXXX`` escapes in JSON and as U+FFFD in HTML text.

    widget = colored_tokens(["The", " cat"], [0.5, -1.0])
    widget                      # renders in Jupyter and VS Code (``_repr_html_``)
    Path("out.html").write_text(page("Tokens", widget.to_html(bundle=False)))
"""

from __future__ import annotations

import html
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch
from torch import Tensor

KINDS = ("attention", "tokens", "heatmap", "bars", "table")
SIGNIFICANT_DIGITS = 5
# What JSON must not carry raw inside a <script> tag: "<" would let "</script>" or "<!--" through.
# (ensure_ascii already writes U+2028/U+2029, which end a line in older JavaScript, as escapes.)
SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}
# The JavaScript, one concern per file, concatenated in this order inside one function (bundle_js).
JS_FILES = ("core.js", "attention.js", "heatmap.js", "others.js", "mount.js")
FALLBACK = "mechscope widget: this view needs JavaScript; run the cell in a trusted notebook"


class VizError(ValueError):
    """A widget was asked to show data it cannot; the message names the argument and the limit."""


@dataclass(frozen=True)
class Widget:
    """One picture: ``kind`` picks the renderer in ``mechscope.js``, ``data`` is what it draws."""

    kind: str
    data: dict[str, Any]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VizError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "data": self.data}

    def to_html(self, *, bundle: bool = True) -> str:
        """A fragment that draws itself; ``bundle=False`` when the page already has :func:`bundle_html`.

        ``mount`` finds the ``<div>`` by its ``data-ms`` key and the data in the element right after
        it, not by id: JupyterLab may show one output twice, and then ids are no longer unique."""
        key = f"ms-{uuid.uuid4().hex}"
        fragment = (
            f'<div class="mechscope-widget" id="{key}" data-ms="{key}">{FALLBACK}</div>\n'
            f'<script type="application/json" id="{key}-data">{json_for_script(self.to_json())}</script>\n'
            f'<script>mechscope.mount("{key}")</script>\n'
        )
        return bundle_html() + fragment if bundle else fragment

    def _repr_html_(self) -> str:
        return self.to_html(bundle=True)


@cache
def static_file(name: str) -> str:
    """A file of ``mechscope/viz/static``; refused if it could end (or, with ``<!--``, confuse the
    parser about the end of) the tag it is inlined into."""
    text = resources.files("mechscope.viz").joinpath("static").joinpath(name).read_text(encoding="utf-8")
    if any(bad in text.lower() for bad in ("</script", "</style", "<!--")):
        raise VizError(f"static/{name} contains </script>, </style> or <!-- and cannot be inlined")
    return text


@cache
def bundle_js() -> str:
    """All of ``mechscope.js``: the static files in :data:`JS_FILES` inside one function, so that
    their names stay private and a second copy on the page (a second notebook cell) does nothing."""
    files = "\n".join(static_file(name) for name in JS_FILES)
    return (
        "/* mechscope.js: widgets drawn from JSON with createElement and textContent; no network. */\n"
        "(function () {\n'use strict';\n"
        "if (window.mechscope && typeof window.mechscope.render === 'function') {\n  return;\n}\n\n"
        f"{files}\n}}());\n"
    )


def bundle_css() -> str:
    """All of ``mechscope.css``."""
    return static_file("mechscope.css")


def bundle_html() -> str:
    """The CSS and JavaScript every widget needs; defining them twice on one page is harmless."""
    return f"<style>{bundle_css()}</style>\n<script>{bundle_js()}</script>\n"


def json_for_script(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` tag and in any encoding (ASCII only: a lone
    surrogate becomes ``\\udXXX``); NaN and infinities become ``null``."""
    text = json.dumps(finite(obj), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    for raw, escaped in SCRIPT_ESCAPES.items():
        text = text.replace(raw, escaped)
    return text


def displayable(text: str) -> str:
    """``text`` with every lone surrogate (half a character, as byte-level tokenizers decode
    with ``surrogateescape``) replaced by U+FFFD, so that it can be written as UTF-8."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def escape(text: str, *, quote: bool = True) -> str:
    """``html.escape`` for untrusted text that may hold lone surrogates."""
    return html.escape(displayable(text), quote=quote)


def page(title: str, body: str, *, head: str = "") -> str:
    """A whole HTML document with the widget bundle inlined once in its ``<head>``."""
    return (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n{bundle_html()}{head}</head>\n"
        f'<body class="ms-page">\n{body}\n</body>\n</html>\n'
    )


# ------------------------------------------------------------------ JSON-ready numbers
def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(value) for value in obj]
    return obj


def rounded(value: float) -> float | None:
    """``value`` to 5 significant digits (enough to read, short in JSON); NaN and inf to None.
    A value so near the largest float that rounding up would overflow is kept as it is."""
    if not math.isfinite(value):
        return None
    short = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    return short if math.isfinite(short) else float(value)


def as_tensor(values: Any, name: str) -> Tensor:
    """A float CPU copy of a tensor, array or nested list, detached from any graph."""
    if isinstance(values, Tensor):
        return values.detach().float().cpu()
    try:
        return torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise VizError(f"{name} must be a tensor or a (nested) list of numbers: {error}") from None


def numbers(values: Tensor) -> Any:
    """A tensor as nested lists of rounded floats (None where not finite), for JSON."""
    return rounded_all(values.double().tolist())


def rounded_all(nested: Any) -> Any:
    return [rounded_all(item) for item in nested] if isinstance(nested, list) else rounded(nested)


def check_shape(values: Tensor, name: str, expected: Sequence[int], axes: str) -> None:
    """Refuse a tensor whose shape is not ``expected`` (``axes`` names the dimensions)."""
    if tuple(values.shape) != tuple(expected):
        raise VizError(f"{name} must have shape [{axes}] = {list(expected)}, got {list(values.shape)}")


def strings(items: Sequence[Any], name: str) -> list[str]:
    """A list of display strings; refuses a bare string (a sequence of characters, not of tokens)."""
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise VizError(f"{name} must be a list of strings, got {type(items).__name__}")
    return [str(item) for item in items]


def string_rows(cells: Sequence[Sequence[str]], name: str) -> list[list[str]]:
    """Rows of display strings, such as a heatmap's cell text."""
    if isinstance(cells, str | bytes) or not isinstance(cells, Sequence):
        raise VizError(f"{name} must be a list of rows of strings, got {type(cells).__name__}")
    return [strings(row, f"{name}[{r}]") for r, row in enumerate(cells)]


def check_size(count: int, limit: int, name: str, hint: str) -> None:
    """Refuse more values than a page can draw quickly."""
    if count > limit:
        raise VizError(f"{name} has {count:,} values, more than the {limit:,} a widget draws; {hint}")
