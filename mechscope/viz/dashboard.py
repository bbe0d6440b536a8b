"""SAE feature dashboards: what makes each feature fire and what it writes, as browsable pages.

:func:`feature_dashboard` turns :func:`mechscope.sae.features.feature_statistics` into report
sections (for the workbench or a page); :func:`write_dashboard` writes them as a folder that opens
from disk, offline: ``index.html`` lists the features (firing frequency, largest activation, the
tokens they fire on and promote) and links to one page per feature, ``feature-<id>.html``.

    stats = feature_statistics(model, sae, tokens, features=[0, 5, 9])
    write_dashboard("dash", stats, decoder(model), title="blocks.1 SAE")
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

from mechscope.sae.features import Example, Feature, FeatureStats
from mechscope.viz.html import Widget, escape, page
from mechscope.viz.report import STYLE, section_html, write_atomically
from mechscope.viz.sections import Section
from mechscope.viz.tables import attribution_bars
from mechscope.viz.tokens import colored_tokens

Decode = Callable[[int], str]
# The token an example is about: outlined in its window (``data-focus`` on the wrapper, see example_html).
DASHBOARD_STYLE = """<style>
.ms-nav { display: flex; gap: 1.2rem; margin: 0 0 0.6rem; }
.ms-nav a, .ms-features a { color: #0969da; text-decoration: none; }
.ms-features { border-collapse: collapse; margin-top: 1rem; background: #fff; }
.ms-features th, .ms-features td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; white-space: pre; }
.ms-features td.ms-number { text-align: right; font-variant-numeric: tabular-nums; }
</style>"""
FOCUS_RULE = (
    '.ms-example[data-focus="{i}"] .ms-token[data-index="{i}"] {{ outline: 2px solid #cf222e; outline-offset: -2px; }}'
)


def feature_dashboard(stats: FeatureStats, decode: Decode, *, feature: int | None = None) -> list[Section]:
    """The sections of one feature's dashboard (``feature``), or of every feature in ``stats`` in turn."""
    chosen = stats.features if feature is None else [stats.feature(feature)]
    return [section for f in chosen for section in feature_sections(f, decode, stats.logit_note)]


def feature_sections(feature: Feature, decode: Decode, logit_note: str = "") -> list[Section]:
    """Summary and histogram, top examples, examples per activation interval, promoted logits."""
    return [
        summary_section(feature),
        top_section(feature, decode),
        intervals_section(feature, decode),
        logits_section(feature, decode, logit_note),
    ]


def summary_section(feature: Feature) -> Section:
    facts = [
        f"Fires on {feature.frequency:.3%} of tokens ({feature.firings:,}).",
        f"Largest activation {feature.max_activation:.4g}; mean when firing {feature.mean_activation:.4g}.",
    ]
    widgets = []
    if feature.histogram_counts:
        edges = feature.histogram_edges
        labels = [f"{low:.3g} – {high:.3g}" for low, high in itertools.pairwise(edges)]
        widgets.append(
            attribution_bars(
                (labels, [float(c) for c in feature.histogram_counts]),
                title="Histogram of non-zero activations",
                value_label="firings",
            )
        )
    else:
        facts.append("It never fired on these tokens.")
    return Section(
        f"feature-{feature.index}-summary",
        f"Feature {feature.index}",
        "How often the feature fires and how strongly: one bar per activation range, its length the number of "
        "tokens with an activation in that range.",
        widgets,
        facts=facts,
    )


def top_section(feature: Feature, decode: Decode) -> Section:
    widgets = [
        example_widget(example, decode, feature, f"#{rank} · {example.value:.4g}")
        for rank, example in enumerate(feature.top, 1)
    ]
    return Section(
        f"feature-{feature.index}-top",
        "Top activations",
        "The tokens it fires on most strongly, each with the text around it; every token is coloured by the "
        "feature's activation on it (one scale for the whole page) and the token the example is about is outlined.",
        widgets,
    )


def intervals_section(feature: Feature, decode: Decode) -> Section:
    widgets = [
        example_widget(
            example,
            decode,
            feature,
            f"{interval.low:.3g} – {interval.high:.3g} ({interval.count:,} firings) · {example.value:.4g}",
        )
        for interval in reversed(feature.intervals)
        for example in interval.examples
    ]
    return Section(
        f"feature-{feature.index}-intervals",
        "Examples across activation ranges",
        "Examples drawn at random from each range of activations, strongest range first: what the feature "
        "does when it fires weakly, not only at its peak.",
        widgets,
    )


def logits_section(feature: Feature, decode: Decode, note: str) -> Section:
    pairs = [*feature.top_logits, *reversed(feature.bottom_logits)]
    widgets = []
    if pairs:
        labels = [decode(token) for token, _ in pairs]
        widgets.append(
            attribution_bars(
                (labels, [value for _, value in pairs]),
                title="Promoted (top) and suppressed (bottom) tokens",
                value_label="logit effect",
            )
        )
    return Section(
        f"feature-{feature.index}-logits",
        "Logits",
        "The tokens whose logits the feature's decoder direction raises and lowers most, read straight "
        f"through the unembedding. {note}.",
        widgets,
    )


def example_widget(example: Example, decode: Decode, feature: Feature, title: str) -> Widget:
    """The example's tokens coloured by activation, from 0 to the feature's largest; ``focus`` marks its token."""
    widget = colored_tokens(
        [decode(token) for token in example.tokens],
        example.activations,
        label=f"feature {feature.index}",
        title=title,
        scale="sequential",
        zmin=0.0,
        zmax=feature.max_activation or 1.0,
    )
    return Widget("tokens", {**widget.data, "focus": example.focus})


# ------------------------------------------------------------------ the pages


def write_dashboard(out: str | Path, stats: FeatureStats, decode: Decode, title: str = "SAE features") -> Path:
    """Write ``out/index.html`` and ``out/feature-<id>.html`` for every feature; returns the index's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    indices = [f.index for f in stats.features]
    for number, feature in enumerate(stats.features):
        neighbours = (
            indices[number - 1] if number else None,
            indices[number + 1] if number + 1 < len(indices) else None,
        )
        html = feature_page(feature, decode, stats.logit_note, title, neighbours)
        write_atomically(out / page_name(feature.index), html)
    path = out / "index.html"
    write_atomically(path, index_page(stats, decode, title))
    return path


def page_name(index: int) -> str:
    return f"feature-{index}.html"


def feature_page(
    feature: Feature, decode: Decode, note: str, title: str, neighbours: tuple[int | None, int | None]
) -> str:
    links = ['<a href="index.html">← all features</a>']
    before, after = neighbours
    if before is not None:
        links.append(f'<a href="{page_name(before)}" rel="prev">← feature {before}</a>')
    if after is not None:
        links.append(f'<a href="{page_name(after)}" rel="next">feature {after} →</a>')
    sections = "".join(sections_html(feature_sections(feature, decode, note)))
    body = (
        f'<main class="ms-report"><nav class="ms-nav">{"".join(links)}</nav>'
        f"<header><h1>{escape(title)}: feature {feature.index}</h1></header>"
        f'<section class="ms-chapter">{sections}</section></main>'
    )
    focus = sorted({e.focus for e in feature.top} | {e.focus for i in feature.intervals for e in i.examples})
    rules = "".join(FOCUS_RULE.format(i=i) for i in focus)
    return page(f"{title}: feature {feature.index}", body, head=STYLE + DASHBOARD_STYLE + f"<style>{rules}</style>")


def sections_html(sections: Sequence[Section]) -> list[str]:
    """The report's sections, each example wrapped so the page can outline its focus token."""
    out = []
    for section in sections:
        plain = Section(section.id, section.title, section.description, facts=section.facts)
        opened = section_html(plain, section.id).removesuffix("</section>")
        out.append(opened + "".join(map(example_html, section.widgets)) + "</section>")
    return out


def example_html(widget: Widget) -> str:
    focus = widget.data.get("focus")
    inner = widget.to_html(bundle=False)
    return inner if focus is None else f'<div class="ms-example" data-focus="{int(focus)}">{inner}</div>'


def index_page(stats: FeatureStats, decode: Decode, title: str) -> str:
    rows = "".join(index_row(feature, decode) for feature in stats.features)
    header = "".join(f"<th>{name}</th>" for name in ("feature", "frequency", "max activation", "fires on", "promotes"))
    intro = (
        f"{len(stats.features)} features of an SAE on {stats.hook_name} (d_sae {stats.d_sae:,}), "
        f"measured on {stats.n_tokens:,} tokens. Click a feature for its examples, histogram and logits."
    )
    body = (
        f'<main class="ms-report"><header><h1>{escape(title)}</h1><p>{escape(intro)}</p></header>'
        f'<table class="ms-features"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table></main>'
    )
    return page(title, body, head=STYLE + DASHBOARD_STYLE)


def index_row(feature: Feature, decode: Decode) -> str:
    fires_on = unique(decode(e.tokens[e.focus]) for e in feature.top)[:4]
    promotes = [decode(token) for token, _ in feature.top_logits[:4]]
    cells = [
        f'<a href="{page_name(feature.index)}" class="ms-feature-link">{feature.index}</a>',
        f"{feature.frequency:.3%}",
        f"{feature.max_activation:.4g}",
        escape(" ".join(repr(t) for t in fires_on)),
        escape(" ".join(repr(t) for t in promotes)),
    ]
    classes = ["", "ms-number", "ms-number", "", ""]
    tds = "".join(
        f'<td class="{c}">{cell}</td>' if c else f"<td>{cell}</td>" for c, cell in zip(classes, cells, strict=True)
    )
    return f'<tr data-feature="{feature.index}">{tds}</tr>'


def unique(items) -> list[str]:
    return list(dict.fromkeys(items))
