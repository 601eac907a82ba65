"""Capture, exact patching and attribution on SDPA (plain transformers modules) vs eager (the bridge).

Reference: the eager bridge path (``attn="eager"``), which the rest of the suite checks against
TransformerLens's own helpers (tests/test_patching.py, tests/test_attribution.py now run the
default ``attn="auto"``, i.e. SDPA). Here: the same calls with ``attn="auto"`` must (1) really run
on the plain modules (the bridge's attention is never called) and (2) give the eager values to
fp32 rounding; plans that read attention patterns must run eager automatically, and ``"sdpa"``
must refuse them by name.
"""

from __future__ import annotations

import pytest
import torch

from emolens import Pos, attn_out, head, mlp_out, neuron, resid
from emolens.attribution import attribute
from emolens.capture import capture, run_with_cache
from emolens.errors import InterventionError
from emolens.interventions import Add, HookPlan, HookReader, Reader, Zero
from emolens.metrics import logit_diff
from emolens.patching import patch

CLEAN = ["I am glad to see you here today", "A cat sat on the mat by the door"]
CORR = ["I am grim to see you here today", "A dog sat on the mat by the door"]


class _BridgeAttnCalls:
    """Counts calls of the bridge's attention modules (eager path) while active."""

    def __init__(self, m):
        self.m, self.n, self.h = m, 0, []

    def __enter__(self):
        for blk in self.m.bridge.blocks:
            self.h.append(blk.attn.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1)))
        return self

    def __exit__(self, *exc):
        for h in self.h:
            h.remove()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    assert a.shape == b.shape
    scale = 1.0 + float(b.abs().max())
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max())


def test_plan_picks_sdpa_unless_a_hook_needs_eager(tiny):
    m = tiny
    batch = m.encode(CLEAN)
    plan = HookPlan(m, [], [Reader(resid(1), lambda *a: None)], attn="auto")
    with plan.hooks():
        assert plan.runs_sdpa
    seen = []
    pat = HookReader("blocks.1.attn.hook_pattern", lambda act, tr: seen.append(act.shape))
    plan = HookPlan(m, [], [pat], attn="auto")
    with plan.hooks(), torch.no_grad():
        assert not plan.runs_sdpa
        plan.forward(batch)
    T = batch.input_ids.shape[1]
    assert seen == [torch.Size([2, m.n_heads, T, T])]  # never silently empty
    with pytest.raises(InterventionError, match="hook_pattern.*attn='auto'"):
        with HookPlan(m, [], [pat], attn="sdpa").hooks():
            pass
    with pytest.raises(InterventionError, match="attn="):
        HookPlan(m, [], [], attn="flash")
    # raw per-head hooks have the bridge's shape on the plain modules
    got = {}
    for a in ("eager", "auto"):
        q = HookReader("blocks.1.attn.hook_q", lambda act, tr, a=a: got.__setitem__(a, act))
        plan = HookPlan(m, [], [q], attn=a)
        with plan.hooks(), torch.no_grad():
            assert plan.runs_sdpa == (a == "auto")
            plan.forward(batch)
    assert got["auto"].shape == (2, T, m.n_heads, m.d_head)
    real = batch.attention_mask.bool()  # padded positions (fully masked rows) differ and are never read
    _close(got["auto"][real], got["eager"][real])


def test_capture_sdpa_equals_eager(tiny):
    m = tiny
    sites = [resid(0, "pre"), resid(1, "mid"), resid(2), attn_out(1), mlp_out(2), head(1), neuron(2, (0, 3, 5))]
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    ivs = [Add(resid(0), v * 2.0), Zero(head(1, 0))]
    out = {}
    for a in ("eager", "auto"):
        with _BridgeAttnCalls(m) as calls:
            out[a] = capture(m, CLEAN + CORR, sites, pos=Pos.all(), reduce="mean", batch_size=3, chat=False,
                             interventions=ivs, progress=False, attn=a)
        assert (calls.n == 0) == (a == "auto")
    for k in out["eager"].data:
        _close(out["auto"][k], out["eager"][k])
    for a in ("eager", "auto"):
        out[a] = run_with_cache(m, CLEAN, sites, chat=False, attn=a)
    real = m.encode(CLEAN, chat=False).attention_mask.bool()
    _close(out["auto"][0][real], out["eager"][0][real])
    for k in out["eager"][1]:
        _close(out["auto"][1][k][real], out["eager"][1][k][real])


@pytest.mark.parametrize("nodes", ["resid", "heads", "heads_pos", "neurons", "sublayers"])
def test_patching_sdpa_equals_eager(tiny, nodes):
    m = tiny
    ld = logit_diff(m, "a", "b")
    cb, xb = m.encode(CLEAN, chat=False), m.encode(CORR, chat=False)
    cand = None if nodes != "neurons" else [(L, n) for L in range(m.n_layers) for n in (0, 7, 31)]
    res = {}
    for a in ("eager", "auto"):
        with _BridgeAttnCalls(m) as calls:
            res[a] = patch(m, cb, xb, ld, nodes=nodes, candidates=cand, batch_size=16, progress=False, attn=a)
        assert (calls.n == 0) == (a == "auto")
    assert res["auto"].meta["shared_prefix_skipped"] == res["eager"].meta["shared_prefix_skipped"]
    assert max(res["auto"].meta["shared_prefix_skipped"]) > 0  # the KV-prefix path ran
    ok = res["eager"].extra["patched"] > 0
    assert res["eager"].scores[ok].abs().max() > 1e-3
    _close(res["auto"].scores[ok], res["eager"].scores[ok])


def test_attribution_sdpa_where_the_method_allows(tiny):
    m = tiny
    ld = logit_diff(m, "a", "b")
    cb, xb = m.encode(CLEAN, chat=False), m.encode(CORR, chat=False)
    runs = [dict(nodes=("resid", "heads", "neurons", "sublayers", "q", "k", "v"), method="atp"),
            dict(nodes=("heads", "sublayers"), method="atp*"),  # GradDrop only: no pattern read
            dict(nodes=("resid",), method="ig", ig_steps=3),
            dict(nodes=("q", "k"), method="atp*")]  # the QK fix reads hook_pattern → eager
    for kw in runs:
        res = {}
        for a in ("eager", "auto"):
            with _BridgeAttnCalls(m) as calls:
                res[a] = attribute(m, cb, xb, ld, progress=False, attn=a, **kw)
            needs_eager = kw["method"] == "atp*" and "q" in kw["nodes"]
            assert (calls.n == 0) == (a == "auto" and not needs_eager), kw
            assert next(iter(res[a].values())).meta["attn"] == ("sdpa" if calls.n == 0 else "eager")
        for g in res["eager"]:
            assert res["eager"][g].scores.abs().max() > 1e-4
            _close(res["auto"][g].scores, res["eager"][g].scores, 5e-5)
    with pytest.raises(InterventionError, match="attn='sdpa' cannot"):
        attribute(m, cb, xb, ld, nodes=("q",), method="atp*", progress=False, attn="sdpa")


def test_edges_sdpa_equal_eager(tiny):
    m = tiny
    ld = logit_diff(m, "a", "b")
    cb, xb = m.encode(CLEAN, chat=False), m.encode(CORR, chat=False)
    res = {a: attribute(m, cb, xb, ld, nodes=("edges",), progress=False, attn=a)["edges"] for a in ("eager", "auto")}
    assert res["auto"].meta["attn"] == "sdpa"
    ok = torch.isfinite(res["eager"].scores)
    _close(res["auto"].scores[ok], res["eager"].scores[ok], 5e-5)


def test_embedded_model_sdpa_equals_eager_on_a_long_prompt(smol):
    """SmolLM2 on a 122-token pair that differs near the end (long shared prefix): capture, patching, attribution."""
    m = smol
    text = ("The weather report said it would be sunny all week, so we planned a long walk along the river "
            "and a picnic in the park with friends. ") * 4
    clean, corr = [text + "I feel so happy today."], [text + "I feel so sad today."]
    cb, xb = m.encode(clean, chat=False), m.encode(corr, chat=False)
    assert cb.input_ids.shape == xb.input_ids.shape and cb.input_ids.shape[1] > 100
    ld = logit_diff(m, " I", " It")
    got = {}
    for a in ("eager", "auto"):
        with _BridgeAttnCalls(m) as calls:
            got[a] = (capture(m, clean, [resid(20), head(10)], pos=Pos.all(), chat=False, progress=False, attn=a),
                      patch(m, cb, xb, ld, nodes="heads", candidates=[(L, h) for L in (5, 20, 29) for h in range(9)],
                            progress=False, attn=a),
                      attribute(m, cb, xb, ld, nodes=("heads", "sublayers"), progress=False, attn=a))
        assert (calls.n == 0) == (a == "auto")
    (ce, pe, ae), (cs, ps, as_) = got["eager"], got["auto"]
    for k in ce.data:
        _close(cs[k], ce[k], 1e-4)
    ok = pe.extra["patched"] > 0
    _close(ps.scores[ok], pe.scores[ok], 1e-4)
    for g in ae:
        _close(as_[g].scores, ae[g].scores, 1e-4)
