"""Exact batched patching: parity with transformer_lens.patching, with independent full-forward
patches through the engine, batching invariance, the resume-from-layer engine path, verify()."""

from __future__ import annotations

import pytest
import torch

from emolens import Site, resid
from emolens.attribution import attribute, prepare_pairs, tile_batch
from emolens.capture import run_with_cache
from emolens.errors import InputError, MetricError
from emolens.interventions import HookPlan, Reader, Replace, Zero
from emolens.metrics import continuation_logprob_diff, logit_diff, projection
from emolens.patching import patch, verify

CLEAN = ["I am glad", "A cat sat"]  # equal lengths: TransformerLens references run unpadded
CORR = ["I am sad!", "A dog sat"]


def _setup(m):
    cb, xb = m.encode(CLEAN, chat=False), m.encode(CORR, chat=False)
    ld = logit_diff(m, "a", "b")
    return cb, xb, ld


def _tl_metric(ld, xb):
    return lambda logits: ld(logits, xb, {}).mean()


def test_heads_and_resid_equal_transformerlens_patching(tiny):
    from transformer_lens import patching as tlp

    m = tiny
    cb, xb, ld = _setup(m)
    _, clean_cache = m.bridge.run_with_cache(cb.input_ids)
    base = float(ld(m.forward(xb), xb, {}).mean())
    heads = patch(m, cb, xb, ld, nodes="heads", progress=False)
    ref = tlp.get_act_patch_attn_head_out_all_pos(m.bridge, xb.input_ids, clean_cache, _tl_metric(ld, xb))
    assert (heads.scores - (ref - base)).abs().max() <= 1e-4
    assert heads.scores.abs().max() > 1e-3
    res = patch(m, cb, xb, ld, nodes="resid", progress=False)
    ref = tlp.get_act_patch_resid_pre(m.bridge, xb.input_ids, clean_cache, _tl_metric(ld, xb))
    assert res.shape == tuple(ref.shape)
    assert (res.scores - (ref - base)).abs().max() <= 1e-4


def test_heads_by_position_equal_transformerlens(tiny_llama):
    from transformer_lens import patching as tlp

    m = tiny_llama
    ld = logit_diff(m, "a", "b")
    cb, xb = m.encode(["glad"], chat=False), m.encode(["sad!"], chat=False)  # short: TL runs one pass per cell
    _, clean_cache = m.bridge.run_with_cache(cb.input_ids)
    base = float(ld(m.forward(xb), xb, {}).mean())
    ours = patch(m, cb, xb, ld, nodes="heads_pos", batch_size=40, progress=False)
    ref = tlp.get_act_patch_attn_head_out_by_pos(m.bridge, xb.input_ids, clean_cache, _tl_metric(ld, xb))
    assert ours.axes == ("layer", "head", "position")
    assert (ours.scores - (ref - base).permute(0, 2, 1)).abs().max() <= 1e-4


def _full_forward_effect(m, xb, metric, ivs):
    """M(corrupted with ivs) - M(corrupted), one ordinary full forward each (no resume-from-layer)."""
    sites = [Site(s.kind, s.layer) for s in metric.sites] or [Site("resid_pre", 0)]
    lg0, c0 = run_with_cache(m, xb, sites)
    lg1, c1 = run_with_cache(m, xb, sites, interventions=ivs)
    return float((metric.per_prompt(metric(lg1, xb, c1)) - metric.per_prompt(metric(lg0, xb, c0))).mean())


def test_sublayers_and_neurons_equal_full_forward_patches(tiny):
    m = tiny
    cb, xb, ld = _setup(m)
    met = projection(resid(3), torch.randn(m.d_model, generator=torch.Generator().manual_seed(0)))
    _, cc = run_with_cache(m, cb, [Site("attn_out", 1), Site("mlp_out", 2), Site("neuron", 1)])
    _, xc = run_with_cache(m, xb, [Site("neuron", 1)])
    sub = patch(m, cb, xb, met, nodes="sublayers", progress=False)
    for L, name, hook in ((1, "attn_out", "blocks.1.hook_attn_out"), (2, "mlp_out", "blocks.2.hook_mlp_out")):
        want = _full_forward_effect(m, xb, met, [Replace(Site(name, L), cc[hook])])
        assert abs(float(sub.scores[L, 0 if name == "attn_out" else 1]) - want) < 1e-5
    cand = [(1, 3), (1, 77), (3, 5)]
    neu = patch(m, cb, xb, met, nodes="neurons", candidates=cand, batch_size=4, progress=False)
    assert int(neu.extra["patched"].sum()) == 3 and torch.isnan(neu.scores[0, 0])
    src = xc["blocks.1.mlp.hook_post"].clone()
    src[:, :, 77] = cc["blocks.1.mlp.hook_post"][:, :, 77]
    want = _full_forward_effect(m, xb, met, [Replace(Site("neuron", 1), src)])
    assert abs(float(neu.scores[1, 77]) - want) < 1e-5
    _, xc3 = run_with_cache(m, xb, [Site("neuron", 3)])
    _, cc3 = run_with_cache(m, cb, [Site("neuron", 3)])
    src = xc3["blocks.3.mlp.hook_post"].clone()
    src[:, :, 5] = cc3["blocks.3.mlp.hook_post"][:, :, 5]
    want = _full_forward_effect(m, xb, met, [Replace(Site("neuron", 3), src)])
    assert abs(float(neu.scores[3, 5]) - want) < 1e-5


def test_batching_and_padding_do_not_change_values(tiny_llama):
    m = tiny_llama
    clean = ["I am glad", "The cat sat on it", "Hi"]
    corr = ["I am sad!", "The dog sat on it", "Yo"]
    ld = logit_diff(m, "a", "b")
    big = patch(m, clean, corr, ld, nodes="heads", batch_size=64, progress=False)
    small = patch(m, clean, corr, ld, nodes="heads", batch_size=1, progress=False)
    assert torch.allclose(big.scores, small.scores, atol=1e-5)
    full = patch(m, clean, corr, ld, nodes="heads", skip_prefix=False, progress=False)
    assert big.meta["shared_prefix_skipped"][0] > 0 and full.meta["shared_prefix_skipped"] == [0]
    assert torch.allclose(big.scores, full.scores, atol=1e-5)
    singles = torch.stack([patch(m, [a], [b], ld, nodes="heads", progress=False).scores for a, b in zip(clean, corr)])
    assert torch.allclose(big.scores, singles.mean(0), atol=1e-5)
    assert torch.allclose(big.extra["stderr"], singles.std(0) / 3 ** 0.5, atol=1e-5)


def test_resume_from_layer_equals_full_forward(tiny):
    m = tiny
    b = m.encode(CLEAN + ["Hi"])
    cache = {}
    readers = [Reader(Site("resid_pre", L), (lambda L: lambda v, s, t: cache.__setitem__(L, v))(L))
               for L in range(m.n_layers)]
    readers.append(Reader(Site("resid_post", m.n_layers - 1), lambda v, s, t: cache.__setitem__(m.n_layers, v)))
    plan = HookPlan(m, [], readers)
    with plan.hooks(), torch.no_grad():
        full = plan.forward(b)
    zero = Zero(Site("head", m.n_layers - 1, 1), rows=(3, 4, 5))  # only the second copy
    plan2 = HookPlan(m, [zero])
    want = m.forward(b, interventions=[Zero(Site("head", m.n_layers - 1, 1))])
    for L in range(m.n_layers + 1):
        with plan2.hooks(), torch.no_grad():
            out = plan2.forward_from(L, cache[L].repeat(2, 1, 1), tile_batch(b, 2))
        assert torch.allclose(out[:3], full, atol=1e-5)
        # the zeroed head is in the last block: starting after it (L = n_layers) skips it
        assert torch.allclose(out[3:], want if L < m.n_layers else full, atol=1e-5)


def test_continuation_metric_with_uneven_replies(tiny_llama):
    """Rows with replies of different token length: positions are aligned on t*."""
    m = tiny_llama
    met = continuation_logprob_diff(m, " yes", " no way")
    clean, corr = ["I am glad", "A cat sat"], ["I am sad!", "A dog sat"]
    res = patch(m, clean, corr, met, nodes="resid", candidates=[(1, j) for j in range(3, 14)], progress=False)
    pairs = prepare_pairs(m, clean, corr, met)
    ch = pairs.chunk(range(2))
    _, cc = run_with_cache(m, ch.clean, [Site("resid_pre", 1)])
    _, xc = run_with_cache(m, ch.corr, [Site("resid_pre", 1)])
    for j in (5, 9, 13):
        src = torch.where((ch.aligned == j)[..., None], cc["blocks.1.hook_resid_pre"], xc["blocks.1.hook_resid_pre"])
        want = _full_forward_effect(m, ch.corr, met, [Replace(Site("resid_pre", 1), src)])
        assert abs(float(res.scores[1, j]) - want) < 1e-5
    assert res.labels["position"][pairs.p_max - 1] == m.to_str_tokens(m.encode(clean[:1]))[-1]


def test_verify_reports_agreement(tiny_llama):
    m = tiny_llama
    cb, xb, ld = _setup(m)
    att = attribute(m, cb, xb, ld, nodes="heads", progress=False)["heads"]
    out = verify(m, att, cb, xb, ld, k=4, n_control=4, progress=False)
    assert set(out) >= {"spearman", "pearson", "topk_overlap", "exact"}
    assert out["n_cells"] == 8 and 0.0 <= out["topk_overlap"] <= 1.0
    full = patch(m, cb, xb, ld, nodes="heads", progress=False)
    for c, e in zip(out["cells"], out["exact_values"]):
        assert abs(float(full.scores[c]) - float(e)) < 1e-5
    top = torch.argsort(att.scores.abs().flatten(), descending=True)[:4]
    assert {tuple(int(x) for x in torch.unravel_index(i, att.shape)) for i in top} <= set(out["cells"])
    assert -1.0 <= out["spearman"] <= 1.0
    with pytest.raises(InputError):
        verify(m, att, cb, xb, ld, k=17, progress=False)


def test_bad_patching_input(tiny_llama):
    m = tiny_llama
    cb, xb, ld = _setup(m)
    with pytest.raises(InputError, match="nodes"):
        patch(m, cb, xb, ld, nodes="edges", progress=False)
    with pytest.raises(InputError, match="outside"):
        patch(m, cb, xb, ld, nodes="heads", candidates=[(0, 9)], progress=False)
    with pytest.raises(InputError, match="align"):
        patch(m, ["I am glad"], ["I am so sad"], ld, chat=False, progress=False)
    with pytest.raises(MetricError):
        patch(m, cb, xb, lambda lg: lg[:, -1, 0] * float("inf"), nodes="heads", progress=False)
