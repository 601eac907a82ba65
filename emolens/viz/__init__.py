"""Figures for emolens results: plotly plots and offline circuitsvis attention widgets.

Every plot takes a :class:`~emolens.results.Result` (or a dict of them for :func:`curves`) and
returns a ``plotly.graph_objects.Figure``; :func:`plot` picks the plot for a result's kind::

    from emolens.viz import plot, heads_heatmap
    fig = plot(result)          # kind "heads" -> layer x head heatmap
    fig.show()

Figures display inline in Jupyter; :func:`to_html` gives an offline-safe HTML snippet.
"""

from __future__ import annotations

from .attention import AttentionView, attention_heads_html, bundle_script, head_patterns, standalone_html
from .circuit_attention import circuit_attention_section, reply_head_patterns, top_circuit_heads
from .plots import (DIVERGING, SEQUENTIAL, circuit_allocation, cosine_heatmap, curves, display_token,
                    heads_heatmap, layer_lines, matrix_heatmap, neurons_heatmap, pca_scatter, plot, resid_heatmap,
                    sublayer_influence)

__all__ = ["plot", "heads_heatmap", "neurons_heatmap", "resid_heatmap", "curves", "sublayer_influence",
           "cosine_heatmap", "matrix_heatmap", "pca_scatter", "circuit_allocation", "layer_lines", "display_token",
           "DIVERGING", "SEQUENTIAL", "AttentionView", "head_patterns", "attention_heads_html", "bundle_script",
           "standalone_html", "to_html", "circuit_attention_section", "reply_head_patterns",
           "top_circuit_heads", "notebook_html", "NOTEBOOK_PLOTLYJS"]

#: How notebook HTML (``Result._repr_html_``, :func:`notebook_html`) gets plotly.js:
#: ``"once"`` embeds it in the first figure of the session and reuses it (offline-safe, one 4.7 MB
#: copy per notebook), ``"always"`` embeds it every time, ``"cdn"`` loads it from the CDN (needs network).
NOTEBOOK_PLOTLYJS = "once"
_plotlyjs_sent = False


def to_html(fig, *, include_plotlyjs: "bool | str" = True, full_html: bool = False) -> str:
    """HTML for a figure. ``include_plotlyjs=True`` embeds plotly.js (offline-safe, ~4.7 MB);
    ``"cdn"`` loads it from a CDN (small, needs network); ``False`` assumes the page has it."""
    if hasattr(fig, "to_html"):
        return fig.to_html(include_plotlyjs=include_plotlyjs, full_html=full_html)
    if isinstance(fig, AttentionView):
        return fig.html(include_bundle=True)
    return str(fig)


def notebook_html(fig) -> str:
    """HTML for showing a figure in a notebook output, following :data:`NOTEBOOK_PLOTLYJS`."""
    global _plotlyjs_sent
    if isinstance(fig, AttentionView):
        return fig._repr_html_()
    mode = NOTEBOOK_PLOTLYJS
    if mode == "cdn":
        inc: "bool | str" = "cdn"
    elif mode == "always" or not _plotlyjs_sent:
        inc = True
    else:
        inc = False
    out = to_html(fig, include_plotlyjs=inc)
    if inc is True:
        _plotlyjs_sent = True
    return out
