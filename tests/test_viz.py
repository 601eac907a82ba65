"""Plots on hand-built results: axes, labels, value ranges, colour scales, hover; bad input."""

from __future__ import annotations

import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from emolens.errors import InputError, ResultError
from emolens.results import Result, stack_results
from emolens import viz
from emolens.viz import attention as att


def _z(trace) -> np.ndarray:
    return np.asarray(trace.z, dtype=float)


def _heatmaps(fig):
    return [t for t in fig.data if isinstance(t, go.Heatmap)]


# ---------------------------------------------------------------------------------------------
# heatmaps
# ---------------------------------------------------------------------------------------------
def test_heads_heatmap_axes_values_and_diverging_scale():
    scores = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.25, -0.75]])  # 2 layers x 3 heads
    r = Result("heads", scores, ("layer", "head"), meta={"method": "atp", "metric": "logit_diff", "model": "m"})
    fig = viz.heads_heatmap(r)
    (hm,) = _heatmaps(fig)
    np.testing.assert_allclose(_z(hm), scores.numpy())  # y = layer rows, x = head columns
    assert list(hm.x) == [0, 1, 2] and list(hm.y) == [0, 1]
    assert fig.layout.xaxis.title.text == "Head" and fig.layout.yaxis.title.text == "Layer"
    assert hm.zmid == 0 and hm.colorscale[0][1] == "rgb(5,48,97)"  # RdBu reversed: blue at the negative end
    assert hm.colorbar.title.text == "logit_diff"
    assert "atp" in fig.layout.title.text and "logit_diff" in fig.layout.title.text
    # hover names layer, head and value
    assert "layer" in hm.hovertemplate and "head" in hm.hovertemplate and "%{z" in hm.hovertemplate
    assert hm.customdata[1][2] == ["2", "1"]  # [x label, y label] of cell (layer 1, head 2)
    assert viz.plot(r).data[0].z is not None  # dispatch picks the same plot
    assert np.allclose(_z(viz.plot(r).data[0]), _z(hm))
    assert viz.heads_heatmap(r, title="T").layout.title.text == "T"


def test_nonnegative_scores_use_sequential_scale():
    r = Result("heads", torch.rand(3, 4), ("layer", "head"))
    (hm,) = _heatmaps(viz.heads_heatmap(r))
    assert hm.zmid is None and hm.colorscale[0][1] == "#440154"  # Viridis


def test_heads_pos_is_summed_and_stacked_heads_get_panels():
    s = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) - 10
    r = Result("heads_pos", s, ("layer", "head", "position"))
    (hm,) = _heatmaps(viz.plot(r))
    np.testing.assert_allclose(_z(hm), s.sum(-1).numpy())
    a = Result("heads", torch.randn(2, 3), ("layer", "head"))
    b = Result("heads", -torch.rand(2, 3), ("layer", "head"))
    st = stack_results([a, b], "emotion", ["joy", "anger"])
    fig = viz.heads_heatmap(st)
    hms = _heatmaps(fig)
    assert len(hms) == 2 and all(h.coloraxis == "coloraxis" for h in hms)
    assert fig.layout.coloraxis.cmid == 0
    assert [x.text for x in fig.layout.annotations] == ["emotion joy", "emotion anger"]
    np.testing.assert_allclose(_z(hms[1]), b.scores.numpy())


def test_neurons_heatmap_full_and_topk():
    s = torch.zeros(3, 10)
    s[0, 7], s[0, 2], s[1, 4], s[2, 9], s[2, 0] = 5.0, -3.0, 1.0, -2.0, 0.5
    r = Result("neurons", s, ("layer", "neuron"))
    (full,) = _heatmaps(viz.neurons_heatmap(r))
    assert _z(full).shape == (3, 10)
    fig = viz.neurons_heatmap(r, top_k=2)
    (hm,) = _heatmaps(fig)
    np.testing.assert_allclose(_z(hm), [[5.0, -3.0], [1.0, 0.0], [-2.0, 0.5]])  # per layer, by |score|
    assert list(hm.x) == [1, 2]
    assert hm.customdata[0][0][0] == "7" and hm.customdata[0][1][0] == "2"  # hover names the neuron index
    assert "Rank" in fig.layout.xaxis.title.text and hm.zmid == 0
    wide = Result("neurons", torch.randn(2, 3000), ("layer", "neuron"))
    assert _z(_heatmaps(viz.plot(wide))[0]).shape == (2, 32)  # wide MLPs default to the top-k view
    with pytest.raises(ResultError, match="top_k"):
        viz.neurons_heatmap(r, top_k=11)


def test_resid_heatmap_token_ticks_keep_duplicates_and_escape():
    toks = ["<|im_start|>", "I", " feel", " feel", "\n"]
    s = torch.linspace(-1, 1, 3 * 5).reshape(3, 5)
    r = Result("resid_pos", s, ("layer", "position"), labels={"position": toks})
    fig = viz.resid_heatmap(r)
    (hm,) = _heatmaps(fig)
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3, 4]  # numeric: the duplicate " feel" stays two columns
    assert list(fig.layout.xaxis.ticktext) == ["&lt;|im_start|&gt;", "I", " feel", " feel", "\\n"]
    assert [viz.display_token(t) for t in toks] == list(fig.layout.xaxis.ticktext)
    assert hm.customdata[2][0] == ["&lt;|im_start|&gt;", "2"]  # hover shows the token
    np.testing.assert_allclose(_z(hm), s.numpy(), rtol=1e-6)
    assert hm.zmid == 0


def test_cosine_heatmap_fixed_range_labels_and_matrix_orientation():
    emo = ["joy", "anger", "fear"]
    m = torch.tensor([[1.0, -0.5, 0.1], [-0.5, 1.0, 0.3], [0.1, 0.3, 1.0]])
    r = Result("matrix", m, ("row", "col"), labels={"row": emo, "col": emo}, meta={"metric": "cosine"})
    fig = viz.cosine_heatmap(r)
    (hm,) = _heatmaps(fig)
    assert (hm.zmin, hm.zmax, hm.zmid) == (-1.0, 1.0, 0.0)
    assert list(fig.layout.xaxis.ticktext) == emo and list(fig.layout.yaxis.ticktext) == emo
    assert fig.layout.yaxis.autorange == "reversed"  # row 0 on top
    assert hm.texttemplate  # small matrices are annotated
    assert viz.plot(r).data[0].zmin == -1.0
    big = Result("matrix", m * 5, ("row", "col"))
    assert viz.plot(big).data[0].zmin is None  # not cosine-like -> generic matrix heatmap
    with pytest.raises(ResultError, match="matrix"):
        viz.cosine_heatmap(Result("heads", m, ("layer", "head")))


# ---------------------------------------------------------------------------------------------
# lines, scatter, bars
# ---------------------------------------------------------------------------------------------
def test_curves_lines_and_ci_bands():
    x = [0, 1, 2, 4]
    y = torch.tensor([0.0, 0.5, 0.8, 0.9])
    lo, hi = y - 0.1, y + 0.2
    abl = Result("curve", y, ("x",), {"x": x}, {"ci_low": lo, "ci_high": hi}, meta={"metric": "logit_diff"})
    enh = Result("curve", -y, ("x",))
    fig = viz.curves({"ablation": abl, "enhancement": enh}, x_title="k", y_title="Δ metric")
    assert [t.name for t in fig.data] == ["ablation CI", "ablation", "enhancement"]
    band, line, line2 = fig.data
    assert list(line.x) == x and np.allclose(line.y, y.numpy())
    assert band.fill == "toself" and list(band.x) == x + x[::-1]
    np.testing.assert_allclose(band.y, np.r_[hi.numpy(), lo.numpy()[::-1]], rtol=1e-6)
    assert list(line2.x) == [0, 1, 2, 3]  # no labels -> 0..n-1
    assert fig.layout.xaxis.title.text == "k" and fig.layout.yaxis.title.text == "Δ metric"
    # a single result and any single-axis kind are accepted
    assert len(viz.curves(Result("layers", y, ("layer",))).data) == 1
    with pytest.raises(ResultError, match="axes"):
        viz.curves({"bad": Result("heads", torch.ones(2, 2), ("layer", "head"))})
    with pytest.raises(ResultError, match="empty"):
        viz.curves({})


def test_sublayer_influence_two_and_three_axes():
    s = torch.tensor([[0.1, 0.4], [0.2, -0.3], [0.0, 0.9]])
    r = Result("sublayers", s, ("layer", "sublayer"), {"sublayer": ["attn", "mlp"]},
               {"ci_low": s - 0.05, "ci_high": s + 0.05})
    fig = viz.sublayer_influence(r)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["attn", "mlp"] and len(fig.data) == 4  # + 2 bands
    np.testing.assert_allclose(lines[1].y, [0.4, -0.3, 0.9], rtol=1e-6)
    assert list(lines[0].x) == [0, 1, 2]
    st = stack_results([r, r, r], "emotion", ["joy", "fear", "anger"])
    fig3 = viz.plot(st)
    lines3 = [t for t in fig3.data if t.mode == "lines+markers"]
    assert len(lines3) == 6  # 3 emotions x 2 panels
    assert [a.text for a in fig3.layout.annotations] == ["attn", "mlp"]
    assert sum(1 for t in lines3 if t.showlegend is not False) == 3  # legend once per emotion
    with pytest.raises(ResultError):
        viz.sublayer_influence(Result("layers", torch.ones(3), ("layer",)))


def test_layer_lines_series():
    norms = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 4.0]])
    r = Result("layers", norms, ("emotion", "layer"), {"emotion": ["joy", "fear"]}, meta={"metric": "norm"})
    fig = viz.layer_lines(r)
    assert [t.name for t in fig.data] == ["joy", "fear"]
    np.testing.assert_allclose(fig.data[1].y, [0.5, 0.5, 4.0])
    assert fig.layout.yaxis.title.text == "norm" and fig.layout.xaxis.title.text == "Layer"
    assert len(viz.plot(Result("layers", norms[0], ("layer",))).data) == 1
    with pytest.raises(ResultError, match="layer"):
        viz.layer_lines(Result("heads", norms, ("layer", "head")))


def test_pca_scatter_groups_and_projection():
    pts = torch.tensor([[0.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    fig = viz.pca_scatter(pts, ["joy", "joy", "fear"])
    assert [t.name for t in fig.data] == ["joy", "fear"]
    assert list(fig.data[0].x) == [0.0, 1.0] and list(fig.data[1].y) == [5.0]
    # d > 2: projected on the top-2 PCs; points spread along one direction -> PC1 explains ~all variance
    line = torch.arange(6.0)[:, None] * torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    fig = viz.pca_scatter(line, list("aabbcc"))
    assert fig.layout.xaxis.title.text.startswith("PC1 (100.0%")
    xs = np.concatenate([t.x for t in fig.data])
    assert np.ptp(xs) == pytest.approx(5 * float(torch.tensor([1.0, 2.0, -1.0, 0.5]).norm()), rel=1e-4)
    r = Result("matrix", pts, ("item", "pc"), {"item": ["a", "b", "b"], "pc": ["PC1", "PC2"]})
    fig = viz.pca_scatter(r)
    assert [t.name for t in fig.data] == ["a", "b"] and fig.layout.xaxis.title.text == "PC1"
    with pytest.raises(ResultError, match="labels"):
        viz.pca_scatter(pts, ["a"])
    with pytest.raises(ResultError, match="non-empty"):
        viz.pca_scatter(torch.zeros(0, 2), [])


def test_circuit_allocation_counts():
    counts = torch.tensor([[2.0, 0.0], [1.0, 5.0], [0.0, 3.0]])
    r = Result("sublayers", counts, ("layer", "sublayer"), {"sublayer": ["attn", "mlp"]})
    fig = viz.circuit_allocation(r)
    assert fig.layout.barmode == "stack" and [t.name for t in fig.data] == ["attn", "mlp"]
    assert list(fig.data[1].y) == [0.0, 5.0, 3.0] and list(fig.data[0].x) == [0, 1, 2]
    mask = torch.zeros(3, 4)
    mask[0, 1] = mask[0, 3] = mask[2, 0] = 1
    fig = viz.circuit_allocation(Result("heads", mask, ("layer", "head")))
    assert list(fig.data[0].y) == [2.0, 0.0, 1.0] and fig.data[0].name == "attn heads"
    fig = viz.circuit_allocation(Result("layers", torch.tensor([1.0, 2.0]), ("layer",)))
    assert list(fig.data[0].y) == [1.0, 2.0]
    with pytest.raises(ResultError):
        viz.circuit_allocation(Result("matrix", counts, ("row", "col")))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [viz.heads_heatmap, viz.neurons_heatmap, viz.resid_heatmap, viz.cosine_heatmap,
                                viz.sublayer_influence, viz.layer_lines, viz.circuit_allocation, viz.plot])
def test_wrong_kind_empty_and_non_result_raise(fn):
    wrong = Result("curve", torch.ones(3), ("x",))
    if fn is not viz.plot:
        with pytest.raises(ResultError):
            fn(wrong)
    kinds = {viz.heads_heatmap: ("heads", ("layer", "head")), viz.neurons_heatmap: ("neurons", ("layer", "neuron")),
             viz.resid_heatmap: ("resid_pos", ("layer", "position")), viz.cosine_heatmap: ("matrix", ("row", "col")),
             viz.sublayer_influence: ("sublayers", ("layer", "sublayer")), viz.layer_lines: ("layers", ("s", "layer")),
             viz.circuit_allocation: ("sublayers", ("layer", "sublayer")), viz.plot: ("heads", ("layer", "head"))}
    kind, axes = kinds[fn]
    with pytest.raises(ResultError, match="empty"):
        fn(Result(kind, torch.zeros(0, 2), axes))
    with pytest.raises(ResultError, match="Result"):
        fn(torch.ones(2, 2))


def test_plot_dispatch_table():
    cases = {
        "heads": (("layer", "head"), "Head"), "neurons": (("layer", "neuron"), "Neuron"),
        "resid_pos": (("layer", "position"), "Position"), "sublayers": (("layer", "sublayer"), "Layer"),
        "layers": (("layer",), "Layer"), "curve": (("x",), "x"), "odd": (("a", "b"), "B"),
    }
    for kind, (axes, xtitle) in cases.items():
        r = Result(kind, torch.randn(*([3] * len(axes))), axes)
        assert viz.plot(r).layout.xaxis.title.text == xtitle, kind
    with pytest.raises(ResultError, match="no default plot"):
        viz.plot(Result("odd", torch.randn(2, 2, 2, 2), ("a", "b", "c", "d")))


# ---------------------------------------------------------------------------------------------
# notebook display and circuitsvis
# ---------------------------------------------------------------------------------------------
def test_result_repr_html_is_offline(monkeypatch):
    monkeypatch.setattr(viz, "_plotlyjs_sent", False)
    r = Result("heads", torch.randn(2, 2), ("layer", "head"))
    first, second = r._repr_html_(), r._repr_html_()
    assert re.search(r"<script[^>]*\ssrc=", first) is None and "Plotly.newPlot" in first  # nothing fetched
    assert len(first) > 1_000_000 > len(second)  # plotly.js embedded once per session
    assert "<table" in second  # the top cells are listed too
    monkeypatch.setattr(viz, "NOTEBOOK_PLOTLYJS", "always")
    assert len(r._repr_html_()) > 1_000_000


def test_section_repr_html_fragment():
    from emolens.sections import Section

    sec = Section("S", text=["<b>x</b>"]).add_figure("f", viz.plot(Result("layers", torch.ones(3), ("layer",))))
    h = sec._repr_html_()
    assert h.startswith("<div class='emolens-report'>") and "&lt;b&gt;x&lt;/b&gt;" in h and "<!doctype" not in h


def test_attention_html_bundle_and_escaping():
    p = torch.softmax(torch.randn(2, 3, 3), -1)
    snip = viz.attention_heads_html(p, ["a", "</script><b>", "c"], ["h0", "h1"])
    assert att.NEEDS_BUNDLE in snip and "CircuitsVis.AttentionHeads" in snip
    assert "</script><b>" not in snip  # token text cannot close the script element
    assert "unpkg.com" not in snip and len(snip) < 10_000  # no CDN import and no bundle copy
    full = viz.attention_heads_html(p, ["a", "b", "c"], include_bundle=True)
    assert full.count('data-emolens="circuitsvis-bundle"') == 1 and len(full) > 1_000_000
    assert re.search(r"</script", viz.bundle_script()[8:-9], re.I) is None  # bundle body cannot end early
    with pytest.raises(InputError, match="tokens"):
        viz.attention_heads_html(p, ["a"])
    with pytest.raises(ResultError):
        viz.attention_heads_html(torch.zeros(0, 3, 3), [])


def test_strip_bundle_on_circuitsvis_local_src():
    import circuitsvis as cv

    rendered = cv.attention.attention_heads(torch.softmax(torch.randn(2, 3, 3), -1), ["a", "b", "c"])
    stripped = att.strip_bundle(rendered.local_src)
    assert stripped.startswith(att.NEEDS_BUNDLE) and len(stripped) < 20_000 and "CircuitsVis.render" in stripped


def test_head_patterns_match_bridge_cache(tiny):
    """Patterns read through the emolens engine equal TransformerLens's own cache (independent path)."""
    view = viz.head_patterns(tiny, "hello there", [(1, 0), (2, 3), "head.0.1"], chat=False)
    assert view.head_names == ["L1H0", "L2H3", "L0H1"]
    n = len(view.tokens)
    assert view.pattern.shape == (3, n, n)
    torch.testing.assert_close(view.pattern.sum(-1), torch.ones(3, n), atol=1e-5, rtol=0)
    assert torch.all(view.pattern.triu(1) == 0)  # causal
    b = tiny.encode(["hello there"], chat=False)
    with torch.no_grad():
        _, cache = tiny.bridge.run_with_cache(b.input_ids, attention_mask=b.attention_mask)
    for i, (L, h) in enumerate([(1, 0), (2, 3), (0, 1)]):
        ref = cache[f"blocks.{L}.attn.hook_pattern"][0, h].float()
        torch.testing.assert_close(view.pattern[i], ref, atol=1e-5, rtol=1e-4)
    assert "CircuitsVis.render" in view._repr_html_() and len(view._repr_html_()) > 1_000_000
    with pytest.raises(Exception, match="out of range"):
        viz.head_patterns(tiny, "hi", [(tiny.n_layers, 0)], chat=False)
