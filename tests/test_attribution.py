"""Attribution patching: exactness where the metric is linear, parity with TransformerLens, IG
convergence, the AtP* QK fix and GradDrop against independent hook code, edges on GQA and
post-norm models against exact edge patching, bad input."""

from __future__ import annotations

import pytest
import torch

from emolens import Site, resid
from emolens.attribution import attribute
from emolens.errors import InputError, MetricError
from emolens.metrics import logit_diff, projection
from emolens.patching import patch
from emolens.results import Result

CLEAN = ["I am glad", "A cat sat"]  # equal lengths: the TL-hook references run unpadded
CORR = ["I am sad!", "A dog sat"]


def _v(m, seed=0):
    return torch.randn(m.d_model, generator=torch.Generator().manual_seed(seed))


def _batches(m, clean=CLEAN, corr=CORR):
    return m.encode(clean, chat=False), m.encode(corr, chat=False)


def _ld(m):
    return logit_diff(m, "a", "b")


# ------------------------------------------------------------------------------- exact where linear
def test_attribution_equals_patching_when_metric_is_linear(tiny):
    """A projection of hook_resid_pre at layer 3 is linear in that activation (and, on pre-norm
    blocks, in layer 2's neurons and MLP output): AtP must equal exact patching there."""
    m = tiny
    cb, xb = _batches(m)
    met = projection(Site("resid_pre", 3), _v(m))
    att = attribute(m, cb, xb, met, nodes=("resid", "neurons", "sublayers"), progress=False)
    ex = patch(m, cb, xb, met, nodes="resid", candidates=[(3, j) for j in range(att["resid"].shape[1])],
               progress=False)
    assert (att["resid"].scores[3] - ex.scores[3]).abs().max() < 1e-5
    assert att["resid"].scores[3].abs().max() > 1e-3  # not trivially zero
    if m.architecture != "Gemma3ForCausalLM":  # post-FFN norm makes neurons nonlinear there
        exn = patch(m, cb, xb, met, nodes="neurons", candidates={2: list(range(m.d_mlp))}, progress=False)
        assert (att["neurons"].scores[2] - exn.scores[2]).abs().max() < 1e-5
    exs = patch(m, cb, xb, met, nodes="sublayers", candidates=[(2, "mlp")], progress=False)
    assert abs(float(att["sublayers"].scores[2, 1] - exs.scores[2, 1])) < 1e-5
    # heads are linear in the residual right after attention (pre-norm blocks)
    if m.architecture != "Gemma3ForCausalLM":
        met_mid = projection(Site("resid_mid", 2), _v(m, 1))
        ah = attribute(m, cb, xb, met_mid, nodes="heads", progress=False)["heads"]
        eh = patch(m, cb, xb, met_mid, nodes="heads", candidates={2: list(range(m.n_heads))}, progress=False)
        assert (ah.scores[2] - eh.scores[2]).abs().max() < 1e-5


def test_node_scores_match_transformerlens_attribution_patch(tiny_llama):
    from transformer_lens.tools.analysis import EdgeAttributionConfig, attribution_patch

    m = tiny_llama
    cb, xb = _batches(m, CLEAN[:1], CORR[:1])
    ld = _ld(m)
    tl = attribution_patch(m.bridge, cb.input_ids, xb.input_ids, lambda logits: ld(logits, xb, {}).sum(),
                           EdgeAttributionConfig(granularity="node"))
    ours = attribute(m, cb, xb, ld, nodes=("heads", "sublayers"), progress=False)
    heads = torch.zeros(m.n_layers, m.n_heads)
    mlp = torch.zeros(m.n_layers)
    for node, s in tl.node_scores.items():
        if node.kind == "attn_head_out":
            heads[node.layer, node.head] += s
        elif node.kind == "mlp_out":
            mlp[node.layer] += s
    assert (ours["heads"].scores - heads).abs().max() < 1e-5
    assert (ours["sublayers"].scores[:, 1] - mlp).abs().max() < 1e-5


def test_frozen_weights_give_the_same_attribution(tiny_llama):
    """Users freeze weights (requires_grad_(False)); attribution needs activation gradients only."""
    m = tiny_llama
    cb, xb = _batches(m, CLEAN[:2], CORR[:2])
    ld = _ld(m)
    ref = attribute(m, cb, xb, ld, nodes=("resid", "heads"), progress=False)
    flags = [p.requires_grad for p in m.hf_model.parameters()]
    try:
        m.hf_model.requires_grad_(False)
        frozen = attribute(m, cb, xb, ld, nodes=("resid", "heads"), progress=False)
        assert not any(p.requires_grad for p in m.hf_model.parameters())  # the user's setting is kept
    finally:
        for p, f in zip(m.hf_model.parameters(), flags):
            p.requires_grad_(f)
    for k in ("resid", "heads"):
        assert frozen[k].scores.abs().max() > 0
        assert torch.allclose(frozen[k].scores, ref[k].scores, atol=1e-6)


# ------------------------------------------------------------------------------------ IG
def test_integrated_gradients_converge_to_the_total_effect(tiny_llama):
    m = tiny_llama
    cb, xb = _batches(m)
    ld = _ld(m)
    errs = []
    for steps in (1, 4, 32):
        r = attribute(m, cb, xb, ld, nodes="resid", method="ig", ig_steps=steps, progress=False)["resid"]
        gap = r.meta["clean_metric"] - r.meta["corrupted_metric"]
        errs.append(abs(float(r.scores[0].sum()) - gap))  # completeness at the interpolated layer
        if steps == 1:
            plain = attribute(m, cb, xb, ld, nodes="resid", progress=False)["resid"]
            assert torch.allclose(r.scores, plain.scores, atol=1e-6)
    assert errs[2] < errs[1] < errs[0]
    assert errs[2] < 0.1 * abs(gap)


# ------------------------------------------------------------------------------------ AtP*
def _exact_qk_patch(m, cb, xb, L, which, idx, read_hook, direction):
    """Exact patch of hook_q (query head) / hook_k (KV head) at all positions, bridge hooks."""
    br = m.bridge
    name = f"blocks.{L}.attn.hook_{which}"
    _, cc = br.run_with_cache(cb.input_ids, names_filter=[name])
    seen = {}

    def put(t, hook):
        t = t.clone()
        t[:, :, idx] = cc[name][:, :, idx]
        return t

    def read(t, hook):
        seen["x"] = t[:, -1] @ (direction / direction.norm())

    with torch.no_grad():
        with br.hooks(fwd_hooks=[(read_hook, read)]):
            br(xb.input_ids)
        base = seen["x"].mean()
        with br.hooks(fwd_hooks=[(name, put), (read_hook, read)]):
            br(xb.input_ids)
    return float(seen["x"].mean() - base)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_qk_fix_is_exact_when_downstream_is_linear_in_the_pattern(name):
    from tests.conftest import get_model

    m = get_model(name)
    cb, xb = _batches(m)
    L = 2
    v = _v(m, 3)
    met = projection(Site("resid_mid", L), v)  # resid_mid = resid_pre + o_proj(A @ V): linear in A
    fixed = attribute(m, cb, xb, met, nodes=("q", "k"), qk_fix=True, progress=False)
    plain = attribute(m, cb, xb, met, nodes=("q", "k"), progress=False)
    assert fixed["q"].meta["method"] == "atp+qk"
    for h in range(m.n_heads):
        ex = _exact_qk_patch(m, cb, xb, L, "q", h, f"blocks.{L}.hook_resid_mid", v)
        assert abs(float(fixed["q"].scores[L, h]) - ex) < 1e-4 * (1 + abs(ex))
    for g in range(m.n_kv_heads):  # GQA: a key head feeds n_heads / n_kv_heads query heads
        ex = _exact_qk_patch(m, cb, xb, L, "k", g, f"blocks.{L}.hook_resid_mid", v)
        assert abs(float(fixed["k"].scores[L, g]) - ex) < 1e-4 * (1 + abs(ex))
    assert not torch.allclose(fixed["q"].scores[L], plain["q"].scores[L], atol=1e-6)  # the fix matters


def test_graddrop_matches_independent_detach_implementation(tiny_llama):
    m = tiny_llama
    br = m.bridge
    cb, xb = _batches(m)
    ld = _ld(m)
    res = attribute(m, cb, xb, ld, nodes="heads", method="atp*", progress=False)["heads"]
    nL = m.n_layers
    zc = br.run_with_cache(cb.input_ids, names_filter=[f"blocks.{L}.attn.hook_z" for L in range(nL)])[1]
    per_drop = []
    for drop in range(nL):
        kept = []

        def keep(t, hook):
            kept.append(t)
            return t

        det = [(f"blocks.{drop}.hook_attn_out", lambda t, hook: t.detach()),
               (f"blocks.{drop}.hook_mlp_out", lambda t, hook: t.detach())]
        with br.hooks(fwd_hooks=det + [(f"blocks.{L}.attn.hook_z", keep) for L in range(nL)]):
            val = ld(br(xb.input_ids), xb, {}).sum()
        grads = torch.autograd.grad(val, kept, allow_unused=True)
        c = torch.stack([torch.zeros(m.n_heads) if g is None else
                         ((zc[f"blocks.{L}.attn.hook_z"] - z.detach()) * g).sum((0, 1, 3))
                         for L, (z, g) in enumerate(zip(kept, grads))])
        per_drop.append(c / len(CLEAN))
    gd = sum(c.abs() for c in per_drop) / (nL - 1)
    assert torch.allclose(res.extra["graddrop"], gd, atol=1e-5)
    assert torch.allclose(res.scores, torch.sign(res.extra["atp"]) * gd, atol=1e-6)
    plain = attribute(m, cb, xb, ld, nodes="heads", progress=False)["heads"]
    assert torch.allclose(res.extra["atp"], plain.scores, atol=1e-6)


# ------------------------------------------------------------------------------------ edges
def _exact_edge(m, cb, xb, metric, row: str, col: str, eps: float = 1.0) -> float:
    """Exact edge patching with bridge hooks: add eps * (clean - corrupted write of `row`) to the
    input of reader `col` only (its q/k/v projection input, or the final norm input)."""
    br = m.bridge
    dh = m.d_head
    names = [n for L in range(m.n_layers) for n in (f"blocks.{L}.attn.hook_z", f"blocks.{L}.hook_mlp_out",
                                                      f"blocks.{L}.hook_resid_pre", f"blocks.{L}.ln1_post.hook_in")
             if n in br.hook_dict]
    _, cc = br.run_with_cache(cb.input_ids, names_filter=names)
    _, xc = br.run_with_cache(xb.input_ids, names_filter=names)
    if row == "embed":
        d = cc["blocks.0.hook_resid_pre"] - xc["blocks.0.hook_resid_pre"]
    elif row.startswith("m"):
        L = int(row[1:])
        d = cc[f"blocks.{L}.hook_mlp_out"] - xc[f"blocks.{L}.hook_mlp_out"]
    else:
        L, h = int(row[1:].split(".")[0]), int(row.split(".h")[1])
        o = br.blocks[L].attn.o.original_component

        def result(z):  # one head's o_proj output
            only = torch.zeros_like(z)
            only[:, :, h] = z[:, :, h]
            return o(only.flatten(2)) - o(torch.zeros_like(z).flatten(2))

        dr = result(cc[f"blocks.{L}.attn.hook_z"]) - result(xc[f"blocks.{L}.attn.hook_z"])
        if hasattr(br.blocks[L], "ln1_post"):  # post-norm: the head's change of the normed write
            post, raw = br.blocks[L].ln1_post.original_component, xc[f"blocks.{L}.ln1_post.hook_in"]
            d = post(raw + dr) - post(raw)
        else:
            d = dr
    d = eps * d
    if col == "logits":
        hooks = [("ln_final.hook_in", lambda t, hook: t + d)]
    else:
        L, idx, kind = int(col[1:].split(".")[0]), int(col.split(".")[1][1:]), col.split(".")[-1]
        attn = br.blocks[L].attn
        proj = {"q": attn.q, "k": attn.k, "v": attn.v}[kind].original_component
        x = xc[f"blocks.{L}.hook_resid_pre"] + d
        new = proj(br.blocks[L].ln1.original_component(x)).reshape(*x.shape[:2], -1, dh)

        def put(t, hook):
            t = t.clone()
            t[:, :, idx] = new[:, :, idx]
            return t

        hooks = [(f"blocks.{L}.attn.hook_{kind}", put)]
    with torch.no_grad():
        base = metric(br(xb.input_ids), xb, {}).mean()
        with br.hooks(fwd_hooks=hooks):
            out = metric(br(xb.input_ids), xb, {}).mean()
    return float(out - base)


def test_edges_sum_to_node_scores(tiny):
    m = tiny
    cb, xb = _batches(m)
    r = attribute(m, cb, xb, _ld(m), nodes=("edges", "heads", "sublayers", "resid"), progress=False)
    E = r["edges"]
    assert E.kind == "matrix" and E.axes == ("row", "col")
    rows, cols = E.labels["row"], E.labels["col"]
    assert len(rows) == 1 + m.n_layers * (m.n_heads + 1)
    assert len(cols) == m.n_layers * (m.n_heads + 2 * m.n_kv_heads + 1) + 1
    S = E.scores
    # impossible edges are NaN: a layer-2 head cannot feed layer-1 or layer-2 attention
    assert torch.isnan(S[rows.index("a2.h0"), cols.index("a1.h0.q")])
    assert torch.isnan(S[rows.index("a2.h0"), cols.index("a2.g0.k")])
    assert torch.isfinite(S[rows.index("a2.h0"), cols.index("m2")])
    for L in range(m.n_layers):
        for h in range(m.n_heads):
            total = torch.nansum(S[rows.index(f"a{L}.h{h}")])
            assert abs(float(total - r["heads"].scores[L, h])) < 1e-5
        assert abs(float(torch.nansum(S[rows.index(f"m{L}")]) - r["sublayers"].scores[L, 1])) < 1e-5
    assert abs(float(torch.nansum(S[0]) - r["resid"].scores[0].sum())) < 1e-5


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-gemma3"])
def test_edges_match_exact_edge_patching(name):
    """GQA (qwen2: 4 query / 2 KV heads) and post-norm GQA (gemma3: 4 / 1).

    Documented tolerance: (a) to first order the scores are exact: exact edge patching with the
    write scaled by eps = 1e-3, divided by eps, matches within 2% (+1e-3) for the largest edges,
    including key/value edges into shared KV heads and head edges through Gemma's post-norm;
    (b) with full-size patches, edges into the logits match within 20% (+0.01).
    """
    from tests.conftest import get_model

    m = get_model(name)
    cb, xb = _batches(m, CLEAN[:1], CORR[:1])
    ld = _ld(m)
    E = attribute(m, cb, xb, ld, nodes="edges", progress=False)["edges"]
    rows, cols, S = E.labels["row"], E.labels["col"], E.scores
    flat = torch.nan_to_num(S.abs(), nan=-1.0).flatten()
    checked = {"k": 0, "v": 0, "q": 0, "logits": 0}
    for i in torch.argsort(flat, descending=True).tolist():
        r, c = divmod(i, S.shape[1])
        kind = "logits" if cols[c] == "logits" else cols[c].split(".")[-1]
        if kind not in checked or checked[kind] >= 2:
            continue
        checked[kind] += 1
        atp = float(S[r, c])
        deriv = _exact_edge(m, cb, xb, ld, rows[r], cols[c], eps=1e-3) / 1e-3
        assert abs(atp - deriv) <= 0.02 * abs(atp) + 1e-3, (rows[r], cols[c], atp, deriv)
        if kind == "logits":
            full = _exact_edge(m, cb, xb, ld, rows[r], cols[c])
            assert abs(atp - full) <= 0.2 * abs(full) + 0.01, (rows[r], cols[c], atp, full)
        if all(v >= 1 for v in checked.values()) and sum(checked.values()) >= 6:
            break
    assert checked["k"] >= 1 and checked["v"] >= 1 and checked["logits"] >= 1


# ------------------------------------------------------------------------------------ results & bad input
def test_results_labels_and_roundtrip(tiny_llama, tmp_path):
    m = tiny_llama
    r = attribute(m, CLEAN, CORR, _ld(m), per_position_heads=True, progress=False)
    assert set(r) == {"resid", "heads", "neurons", "sublayers", "heads_pos"}
    res = r["resid"]
    assert res.kind == "resid_pos" and res.axes == ("layer", "position")
    assert res.labels["position"][-1] == m.to_str_tokens(m.encode(CLEAN[:1]))[-1]  # t* token of the first row
    assert r["heads_pos"].shape == (m.n_layers, m.n_heads, res.shape[1])
    assert torch.allclose(r["heads_pos"].scores.sum(-1), r["heads"].scores, atol=1e-5)
    assert r["sublayers"].labels["sublayer"] == ["attn", "mlp"]
    assert "stderr" in res.extra and res.meta["method"] == "atp" and res.meta["metric"] == "logit_diff"
    assert res.meta["inputs_hash"] and res.meta["model"] == m.name
    p = r["heads"].save(tmp_path / "heads")
    back = Result.load(p, model=m)
    assert torch.equal(back.scores, r["heads"].scores) and back.meta["method"] == "atp"
    df = r["neurons"].to_dataframe()
    assert len(df) == m.n_layers * m.d_mlp and "stderr" in df


def test_bad_attribution_input(tiny_llama, monkeypatch):
    m = tiny_llama
    ld = _ld(m)
    with pytest.raises(InputError, match="align='right'"):
        attribute(m, ["I am glad"], ["I am very sad"], ld, chat=False, progress=False)
    r = attribute(m, ["I am glad"], ["I am very sad"], ld, chat=False, align="right", nodes="resid", progress=False)
    assert r["resid"].shape[1] == len(m.encode(["I am very sad"], chat=False).input_ids[0])
    with pytest.raises(InputError):
        attribute(m, CLEAN, CORR[:1], ld, progress=False)
    with pytest.raises(MetricError, match="scalar"):
        attribute(m, CLEAN, CORR, lambda lg: lg[:, -1, 0].mean(), progress=False)
    with pytest.raises(MetricError, match="NaN"):
        attribute(m, CLEAN, CORR, lambda lg: lg[:, -1, 0] * float("nan"), progress=False)
    with pytest.raises(InputError, match="method"):
        attribute(m, CLEAN, CORR, ld, method="magic", progress=False)
    with pytest.raises(InputError, match="node group"):
        attribute(m, CLEAN, CORR, ld, nodes="layers", progress=False)
    with pytest.raises(InputError, match="logits"):
        attribute(m, CLEAN, CORR, projection(resid(2), _v(m)), nodes="edges", progress=False)
    monkeypatch.setattr(m.bridge.cfg, "parallel_attn_mlp", True, raising=False)
    with pytest.raises(InputError, match="parallel"):
        attribute(m, CLEAN, CORR, ld, nodes="edges", progress=False)


def test_chunking_padding_and_normalisation(tiny_llama):
    m = tiny_llama
    clean = ["I am glad", "The cat sat on it", "Hi"]
    corr = ["I am sad!", "The dog sat on it", "Yo"]
    ld = _ld(m)
    one = attribute(m, clean, corr, ld, nodes=("resid", "heads"), batch_size=1, progress=False)
    all_ = attribute(m, clean, corr, ld, nodes=("resid", "heads"), batch_size=8, progress=False)
    for k in one:
        assert torch.allclose(one[k].scores, all_[k].scores, atol=1e-5)
    singles = [attribute(m, [a], [b], ld, nodes="resid", progress=False)["resid"] for a, b in zip(clean, corr)]
    # positions are aligned on t*: the last column is t* for every pair
    assert abs(float(all_["resid"].scores[1, -1] - sum(s.scores[1, -1] for s in singles) / 3)) < 1e-5
    norm = attribute(m, clean, corr, ld, nodes="heads", normalize=True, progress=False)["heads"]
    gap = all_["heads"].meta["clean_metric"] - all_["heads"].meta["corrupted_metric"]
    assert torch.allclose(norm.scores, all_["heads"].scores / gap, atol=1e-5) and norm.meta["normalized"]


@pytest.mark.integration
def test_embedded_model_edges_and_tl_parity(smol):
    """SmolLM2 (GQA 9 query / 3 KV heads): edges sum to node scores; heads match TransformerLens."""
    from transformer_lens.tools.analysis import EdgeAttributionConfig, attribution_patch

    m = smol
    clean, corr = ["I feel so happy today."], ["I feel so sad today."]
    cb, xb = m.encode(clean, chat=False), m.encode(corr, chat=False)
    assert cb.input_ids.shape == xb.input_ids.shape
    ld = logit_diff(m, " I", " It")
    r = attribute(m, cb, xb, ld, nodes=("heads", "sublayers", "edges"), progress=False)
    E, rows = r["edges"].scores, r["edges"].labels["row"]
    for L, h in ((3, 0), (17, 8), (29, 4)):
        assert abs(float(torch.nansum(E[rows.index(f"a{L}.h{h}")]) - r["heads"].scores[L, h])) < 1e-4
    assert abs(float(torch.nansum(E[rows.index("m12")]) - r["sublayers"].scores[12, 1])) < 1e-4
    tl = attribution_patch(m.bridge, cb.input_ids, xb.input_ids, lambda lg: ld(lg, xb, {}).sum(),
                           EdgeAttributionConfig(granularity="node"))
    heads = torch.zeros(m.n_layers, m.n_heads)
    for node, s in tl.node_scores.items():
        if node.kind == "attn_head_out":
            heads[node.layer, node.head] += s
    assert (r["heads"].scores - heads).abs().max() < 1e-4
