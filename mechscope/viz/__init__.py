"""Pictures of what a model does, offline: HTML widgets for notebooks and pages, plotly figures.

Every widget is a pure function of results that returns a :class:`Widget`; it renders by itself
in Jupyter and VS Code, and :func:`page` puts several into one standalone HTML file. The
JavaScript and CSS ship inside the package: nothing is fetched from any network.
"""

from mechscope.viz.attention import attention_heatmap, attention_patterns, attention_token_budget
from mechscope.viz.figures import figure_html, imshow, line, plotly_script, scatter, write_plotly_js
from mechscope.viz.heatmaps import heatmap, logit_lens_heatmap, patching_heatmap
from mechscope.viz.html import VizError, Widget, bundle_html, json_for_script, page
from mechscope.viz.tables import attribution_bars, top_k_table
from mechscope.viz.tokens import colored_tokens

__all__ = [
    "VizError",
    "Widget",
    "attention_heatmap",
    "attention_patterns",
    "attention_token_budget",
    "attribution_bars",
    "bundle_html",
    "colored_tokens",
    "figure_html",
    "heatmap",
    "imshow",
    "json_for_script",
    "line",
    "logit_lens_heatmap",
    "page",
    "patching_heatmap",
    "plotly_script",
    "scatter",
    "top_k_table",
    "write_plotly_js",
]
