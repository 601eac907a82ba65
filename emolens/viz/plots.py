"""Plotly figures for :class:`~emolens.results.Result` objects.

One function per plot; each takes a result (or a dict of results for :func:`curves`) and returns
a ``plotly.graph_objects.Figure``. Signed scores (attribution, patching effects, cosines) use a
diverging colour scale centred at zero (``RdBu`` reversed: red positive, blue negative); scores
that are all non-negative use a sequential scale. Hovering a cell shows the component, its value
and, for position axes, the token.

Every function raises :class:`~emolens.errors.ResultError` when given a result of the wrong kind
or an empty one, with a message naming the function that fits.

Token strings are shown HTML-escaped (``<`` -> ``&lt;``) and with newlines as ``\\n``, because
plotly interprets tags in tick and hover text; :func:`display_token` is the exact mapping.
"""

from __future__ import annotations

import html
import math
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots

from ..errors import ResultError
from ..results import Result

#: Diverging scale for signed scores (zero = white; positive = red; negative = blue).
DIVERGING = "RdBu_r"
#: Sequential scale for non-negative scores.
SEQUENTIAL = "Viridis"
#: Colours for line/bar series (plotly's default qualitative palette).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
TEMPLATE = "plotly_white"

__all__ = ["DIVERGING", "SEQUENTIAL", "display_token", "heads_heatmap", "neurons_heatmap", "resid_heatmap",
           "curves", "sublayer_influence", "cosine_heatmap", "pca_scatter", "circuit_allocation",
           "layer_lines", "matrix_heatmap", "plot"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def display_token(tok: Any) -> str:
    """How a token (or any label) is shown in tick and hover text: HTML-escaped, ``\\n`` visible."""
    s = str(tok).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return html.escape(s, quote=False)


def _check(result: Any, fn: str, *, kinds: Sequence[str] | None = None, ndims: Sequence[int] | None = None,
           last_axes: Sequence[str] | None = None) -> Result:
    """Validate a result for plot ``fn``; raise ResultError naming the fix."""
    if not isinstance(result, Result):
        raise ResultError(f"{fn}() takes an emolens Result, got {type(result).__name__}. "
                          "Wrap raw tensors with emolens.results.Result(kind, scores, axes).")
    if kinds is not None and result.kind not in kinds:
        raise ResultError(f"{fn}() plots results of kind {' / '.join(map(repr, kinds))}, got kind "
                          f"{result.kind!r} (axes {result.axes}); use emolens.viz.plot(result) to pick the "
                          "matching plot.")
    if ndims is not None and result.scores.ndim not in ndims:
        raise ResultError(f"{fn}() needs a result with {' or '.join(map(str, ndims))} axes, got axes "
                          f"{result.axes}.")
    if last_axes is not None:
        tail = tuple(result.axes[-len(last_axes):])
        if tail != tuple(last_axes):
            raise ResultError(f"{fn}() needs the last axes to be {tuple(last_axes)}, got axes {result.axes}.")
    if result.scores.numel() == 0:
        raise ResultError(f"{fn}(): the result (kind {result.kind!r}, shape {result.shape}) is empty; "
                          "nothing to plot. Check the step that produced it.")
    return result


def _np(t: torch.Tensor):
    """Float numpy array with NaN kept (plotly draws NaN as a gap)."""
    return t.detach().float().cpu().numpy()


def _labels(result: Result, axis: str, n: int | None = None) -> list:
    if n is None:
        n = result.scores.shape[result.axes.index(axis)]
    lab = result.labels.get(axis)
    return list(lab) if lab is not None else list(range(n))


def _signed(z: torch.Tensor) -> bool:
    finite = z[torch.isfinite(z)]
    return bool(finite.numel()) and bool((finite < 0).any())


def _color_kwargs(z: torch.Tensor, signed: bool | None = None) -> dict:
    """Diverging scale centred at zero for signed scores; sequential otherwise."""
    if signed is None:
        signed = _signed(z)
    if signed:
        return dict(colorscale=DIVERGING, zmid=0.0)
    return dict(colorscale=SEQUENTIAL)


def _score_name(result: Result) -> str:
    m = result.meta.get("metric")
    return str(m) if m else "score"


class _Markup(str):
    """Title text that is already escaped plotly markup (default titles)."""


def _default_title(result: Result, what: str) -> str:
    bits = [f"{key}: {result.meta[key]}" for key in ("method", "metric", "model") if result.meta.get(key)]
    sub = " · ".join(html.escape(str(b), quote=False) for b in bits)
    return _Markup(html.escape(what, quote=False) + (f"<br><sup>{sub}</sup>" if sub else ""))


def _layout(fig: go.Figure, title: str | None, *, height: int | None = None, **kw) -> go.Figure:
    text = None if not title else (title if isinstance(title, _Markup) else html.escape(title, quote=False))
    fig.update_layout(title=dict(text=text), template=TEMPLATE,
                      margin=dict(l=60, r=30, t=80 if title else 30, b=50), **({"height": height} if height else {}),
                      **kw)
    return fig


def _hex_rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _facet_grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def _heatmap_trace(z: torch.Tensor, *, x_name: str, y_name: str, x_ticks: list | None, y_ticks: list | None,
                   value_name: str, color: dict, coloraxis: str | None = None, showscale: bool = True,
                   x_vals: list | None = None, text_fmt: str | None = None) -> go.Heatmap:
    """A heatmap with numeric x/y (0..n-1; ticks relabelled later) and hover naming the cell."""
    ny, nx = z.shape
    xs = x_vals if x_vals is not None else list(range(nx))
    ys = list(range(ny))
    # customdata[i][j] = [x label, y label] so hover shows labels (tokens) while axes stay numeric:
    # numeric axes keep duplicate tokens as separate columns.
    xl = [display_token(t) for t in (x_ticks if x_ticks is not None else xs)]
    yl = [display_token(t) for t in (y_ticks if y_ticks is not None else ys)]
    custom = [[[xl[j], yl[i]] for j in range(nx)] for i in range(ny)]
    kw: dict[str, Any] = dict(z=_np(z), x=xs, y=ys, customdata=custom,
                              hovertemplate=(f"{y_name} %{{customdata[1]}}<br>{x_name} %{{customdata[0]}}<br>"
                                             f"{html.escape(value_name)} %{{z:.4g}}<extra></extra>"))
    if coloraxis:
        kw["coloraxis"] = coloraxis
    else:
        kw.update(color)
        kw["colorbar"] = dict(title=dict(text=html.escape(value_name)))
        kw["showscale"] = showscale
    if text_fmt:
        kw["texttemplate"] = text_fmt
    return go.Heatmap(**kw)


def _ticks(labels: list | None, n: int, max_ticks: int = 60) -> dict:
    """Axis tick settings: label every cell when there are few, else let plotly choose numbers."""
    if labels is None:
        return dict(tickmode="auto")
    step = max(1, math.ceil(n / max_ticks))
    vals = list(range(0, n, step))
    return dict(tickmode="array", tickvals=vals, ticktext=[display_token(labels[i]) for i in vals])


def _lead_facets(result: Result, n_inner: int) -> tuple[list[str], list[torch.Tensor]]:
    """Split leading axes (e.g. ``emotion``) of a stacked result into facets."""
    if result.scores.ndim == n_inner:
        return [""], [result.scores]
    if result.scores.ndim != n_inner + 1:
        raise ResultError(f"Cannot plot a result with axes {result.axes}: expected {n_inner} axes or one extra "
                          "leading axis (e.g. 'emotion' from stack_results).")
    ax = result.axes[0]
    names = [f"{ax} {display_token(lab)}" for lab in _labels(result, ax)]
    return names, list(result.scores)


def _layer_grid(result: Result, fn: str, x_axis: str, x_name: str, title: str | None, what: str,
                x_ticks_from_labels: bool = True) -> go.Figure:
    """Heatmap(s) of a (…, layer, X) result; one facet per leading-axis value."""
    names, mats = _lead_facets(result, 2)
    ny, nx = mats[0].shape
    x_labels = result.labels.get(x_axis) if x_ticks_from_labels else None
    y_labels = result.labels.get("layer")
    color = _color_kwargs(result.scores)
    value = _score_name(result)
    if len(mats) == 1:
        fig = go.Figure(_heatmap_trace(mats[0], x_name=x_name, y_name="layer", x_ticks=x_labels, y_ticks=y_labels,
                                       value_name=value, color=color))
    else:
        rows, cols = _facet_grid(len(mats))
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, shared_yaxes=True,
                            horizontal_spacing=0.06, vertical_spacing=0.12)
        for i, m in enumerate(mats):
            fig.add_trace(_heatmap_trace(m, x_name=x_name, y_name="layer", x_ticks=x_labels, y_ticks=y_labels,
                                         value_name=value, color=color, coloraxis="coloraxis"),
                          row=i // cols + 1, col=i % cols + 1)
        axis = dict(colorscale=color["colorscale"], colorbar=dict(title=dict(text=html.escape(value))))
        if "zmid" in color:
            axis["cmid"] = color["zmid"]
        fig.update_layout(coloraxis=axis)
    fig.update_xaxes(title_text=x_name.capitalize(), **_ticks(x_labels, nx))
    fig.update_yaxes(title_text="Layer", **_ticks(y_labels, ny))
    height = max(320, min(900, 80 + 18 * ny)) * (_facet_grid(len(mats))[0] if len(mats) > 1 else 1)
    return _layout(fig, title if title is not None else _default_title(result, what), height=height)


# --------------------------------------------------------------------------------------------
# heatmaps
# --------------------------------------------------------------------------------------------
def heads_heatmap(result: Result, title: str | None = None) -> go.Figure:
    """Attention-head scores as a layer × head heatmap.

    Args:
        result: kind ``"heads"`` with axes ``(layer, head)`` (or a leading stacked axis such as
            ``(emotion, layer, head)``, drawn as one panel per value); kind ``"heads_pos"``
            (``(layer, head, position)``) is summed over positions.
        title: figure title (default: method · metric · model from ``result.meta``).

    Returns:
        Figure with x = head index, y = layer, colour = score (diverging at 0 when signed).
    """
    _check(result, "heads_heatmap", kinds=("heads", "heads_pos"))
    if result.kind == "heads_pos":
        if result.axes[-1] != "position":
            raise ResultError(f"heads_heatmap(): a heads_pos result needs 'position' last, got {result.axes}.")
        result = Result("heads", result.scores.sum(-1), result.axes[:-1],
                        {k: v for k, v in result.labels.items() if k != "position"}, {}, dict(result.meta))
        what = "Attention heads (summed over positions)"
    else:
        what = "Attention heads"
    _check(result, "heads_heatmap", ndims=(2, 3), last_axes=("layer", "head"))
    return _layer_grid(result, "heads_heatmap", "head", "head", title, what)


def neurons_heatmap(result: Result, top_k: int | None = None, title: str | None = None) -> go.Figure:
    """MLP-neuron scores as a layer × neuron heatmap, or a per-layer top-k view for wide MLPs.

    Args:
        result: kind ``"neurons"`` with axes ``(layer, neuron)``.
        top_k: if given (or when the MLP has more than 2048 neurons, default 32), show for each layer
            only its ``top_k`` neurons by ``|score|``: x = rank within the layer, hover = neuron index.
        title: figure title.

    Returns:
        Figure: full heatmap (x = neuron index) or top-k heatmap (x = rank 1..k).
    """
    _check(result, "neurons_heatmap", kinds=("neurons",), ndims=(2,), last_axes=("layer", "neuron"))
    n_layers, d_mlp = result.shape
    if top_k is None and d_mlp > 2048:
        top_k = 32
    if top_k is None:
        return _layer_grid(result, "neurons_heatmap", "neuron", "neuron", title, "MLP neurons")
    if not 1 <= top_k <= d_mlp:
        raise ResultError(f"neurons_heatmap(top_k={top_k}): top_k must be between 1 and the number of neurons "
                          f"({d_mlp}).")
    key = torch.where(torch.isfinite(result.scores), result.scores.abs(), torch.tensor(-1.0))
    idx = key.topk(top_k, dim=-1).indices  # [layer, k]
    z = result.scores.gather(-1, idx)
    neuron_labels = result.labels.get("neuron")
    y_labels = result.labels.get("layer")
    yl = [display_token(t) for t in (y_labels if y_labels is not None else range(n_layers))]
    custom = [[[display_token(neuron_labels[n] if neuron_labels else n), yl[i], r + 1]
               for r, n in enumerate(idx[i].tolist())] for i in range(n_layers)]
    value = _score_name(result)
    fig = go.Figure(go.Heatmap(z=_np(z), x=list(range(1, top_k + 1)), y=list(range(n_layers)), customdata=custom,
                               hovertemplate=(f"layer %{{customdata[1]}}<br>neuron %{{customdata[0]}} "
                                              f"(rank %{{customdata[2]}})<br>{html.escape(value)} %{{z:.4g}}"
                                              "<extra></extra>"),
                               colorbar=dict(title=dict(text=html.escape(value))), **_color_kwargs(z)))
    fig.update_xaxes(title_text=f"Rank within layer (top {top_k} by |score|)")
    fig.update_yaxes(title_text="Layer", **_ticks(y_labels, n_layers))
    return _layout(fig, title if title is not None else _default_title(result, f"MLP neurons (top {top_k} per layer)"),
                   height=max(320, min(900, 80 + 18 * n_layers)))


def resid_heatmap(result: Result, title: str | None = None) -> go.Figure:
    """Residual-stream scores as a layer × position heatmap with token tick labels.

    Args:
        result: kind ``"resid_pos"`` with axes ``(layer, position)``; ``labels["position"]`` holds the
            token strings (shown as x tick labels via :func:`display_token`).
        title: figure title.

    Returns:
        Figure with x = position (ticks = tokens), y = layer.
    """
    _check(result, "resid_heatmap", kinds=("resid_pos",), ndims=(2, 3), last_axes=("layer", "position"))
    return _layer_grid(result, "resid_heatmap", "position", "position", title, "Residual stream by position")


def matrix_heatmap(result: Result, title: str | None = None, *, zrange: tuple[float, float] | None = None,
                   annotate: bool | None = None) -> go.Figure:
    """Any 2-axis result as a heatmap (row 0 at the top, like a printed matrix)."""
    _check(result, "matrix_heatmap", ndims=(2,))
    ry, rx = result.axes
    ny, nx = result.shape
    z = result.scores
    color = _color_kwargs(z)
    if zrange is not None:
        color = dict(colorscale=DIVERGING if zrange[0] < 0 else SEQUENTIAL, zmin=zrange[0], zmax=zrange[1],
                     **({"zmid": 0.0} if zrange[0] < 0 else {}))
    if annotate is None:
        annotate = nx * ny <= 256
    fig = go.Figure(_heatmap_trace(z, x_name=rx, y_name=ry, x_ticks=result.labels.get(rx),
                                   y_ticks=result.labels.get(ry), value_name=_score_name(result), color=color,
                                   text_fmt="%{z:.2f}" if annotate else None))
    fig.update_xaxes(title_text=rx.capitalize(), **_ticks(result.labels.get(rx), nx))
    fig.update_yaxes(title_text=ry.capitalize(), autorange="reversed", **_ticks(result.labels.get(ry), ny))
    return _layout(fig, title if title is not None else _default_title(result, "Matrix"),
                   height=max(360, min(900, 120 + 28 * ny)))


def cosine_heatmap(result: Result, title: str | None = None) -> go.Figure:
    """Cosine similarities between directions (e.g. emotion vectors) as a heatmap in [-1, 1].

    Args:
        result: kind ``"matrix"`` with axes ``(row, col)`` and ``labels`` for both (e.g. emotion names).
        title: figure title.

    Returns:
        Figure with a diverging scale fixed to [-1, 1] (centred at 0), cells annotated when small.
    """
    _check(result, "cosine_heatmap", kinds=("matrix",), ndims=(2,))
    z = result.scores[torch.isfinite(result.scores)]
    bound = 1.0 if z.numel() == 0 or float(z.abs().max()) <= 1.0 + 1e-4 else float(z.abs().max())
    return matrix_heatmap(result, title if title is not None else _default_title(result, "Cosine similarity"),
                          zrange=(-bound, bound))


# --------------------------------------------------------------------------------------------
# lines
# --------------------------------------------------------------------------------------------
def _band(x: list, lo: torch.Tensor, hi: torch.Tensor, color: str, name: str, group: str) -> go.Scatter:
    """A shaded confidence band (polygon x → then back ←)."""
    lo_l, hi_l = _np(lo).tolist(), _np(hi).tolist()
    return go.Scatter(x=list(x) + list(x)[::-1], y=hi_l + lo_l[::-1], mode="lines", fill="toself",
                      fillcolor=_hex_rgba(color, 0.18),
                      line=dict(width=0), hoverinfo="skip", showlegend=False, name=f"{name} CI",
                      legendgroup=group)


def _line(x: list, y: torch.Tensor, color: str, name: str, group: str, x_name: str, y_name: str,
          lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> list[go.Scatter]:
    traces = []
    if lo is not None and hi is not None:
        traces.append(_band(x, lo, hi, color, name, group))
    ci = "" if lo is None else "<br>CI [%{customdata[0]:.4g}, %{customdata[1]:.4g}]"
    custom = None if lo is None else [[a, b] for a, b in zip(_np(lo).tolist(), _np(hi).tolist())]
    traces.append(go.Scatter(x=list(x), y=_np(y).tolist(), mode="lines+markers", name=display_token(name),
                             line=dict(color=color, width=2), marker=dict(size=5), legendgroup=group,
                             customdata=custom,
                             hovertemplate=(f"{display_token(name)}<br>{html.escape(x_name)} %{{x}}<br>"
                                            f"{html.escape(y_name)} %{{y:.4g}}{ci}<extra></extra>")))
    return traces


def _ci(result: Result) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    lo, hi = result.extra.get("ci_low"), result.extra.get("ci_high")
    return (lo, hi) if lo is not None and hi is not None else (None, None)


def curves(results: "Mapping[str, Result] | Result", title: str | None = None, x_title: str | None = None,
           y_title: str | None = None) -> go.Figure:
    """Effect curves (ablation / enhancement / steering sweeps), one line per result, with CI bands.

    Args:
        results: ``{series name: Result}``; each result has one axis (kind ``"curve"``, axis ``"x"``,
            ``"k"``, ``"scale"``, ...). x values are the axis labels when present, else 0..n-1.
            ``extra["ci_low"]``/``extra["ci_high"]`` (same shape) are drawn as shaded bands.
            A single Result is accepted too.
        title, x_title, y_title: figure and axis titles (defaults: the axis name and the metric).

    Returns:
        Figure with one ``lines+markers`` trace per series (plus a band trace before it when CIs exist).
    """
    if isinstance(results, Result):
        results = {str(results.meta.get("name") or results.meta.get("method") or results.kind): results}
    if not isinstance(results, Mapping) or not results:
        raise ResultError("curves() takes a non-empty dict {series name: Result}; got "
                          f"{type(results).__name__ if not isinstance(results, Mapping) else 'an empty dict'}.")
    fig = go.Figure()
    first = None
    for i, (name, res) in enumerate(results.items()):
        _check(res, "curves", ndims=(1,))
        first = first or res
        ax = res.axes[0]
        x = _labels(res, ax)
        lo, hi = _ci(res)
        color = PALETTE[i % len(PALETTE)]
        for t in _line(x, res.scores, color, str(name), f"s{i}", x_title or ax, y_title or _score_name(res), lo, hi):
            fig.add_trace(t)
    assert first is not None
    fig.update_xaxes(title_text=x_title or first.axes[0])
    fig.update_yaxes(title_text=y_title or _score_name(first), zeroline=True)
    return _layout(fig, title if title is not None else _default_title(first, "Effect curves"), height=420,
                   hovermode="closest")


def layer_lines(result: Result, title: str | None = None, y_title: str | None = None) -> go.Figure:
    """Per-layer values (e.g. vector norms, probe accuracy) as lines over layers.

    Args:
        result: kind ``"layers"`` with axes ``(layer,)`` (one line) or ``(series, layer)`` such as
            ``(emotion, layer)`` (one line per series label). CIs in ``extra`` are drawn as bands.
        title, y_title: figure title and y-axis title (default: the metric).

    Returns:
        Figure with x = layer and one trace per series.
    """
    _check(result, "layer_lines", ndims=(1, 2), last_axes=("layer",))
    if result.kind not in ("layers", "curve") and result.scores.ndim == 1 and result.axes != ("layer",):
        raise ResultError(f"layer_lines() needs a per-layer result, got kind {result.kind!r}.")
    x = _labels(result, "layer")
    yname = y_title or _score_name(result)
    lo, hi = _ci(result)
    fig = go.Figure()
    if result.scores.ndim == 1:
        series = [("value" if not result.meta.get("name") else str(result.meta["name"]), result.scores, lo, hi)]
    else:
        ax = result.axes[0]
        series = [(str(lab), result.scores[i], None if lo is None else lo[i], None if hi is None else hi[i])
                  for i, lab in enumerate(_labels(result, ax))]
    for i, (name, y, l, h) in enumerate(series):
        for t in _line(x, y, PALETTE[i % len(PALETTE)], name, f"s{i}", "layer", yname, l, h):
            fig.add_trace(t)
    fig.update_xaxes(title_text="Layer")
    fig.update_yaxes(title_text=yname)
    return _layout(fig, title if title is not None else _default_title(result, "Per layer"), height=420,
                   showlegend=len(series) > 1)


def _sublayer_names(result: Result) -> list[str]:
    n = result.scores.shape[-1]
    if "sublayer" in result.labels:
        return [str(s) for s in result.labels["sublayer"]]
    return ["attn", "mlp"] if n == 2 else [f"sublayer {i}" for i in range(n)]


def sublayer_influence(result: Result, title: str | None = None) -> go.Figure:
    """Sublayer (attention vs MLP) influence across layers.

    Args:
        result: kind ``"sublayers"`` with axes ``(layer, sublayer)``: one line per sublayer; or stacked
            ``(emotion, layer, sublayer)``: one panel per sublayer, one line per emotion. CIs in
            ``extra["ci_low"/"ci_high"]`` are drawn as bands.
        title: figure title.

    Returns:
        Figure with x = layer, y = influence.
    """
    _check(result, "sublayer_influence", kinds=("sublayers",), ndims=(2, 3), last_axes=("layer", "sublayer"))
    subs = _sublayer_names(result)
    x = _labels(result, "layer")
    yname = _score_name(result)
    lo, hi = _ci(result)
    if result.scores.ndim == 2:
        fig = go.Figure()
        for j, s in enumerate(subs):
            for t in _line(x, result.scores[:, j], PALETTE[j % len(PALETTE)], s, f"s{j}", "layer", yname,
                           None if lo is None else lo[:, j], None if hi is None else hi[:, j]):
                fig.add_trace(t)
        fig.update_xaxes(title_text="Layer")
        fig.update_yaxes(title_text=yname)
    else:
        series = _labels(result, result.axes[0])
        fig = make_subplots(rows=1, cols=len(subs), subplot_titles=[display_token(s) for s in subs],
                            shared_yaxes=True, horizontal_spacing=0.05)
        for j in range(len(subs)):
            for i, lab in enumerate(series):
                for t in _line(x, result.scores[i, :, j], PALETTE[i % len(PALETTE)], str(lab), f"s{i}", "layer",
                               yname, None if lo is None else lo[i, :, j], None if hi is None else hi[i, :, j]):
                    t.showlegend = j == 0 and t.showlegend is not False
                    fig.add_trace(t, row=1, col=j + 1)
        fig.update_xaxes(title_text="Layer")
        fig.update_yaxes(title_text=yname, col=1)
    return _layout(fig, title if title is not None else _default_title(result, "Sublayer influence"), height=420)


# --------------------------------------------------------------------------------------------
# scatter and bars
# --------------------------------------------------------------------------------------------
def _pca2(x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Project [n, d] onto its top-2 principal components; returns (points [n, 2], explained ratios)."""
    xc = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(xc.double(), full_matrices=False)
    var = s ** 2
    ratio = (var / var.sum().clamp_min(1e-30)).tolist()
    pts = (xc.double() @ vh[:2].T).float()
    if pts.shape[1] < 2:
        pts = torch.cat([pts, torch.zeros(pts.shape[0], 2 - pts.shape[1])], 1)
    return pts, (ratio + [0.0, 0.0])[:2]


def pca_scatter(points: "Float[torch.Tensor, 'n d'] | Result", labels: Sequence[str] | None = None,
                title: str | None = None) -> go.Figure:
    """Points coloured by emotion (or any label): a 2-D scatter, projecting to 2 PCs when wider.

    Args:
        points: ``[n, 2]`` coordinates, or ``[n, d]`` with ``d > 2`` (projected onto the top two principal
            components, axis titles give the explained variance), or a Result whose first axis indexes
            the points (its labels are the default ``labels``).
        labels: ``n`` group names (one trace per distinct name, in first-seen order).
        title: figure title.

    Returns:
        Figure with one ``markers`` trace per label.
    """
    res = None
    if isinstance(points, Result):
        res = points
        _check(res, "pca_scatter", ndims=(2,))
        if labels is None:
            labels = res.labels.get(res.axes[0])
        points = res.scores
    if not isinstance(points, torch.Tensor):
        try:
            points = torch.as_tensor(points, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise ResultError(f"pca_scatter() needs an [n, d] tensor or a Result, got {type(points).__name__}.") from e
    points = points.detach().float().cpu()
    if points.ndim != 2 or points.shape[0] == 0 or points.shape[1] == 0:
        raise ResultError(f"pca_scatter() needs a non-empty [n, d] tensor, got shape {tuple(points.shape)}.")
    n = points.shape[0]
    if labels is None:
        labels = ["points"] * n
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise ResultError(f"pca_scatter(): {len(labels)} labels for {n} points; pass one label per point.")
    if points.shape[1] == 2:
        xy, axis_titles = points, ("x", "y")
        if res is not None and res.axes[1] in res.labels:
            axis_titles = tuple(str(s) for s in res.labels[res.axes[1]])  # type: ignore[assignment]
    else:
        xy, ratio = _pca2(points)
        axis_titles = (f"PC1 ({100 * ratio[0]:.1f}% var)", f"PC2 ({100 * ratio[1]:.1f}% var)")
    fig = go.Figure()
    for i, lab in enumerate(dict.fromkeys(labels)):
        rows = [j for j, s in enumerate(labels) if s == lab]
        fig.add_trace(go.Scatter(x=xy[rows, 0].tolist(), y=xy[rows, 1].tolist(), mode="markers",
                                 name=display_token(lab), marker=dict(size=8, color=PALETTE[i % len(PALETTE)],
                                                                      opacity=0.8),
                                 customdata=rows,
                                 hovertemplate=(f"{display_token(lab)}<br>point %{{customdata}}<br>"
                                                "(%{x:.3g}, %{y:.3g})<extra></extra>")))
    fig.update_xaxes(title_text=axis_titles[0], zeroline=True)
    fig.update_yaxes(title_text=axis_titles[1], zeroline=True)
    default = "PCA by emotion" if points.shape[1] > 2 else "Scatter by label"
    return _layout(fig, title if title is not None else (_default_title(res, default) if res else default),
                   height=460)


def circuit_allocation(result: Result, title: str | None = None) -> go.Figure:
    """How many circuit components sit in each layer, split into attention and MLP.

    Args:
        result: kind ``"sublayers"`` ``(layer, sublayer)`` holding counts (stacked bars per sublayer), or
            kind ``"layers"`` ``(layer,)`` (one bar series); a leading stacked axis (e.g. ``emotion``)
            gives one panel per value. Kind ``"heads"`` / ``"neurons"`` membership masks are counted
            per layer (non-zero cells).
        title: figure title.

    Returns:
        Figure with x = layer, stacked bars of counts.
    """
    _check(result, "circuit_allocation", kinds=("sublayers", "layers", "heads", "neurons"))
    if result.kind in ("heads", "neurons"):
        _check(result, "circuit_allocation", ndims=(2, 3), last_axes=("layer", result.axes[-1]))
        name = "attn heads" if result.kind == "heads" else "mlp neurons"
        counts = (result.scores.nan_to_num(0) != 0).sum(-1).float()[..., None]
        result = Result("sublayers", counts, result.axes[:-1] + ("sublayer",),
                        {**{k: v for k, v in result.labels.items() if k in result.axes[:-1]}, "sublayer": [name]},
                        {}, dict(result.meta))
    elif result.kind == "layers":
        _check(result, "circuit_allocation", ndims=(1, 2), last_axes=("layer",))
        result = Result("sublayers", result.scores[..., None], result.axes + ("sublayer",),
                        {**result.labels, "sublayer": [str(result.meta.get("name", "components"))]}, {},
                        dict(result.meta))
    _check(result, "circuit_allocation", ndims=(2, 3), last_axes=("layer", "sublayer"))
    subs = _sublayer_names(result)
    x = _labels(result, "layer")
    names, mats = _lead_facets(result, 2)
    rows, cols = _facet_grid(len(mats))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names if len(mats) > 1 else None, shared_yaxes=True)
    for f, m in enumerate(mats):
        for j, s in enumerate(subs):
            fig.add_trace(go.Bar(x=x, y=_np(m[:, j]).tolist(), name=display_token(s), legendgroup=s,
                                 showlegend=f == 0, marker_color=PALETTE[j % len(PALETTE)],
                                 hovertemplate=f"layer %{{x}}<br>{display_token(s)} %{{y:.4g}}<extra></extra>"),
                          row=f // cols + 1, col=f % cols + 1)
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="Layer")
    fig.update_yaxes(title_text=str(result.meta.get("metric") or "count"), col=1)
    return _layout(fig, title if title is not None else _default_title(result, "Circuit allocation per layer"),
                   height=380 * rows)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
def plot(result: Result, **kwargs) -> go.Figure:
    """The default plot for a result, chosen by its kind.

    ``heads``/``heads_pos`` → :func:`heads_heatmap`; ``neurons`` → :func:`neurons_heatmap`;
    ``resid_pos`` → :func:`resid_heatmap`; ``sublayers`` → :func:`sublayer_influence`;
    ``layers`` → :func:`layer_lines`; ``curve`` (or any 1-axis result) → :func:`curves`;
    ``matrix`` → :func:`cosine_heatmap` when values lie in [-1, 1], else :func:`matrix_heatmap`;
    any other 2-axis result → :func:`matrix_heatmap`. Keyword arguments go to the chosen function.
    """
    if not isinstance(result, Result):
        if isinstance(result, Mapping):
            return curves(result, **kwargs)
        raise ResultError(f"plot() takes an emolens Result, got {type(result).__name__}.")
    _check(result, "plot")
    k = result.kind
    if k in ("heads", "heads_pos"):
        return heads_heatmap(result, **kwargs)
    if k == "neurons":
        return neurons_heatmap(result, **kwargs)
    if k == "resid_pos":
        return resid_heatmap(result, **kwargs)
    if k == "sublayers":
        return sublayer_influence(result, **kwargs)
    if k == "layers":
        return layer_lines(result, **kwargs)
    if k == "matrix" and result.scores.ndim == 2:
        finite = result.scores[torch.isfinite(result.scores)]
        if finite.numel() and float(finite.abs().max()) <= 1.0 + 1e-4:
            return cosine_heatmap(result, **kwargs)
        return matrix_heatmap(result, **kwargs)
    if result.scores.ndim == 1:
        return curves({str(result.meta.get("name") or k): result}, **kwargs)
    if result.scores.ndim == 2:
        return matrix_heatmap(result, **kwargs)
    raise ResultError(f"plot(): no default plot for kind {k!r} with axes {result.axes}; reduce it to 1 or 2 axes "
                      "or call a specific emolens.viz function.")
