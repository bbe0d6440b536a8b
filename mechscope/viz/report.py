"""The report: one self-contained ``index.html`` (plus ``assets/plotly.min.js`` when it has
plotly figures) that opens from disk, offline, in any browser.

A report is a list of chapters, each a list of :class:`~mechscope.viz.sections.Section`.
:func:`report` builds the standard one for a model and a prompt; :func:`write_report` writes
any chapters you assemble yourself.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechscope.viz.figures import figure_html, plotly_script, write_plotly_js
from mechscope.viz.html import escape, page
from mechscope.viz.sections import Section, patching_sections, prompt_sections

ASSETS = "assets"
# The page around the widgets (the widgets bring their own styles): system fonts, nothing fetched.
STYLE = """<style>
body.ms-page { margin: 0; background: #f6f8fa; color: #1f2328;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; line-height: 1.45; }
.ms-report { max-width: 1240px; margin: 0 auto; padding: 24px 32px 64px; }
.ms-report > header h1 { font-size: 1.8rem; margin: 0 0 0.3rem; }
.ms-report > header p { color: #57606a; margin: 0; }
.ms-contents ol { display: flex; flex-wrap: wrap; gap: 0.4rem 1.4rem; padding: 0; margin: 0.8rem 0 0;
  list-style: none; counter-reset: part; }
.ms-contents a { color: #0969da; text-decoration: none; }
.ms-chapter { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; padding: 4px 24px 24px;
  margin: 24px 0; }
.ms-chapter > h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.3rem; }
.ms-section > h3 { margin: 1.6rem 0 0.3rem; }
.ms-description { color: #57606a; margin: 0 0 0.5rem; max-width: 72em; }
.ms-facts { margin: 0.3rem 0 0.8rem; padding-left: 1.3rem; }
</style>"""
PLOTLY_JS = f"{ASSETS}/plotly.min.js"


@dataclass
class Chapter:
    """A part of the report with its own heading: one model, one prompt."""

    title: str
    intro: str = ""
    sections: list[Section] = field(default_factory=list)


def report(
    model: Any,
    prompt: str | Any,
    out: str | Path,
    *,
    answer: str | int | None = None,
    wrong: str | int | None = None,
    corrupted: str | Any | None = None,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    max_tokens: int | None = None,
    progress: Callable[[float], None] | None = None,
) -> Path:
    """Write the standard report on ``prompt`` to ``out/index.html`` and return its path.

    With ``corrupted`` (and ``answer`` and ``wrong``, which the patching metric compares), it
    adds activation- and attribution-patching heatmaps of clean into corrupted; ``progress`` is
    then called with the fraction of the patching done.
    """
    chapter = Chapter(title or "Report", f"Prompt: {prompt!r}" if isinstance(prompt, str) else "")
    chapter.sections = prompt_sections(model, prompt, answer=answer, wrong=wrong, labels=labels, max_tokens=max_tokens)
    if corrupted is not None:
        if answer is None or wrong is None:
            raise ValueError("patching compares logit(answer) − logit(wrong): give both answer and wrong")
        chapter.intro += f" Corrupted: {corrupted!r}." if isinstance(corrupted, str) else ""
        chapter.sections += patching_sections(
            model,
            prompt,
            corrupted,
            answer=answer,
            wrong=wrong,
            labels=labels,
            max_tokens=max_tokens,
            progress=progress,
        )
    return write_report(out, [chapter], title=title or "mechscope report", intro=describe(model))


def describe(model: Any) -> str:
    cfg = model.cfg
    return (
        f"{cfg.original_architecture or 'mechscope'} model: {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"d_model {cfg.d_model}, vocabulary {cfg.d_vocab:,}."
    )


def write_report(out: str | Path, chapters: Sequence[Chapter], *, title: str, intro: str = "") -> Path:
    """Write ``chapters`` to ``out/index.html`` atomically (a half-written page never replaces
    a whole one) and return the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    has_figures = any(section.figures for chapter in chapters for section in chapter.sections)
    if has_figures:
        write_plotly_js(out / ASSETS)
    head = STYLE + (plotly_script(PLOTLY_JS) if has_figures else "")
    body = header(title, intro, chapters) + "".join(chapter_html(c, i) for i, c in enumerate(chapters))
    path = out / "index.html"
    write_atomically(path, page(title, f'<main class="ms-report">{body}</main>', head=head))
    return path


def header(title: str, intro: str, chapters: Sequence[Chapter]) -> str:
    contents = "".join(
        f'<li><a href="#{anchor(i)}">{escape(chapter.title)}</a></li>' for i, chapter in enumerate(chapters)
    )
    nav = f'<nav class="ms-contents"><ol>{contents}</ol></nav>' if len(chapters) > 1 else ""
    return f"<header><h1>{escape(title)}</h1><p>{escape(intro)}</p>{nav}</header>"


def chapter_html(chapter: Chapter, number: int) -> str:
    sections = "".join(section_html(section, anchor(number, section.id)) for section in chapter.sections)
    intro = f"<p>{escape(chapter.intro)}</p>" if chapter.intro else ""
    return (
        f'<section class="ms-chapter" id="{anchor(number)}"><h2>{escape(chapter.title)}</h2>{intro}{sections}</section>'
    )


def section_html(section: Section, anchor_id: str) -> str:
    facts = "".join(f"<li>{escape(fact)}</li>" for fact in section.facts)
    parts = [
        f'<section class="ms-section" id="{anchor_id}" data-id="{escape(section.id)}">',
        f"<h3>{escape(section.title)}</h3>",
        f'<p class="ms-description">{escape(section.description)}</p>',
        f'<ul class="ms-facts">{facts}</ul>' if facts else "",
        *(widget.to_html(bundle=False) for widget in section.widgets),
        *(figure_html(figure, plotly_js=PLOTLY_JS) for figure in section.figures),
        "</section>",
    ]
    return "".join(parts)


def anchor(chapter: int, section: str | None = None) -> str:
    """An id safe in HTML and URLs, unique per chapter and section."""
    name = f"part-{chapter}" if section is None else f"part-{chapter}-{section}"
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a report is for reading
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
