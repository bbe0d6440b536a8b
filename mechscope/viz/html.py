"""The Widget: a kind and JSON-ready data that ``mechscope.js`` turns into a picture.

A widget becomes a self-contained HTML fragment: an empty ``<div>``, its data as JSON in a
``<script type="application/json">`` tag, and one call to ``mechscope.mount``. The JavaScript
and CSS come from files inside the package and are inlined, so nothing is ever fetched from a
network. Token strings are untrusted: the JSON is escaped so that no string can close the
``<script>`` tag, and the JavaScript builds its DOM with ``textContent`` only.

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
# What JSON must not carry raw inside a <script> tag: "<" would let "</script>" or "<!--" through,
# and U+2028/U+2029 end a line in older JavaScript parsers.
SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


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
        """A fragment that draws itself; ``bundle=False`` when the page already has :func:`bundle_html`."""
        element = f"ms-{uuid.uuid4().hex}"
        fragment = (
            f'<div class="mechscope-widget" id="{element}"></div>\n'
            f'<script type="application/json" id="{element}-data">{json_for_script(self.to_json())}</script>\n'
            f'<script>mechscope.mount("{element}")</script>\n'
        )
        return bundle_html() + fragment if bundle else fragment

    def _repr_html_(self) -> str:
        return self.to_html(bundle=True)


@cache
def static_file(name: str) -> str:
    """A file of ``mechscope/viz/static``; refused if it could end the tag it is inlined into."""
    text = resources.files("mechscope.viz").joinpath("static").joinpath(name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():
        raise VizError(f"static/{name} contains a closing </script> or </style> and cannot be inlined")
    return text


def bundle_html() -> str:
    """The CSS and JavaScript every widget needs; defining them twice on one page is harmless."""
    return f"<style>{static_file('mechscope.css')}</style>\n<script>{static_file('mechscope.js')}</script>\n"


def json_for_script(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` tag; NaN and infinities become ``null``."""
    text = json.dumps(finite(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for raw, escaped in SCRIPT_ESCAPES.items():
        text = text.replace(raw, escaped)
    return text


def page(title: str, body: str, *, head: str = "") -> str:
    """A whole HTML document with the widget bundle inlined once in its ``<head>``."""
    return (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n{bundle_html()}{head}</head>\n"
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
    """``value`` to 5 significant digits (enough to read, short in JSON); NaN and inf to None."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else None


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
