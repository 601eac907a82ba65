"""Paper 2 circuit methods (emolens.circuits) on tiny models and hand-built inputs."""

from __future__ import annotations

import json

import pytest
import torch

import emolens
from emolens import Pos, Site, capture, mlp_out, resid
from emolens.circuits import (EMOTIONS, Circuit, EmotionSums, allocate, assemble_circuit, collect_sev_stats,
                              component_curve, curve_ratio, difference_vectors, direction_cosines, emo_prompts,
                              emotion_directions, group_mean_directions, head_scores, head_scores_from_stats,
                              head_scores_masked, layer_direction, layers_from_fraction, local_directions,
                              modulation_interventions, neu_prompts, neuron_scores, neuron_scores_from_stats,
                              reference_direction, sev_items, sigma, steering_interventions, sublayer_influence)
from emolens.circuits import _model
from emolens.circuits.prompts import check_emotions, p_emo, p_neu
from emolens.errors import DataError, InputError, ResultError
from emolens.interventions import Add, Reader, run

from conftest import get_model

RECORDS = [
    {"theme": "work", "skeleton_id": f"w{i}", "scenario": f"I sent the report number {i} to my manager.",
     "event": {"positive": f"She praised report {i}.", "neutral": f"She will read report {i} on Monday.",
               "negative": f"She said report {i} must be redone tonight."}}
    for i in range(3)
]



def _setup(model, n_records=2):
    items = sev_items(RECORDS[:n_records])
    ps = emo_prompts(items)
    stats = collect_sev_stats(model, ps, progress=False)
    return items, ps, stats, emotion_directions(stats)


# ----------------------------------------------------------------------------------------- prompts / bad input
def test_prompts_match_the_paper_and_t_star_is_last_token(tiny_llama):
    it = sev_items(RECORDS[:1])[0]
    msgs = p_emo(it, "fear")
    assert msgs[0]["content"] == "Always reply in fear.\nKeep the reply to at most two sentences."
    assert msgs[1]["content"] == f"{it.scenario}\n{it.event}"
    assert p_neu(it)[0]["content"] == "Keep the reply to at most two sentences."
    b = tiny_llama.encode([msgs])
    # t* = the last token of the templated prompt (the generation prompt), i.e. Pos.last()
    assert int(b.last_prompt_index[0]) == b.input_ids.shape[1] - 1
    assert tiny_llama.to_str_tokens(b)[-1] == "\n" and b.texts[0].endswith("assistant\n")


def test_bad_sev_records_and_emotion_names():
    bad = [dict(RECORDS[0], event={"positive": "x", "negative": "y"})]
    with pytest.raises(DataError, match="neutral"):
        sev_items(bad)
    with pytest.raises(DataError, match="lacks"):
        sev_items([{"theme": "t", "scenario": "s", "skeleton_id": "a"}])
    with pytest.raises(DataError, match="repeated"):
        sev_items([RECORDS[0], RECORDS[0]])
    assert len(sev_items(bad, valences=["positive", "negative"])) == 2
    with pytest.raises(InputError, match="joy"):
        check_emotions(["joy"])
    with pytest.raises(InputError, match="Unknown emotion"):
        emo_prompts(sev_items(RECORDS[:1]), ["anger", "rage"])


# ----------------------------------------------------------------------------------------- directions
def test_planted_offsets_are_recovered_and_context_cancels_exactly():
    g = torch.Generator().manual_seed(0)
    G, E, D = 40, 6, 32
    offsets = torch.randn(E, D, generator=g)
    offsets -= offsets.mean(0)  # only the centred offsets are identifiable
    context = 25 * torch.randn(G, 1, D, generator=g)  # large shared context per group
    noise = 0.05 * torch.randn(G, E, D, generator=g)
    acts = context + offsets + noise
    dirs, cent = group_mean_directions(acts)
    cos = torch.nn.functional.cosine_similarity(dirs, offsets, dim=-1)
    assert cos.min() > 0.99
    # shared context cancels exactly: another context gives the same centroids (to float64 rounding)
    _, cent2 = group_mean_directions(noise + offsets + 1000 * torch.randn(G, 1, D, generator=g))
    _, cent0 = group_mean_directions(noise + offsets)
    assert torch.allclose(cent2.double(), cent0.double(), atol=1e-4)
    # the streaming accumulator (per-emotion sums only) equals the dense recipe
    acc = EmotionSums(E)
    flat = acts.reshape(G * E, D)
    e_idx = torch.arange(E).repeat(G)
    for s in range(0, G * E, 37):
        acc.add(e_idx[s:s + 37], flat[s:s + 37])
    assert torch.allclose(acc.directions(), dirs, atol=1e-5)
    assert acc.sum.shape == (E, D)  # O(emotions), not O(samples)


def test_streaming_directions_equal_dense_reference(tiny, tmp_path):
    items, ps, stats, dirs = _setup(tiny)
    L = tiny.n_layers
    sites = [resid(l, "mid") for l in range(L)] + [resid(l, "post") for l in range(L)]
    # the same forward as the streaming code (circuits run the bridge's eager attention), so the two
    # reductions are compared, not SDPA-vs-eager rounding of the difference of group means
    cap = capture(tiny, ps.prompts, sites, reduce="none", progress=False, attn="eager")
    G, E = len(items), len(EMOTIONS)
    fn = _model.final_norm(tiny)
    for l in range(L):
        ref_mid = group_mean_directions(cap[f"resid_mid.{l}"].reshape(G, E, -1))[0]
        post = cap[f"resid_post.{l}"]
        if l == L - 1:  # the last MLP state is read after the final norm (HF hidden_states[-1])
            with torch.no_grad():
                post = fn(post)
        ref_post = group_mean_directions(post.reshape(G, E, -1))[0]
        assert torch.allclose(dirs.scores[:, l, 0], ref_mid, atol=1e-5)
        assert torch.allclose(dirs.scores[:, l, 1], ref_post, atol=1e-5)
    assert torch.allclose(dirs.scores.norm(dim=-1), torch.ones(E, L, 2), atol=1e-5)
    assert stats.n_groups == G
    stats.save(tmp_path / "stats")
    again = type(stats).load(tmp_path / "stats")
    assert torch.equal(emotion_directions(again).scores, dirs.scores) and again.emotions == stats.emotions
    # sigma = mean RMS of the states at t*
    rms_mid = cap[f"resid_mid.{1}"].pow(2).mean(-1).sqrt().mean()
    assert abs(float(sigma(stats).scores[1, 0]) - float(rms_mid)) < 1e-5
    cos = direction_cosines(dirs, "anger")
    assert cos.shape == (2 * L, 2 * L) and torch.allclose(cos.scores.diag(), torch.ones(2 * L), atol=1e-5)


def test_acceptance_filter_keeps_only_complete_groups(tiny_llama):
    items = sev_items(RECORDS[:2])
    ps = emo_prompts(items)
    accepted = {k: True for k in ps.keys}
    accepted[(items[0].skeleton_id, items[0].valence, "fear")] = False  # group 0 incomplete
    stats = collect_sev_stats(tiny_llama, ps, accepted=accepted, progress=False)
    assert stats.n_groups == len(items) - 1
    assert int(stats.n_all[EMOTIONS.index("fear")]) == len(items) - 1
    assert int(stats.n_all[EMOTIONS.index("anger")]) == len(items)
    # directions come from complete groups only
    keep = [i for i, k in enumerate(ps.keys) if (k[0], k[1]) != items[0].group]
    ref = collect_sev_stats(tiny_llama, ps.subset(keep), progress=False)
    assert torch.allclose(emotion_directions(stats).scores, emotion_directions(ref).scores, atol=1e-6)


def test_difference_vectors_are_group_mean_subtracted(tiny_llama):
    items, ps, stats, _ = _setup(tiny_llama)
    dm, dz = difference_vectors(stats)
    cap = capture(tiny_llama, ps.prompts, [Site("neuron", 2), Site("head", 1)], reduce="none", progress=False)
    G, E = len(items), len(EMOTIONS)
    a = cap["neuron.2"].reshape(G, E, -1).double()
    ref = (a - a.mean(1, keepdim=True)).mean(0)
    assert torch.allclose(dm.scores[:, 2], ref.float(), atol=1e-5)
    z = cap["head.1"].reshape(G, E, tiny_llama.n_heads, -1).double()
    assert torch.allclose(dz.scores[:, 1], (z - z.mean(1, keepdim=True)).mean(0).float(), atol=1e-5)


# ----------------------------------------------------------------------------------------- components
def test_closed_form_head_scores_equal_masked_passes(tiny):
    items, ps, stats, dirs = _setup(tiny)
    prompts = ps.where("sadness").prompts
    v = layer_direction(dirs, "sadness", "attn")
    fast = head_scores(tiny, prompts, v)
    slow = head_scores_masked(tiny, prompts, v)
    assert fast.scores.abs().max() > 1e-3  # not trivially zero
    assert torch.allclose(fast.scores, slow.scores, atol=1e-4)
    assert torch.allclose(fast.extra["std_importance"], slow.extra["std_importance"], atol=1e-4)
    if all(_model.post_attn_norm(tiny, l) is None for l in range(tiny.n_layers)):
        st = head_scores_from_stats(tiny, stats, dirs, "sadness")
        assert torch.allclose(st.scores, fast.scores, atol=1e-5)
        assert torch.allclose(st.extra["std_importance"], fast.extra["std_importance"], atol=1e-4)
    else:
        with pytest.raises(InputError, match="not linear"):
            head_scores_from_stats(tiny, stats, dirs, "sadness")


def test_neuron_scores_decompose_the_mlp_write_exactly(tiny):
    items, ps, stats, dirs = _setup(tiny)
    e = "happiness"
    prompts = ps.where(e).prompts
    v = layer_direction(dirs, e, "mlp")
    fast = neuron_scores_from_stats(tiny, stats, dirs, e)
    ref = neuron_scores(tiny, prompts, v)
    for k in ("C_pos", "C_neg", "H_mean"):
        assert torch.allclose(fast.extra[k], ref.extra[k], atol=1e-5)
    assert torch.allclose(fast.scores, ref.scores, atol=1e-5)
    assert torch.allclose(fast.scores, fast.extra["C_pos"] - fast.extra["C_neg"], atol=1e-5)
    out = capture(tiny, prompts, [mlp_out(l) for l in range(tiny.n_layers)], reduce="mean", progress=False)
    for l in range(tiny.n_layers):  # sum_n c_n = mlp_out . v (also through Gemma's post-MLP norm)
        assert abs(float(out[f"mlp_out.{l}"] @ v[l]) - float(fast.scores[l].sum())) < 1e-4


def test_top_k_ablation_curve_is_exact_and_beats_random(tiny_llama):
    items, ps, stats, dirs = _setup(tiny_llama)
    e = "anger"
    sc = neuron_scores_from_stats(tiny_llama, stats, dirs, e)
    v = layer_direction(dirs, e, "mlp")
    c = component_curve(tiny_llama, ps.where(e).prompts, sc, v, kind="neuron", layer=2, ks=[0, 1, 2, 4],
                        n_random=3, n_boot=200)
    want = -torch.cumsum(torch.sort(sc.scores[2], descending=True).values, 0)
    assert float(c["top"].scores[0]) == 0.0
    assert torch.allclose(c["top"].scores[1:], want[[0, 1, 3]], atol=1e-4)  # linear in the ablated activations
    assert (c["top"].extra["ci_low"] <= c["top"].scores + 1e-6).all()
    assert curve_ratio(c, 4) > 3
    hs = head_scores(tiny_llama, ps.where(e).prompts, layer_direction(dirs, e, "attn"))
    ch = component_curve(tiny_llama, ps.where(e).prompts, hs, layer_direction(dirs, e, "attn"), kind="head",
                         layer=1, ks=[0, 1], n_random=2, n_boot=100)
    assert abs(float(ch["top"].scores[1]) + float(hs.scores[1].max())) < 1e-4
    dm, _ = difference_vectors(stats)
    enh = component_curve(tiny_llama, ps.where(e).prompts, sc, v, kind="neuron", layer=2, mode="enhance",
                          payload=dm.scores[0, 2], scale=2.0, ks=[0, 3], n_random=1, n_boot=50)
    top3 = torch.sort(sc.scores[2], descending=True).indices[:3]
    expect = 2.0 * float((dm.scores[0, 2, top3] * sc.extra["beta"][2, top3]).sum())
    assert abs(float(enh["top"].scores[1]) - expect) < 1e-4


# ----------------------------------------------------------------------------------------- influence
def run_state(model, batch, reader, got):
    run(model, batch, readers=[reader])
    return got["v"]


def test_prefix_stepper_matches_full_forward(tiny):
    b = tiny.encode(["a short prompt", "a somewhat longer prompt here"])
    got = {}

    def rd(values, sel, tracker):
        got["v"] = values[sel].clone()

    iv = Add(mlp_out(1), torch.ones(tiny.d_model), strength=0.3, pos=Pos.last())
    reader = Reader(resid(tiny.n_layers - 1), rd, Pos.last())
    st = _model.PrefixStepper(tiny, b)
    for _ in range(2):  # repeated steps reuse the cached prefix
        logits = st.step([iv], [reader])
    # repeated rows carry different interventions in one step; a stop layer skips the rest
    rep = _model.PrefixStepper(tiny, b, stop_layer=1, repeats=3)
    seen = {}

    def rd1(values, sel, tracker):
        seen["v"] = values[sel].clone()
    r1 = Reader(resid(1), rd1, Pos.last())
    out = rep.step([Add(mlp_out(1), torch.ones(tiny.d_model), strength=0.3, pos=Pos.last(), rows=rep.block(2))],
                   rep.readers([r1]))
    assert out is None  # stopped after layer 1
    stepped_rep = seen["v"].reshape(2, 3, -1)
    run(tiny, b, interventions=[iv], readers=[r1])
    want_iv = seen["v"]
    run(tiny, b, readers=[r1])
    want_base = seen["v"]
    assert torch.allclose(stepped_rep[:, 2], want_iv, atol=1e-5)
    assert torch.allclose(stepped_rep[:, 0], want_base, atol=1e-5)
    assert torch.allclose(stepped_rep[:, 1], want_base, atol=1e-5)
    with pytest.raises(InputError, match="stop_layer"):
        rep.step(plan=emolens.interventions.HookPlan(tiny, [], [r1]))
    stepped = got["v"]
    want_logits = run(tiny, b, interventions=[iv], readers=[reader])
    assert torch.allclose(logits, want_logits[:, -1], atol=1e-4)
    assert torch.allclose(stepped, got["v"], atol=1e-5)
    assert not torch.allclose(stepped, run_state(tiny, b, reader, got), atol=1e-3)  # the pulse mattered


def test_sublayer_influence_matches_full_passes(tiny_llama):
    items, ps, stats, dirs = _setup(tiny_llama)
    neu = neu_prompts(items).prompts
    sig = sigma(stats)
    res = sublayer_influence(tiny_llama, neu, dirs, sig, ["fear"], alphas=(0.2, 0.6), ref_layers=[2, 3])["fear"]
    vr = reference_direction(dirs, "fear", [2, 3])
    loc = local_directions(dirs, "fear", vr)
    fn = _model.final_norm(tiny_llama)
    b = tiny_llama.encode(neu)

    def proj(ivs):
        got = {}

        def f(values, sel, tr):
            got["s"] = (fn(values[sel]).double() @ vr.double()).mean()
        run(tiny_llama, b, interventions=ivs, readers=[Reader(resid(3), f, Pos.last())])
        return float(got["s"])

    base = proj([])
    for l, p, site in ((1, 0, Site("attn_out", 1)), (2, 1, mlp_out(2))):
        vals = []
        for a in (0.2, 0.6):
            dose = a * float(sig.scores[l, p])
            vals.append((proj([Add(site, loc[l, p], strength=dose, pos=Pos.last())]) - base) / dose)
        assert abs(sum(vals) / 2 - float(res.scores[l, p])) < 1e-4
    assert torch.allclose(res.extra["I_norm"].sum(), torch.tensor(1.0), atol=1e-4)
    # several emotions share one prefix (rows repeated per emotion); each equals its own run
    both = sublayer_influence(tiny_llama, neu, dirs, sig, ["anger", "fear"], alphas=(0.2, 0.6), ref_layers=[2, 3],
                              batch_size=1)
    assert torch.allclose(both["fear"].scores, res.scores, atol=1e-4)
    assert layers_from_fraction(28, (0.39, 0.72)) == list(range(11, 21))
    assert layers_from_fraction(28, (0.75, 0.9)) == list(range(21, 26))


# ----------------------------------------------------------------------------------------- assembly
@pytest.mark.parametrize("profile", ["paper", "flat_zero", "negative", "spiky", "tiny_heads"])
def test_allocation_respects_budget_quotas_and_caps(profile):
    L = 28
    n_heads, d_mlp, budget = 24, 8192, 10.0
    if profile == "paper":  # rise from layer 12, peak 21-23
        imp = torch.tensor([[max(0.0, (l - 8) / 14), max(0.0, (l - 8) / 13)] for l in range(L)])
    elif profile == "flat_zero":
        imp = torch.zeros(L, 2)
    elif profile == "negative":
        imp = -torch.rand(L, 2, generator=torch.Generator().manual_seed(1))
        imp[5] = torch.tensor([2.0, 3.0])
    elif profile == "spiky":  # everything in one layer: the cap must bite
        imp = torch.zeros(L, 2)
        imp[20] = 1.0
    else:  # few heads per layer: availability clipping + refill
        n_heads, budget = 3, 4.0
        imp = torch.zeros(L, 2)
        imp[20:23] = 1.0
    a = allocate(imp, n_heads=n_heads, d_mlp=d_mlp, budget_per_sublayer=budget)
    K = int(round(budget * 2 * L))
    assert a["K_total"] == K and a["K_mlp"] == round(K * 0.7) and a["K_attn"] == K - a["K_mlp"]
    assert sum(a["k_mlp"]) == a["K_mlp"] and sum(a["k_attn"]) == a["K_attn"]
    assert min(a["k_mlp"]) >= a["min_mlp"] == 4 and min(a["k_attn"]) >= a["min_attn"] == min(2, n_heads)
    assert max(a["k_attn"]) <= n_heads and max(a["k_mlp"]) <= d_mlp
    if profile != "tiny_heads":
        assert max(k - a["min_mlp"] for k in a["k_mlp"]) <= a["cap_mlp"] == int(0.4 * a["K_mlp"])
        assert max(k - a["min_attn"] for k in a["k_attn"]) <= a["cap_attn"]
    if profile == "paper":
        assert (a["K_mlp"], a["K_attn"]) == (392, 168)
        assert a["k_mlp"][22] > a["k_mlp"][3] and a["k_mlp"][3] == 4
    if profile in ("flat_zero",):  # uniform when all weights are <= 0
        assert max(a["k_mlp"]) - min(a["k_mlp"]) <= 1
    if profile == "negative":  # only positive influence attracts components beyond the quota
        assert a["k_mlp"][5] == 4 + a["cap_mlp"] and a["k_attn"][5] == n_heads  # cap, then availability
    if profile == "tiny_heads":
        assert all(k <= 3 for k in a["k_attn"])


def test_allocation_quota_fallback_and_bad_budget():
    a = allocate(torch.ones(4, 2), n_heads=4, d_mlp=16, budget_total=6, mlp_ratio=0.5)
    assert a["min_mlp"] == 0 and sum(a["k_mlp"]) == 3  # K_kind < L: no quota
    a = allocate(torch.ones(4, 2), n_heads=4, d_mlp=16, budget_total=10, mlp_ratio=0.5)
    assert a["min_mlp"] == 1 and sum(a["k_mlp"]) == 5  # L <= K_kind < L * 4: quota 1
    with pytest.raises(InputError, match="exceeds"):
        allocate(torch.ones(4, 2), n_heads=2, d_mlp=16, budget_total=100, mlp_ratio=0.5)


def test_circuit_roundtrip_and_width_mismatch(tmp_path, tiny_llama):
    items, ps, stats, dirs = _setup(tiny_llama)
    e = "disgust"
    ns = neuron_scores_from_stats(tiny_llama, stats, dirs, e)
    hs = head_scores_from_stats(tiny_llama, stats, dirs, e)
    inf = sublayer_influence(tiny_llama, neu_prompts(items).prompts, dirs, sigma(stats), [e], alphas=(0.5,))[e]
    c = assemble_circuit(tiny_llama, e, inf, ns, hs, budget_per_sublayer=3, min_neurons=1, min_heads=1)
    assert c.n_neurons + c.n_heads == 3 * 2 * tiny_llama.n_layers
    for l, idx in c.neurons.items():  # top-k by C_mean within each layer
        assert set(idx) == set(torch.topk(ns.scores[l], len(idx)).indices.tolist())
    p = c.save(tmp_path / "c.json")
    c2 = Circuit.load(p, model=get_model("tiny-qwen2"))  # same dims: fine
    assert c2.neurons == c.neurons and c2.heads == c.heads
    d = json.loads(p.read_text())
    d["model"]["d_mlp"] = 1536
    (tmp_path / "other.json").write_text(json.dumps(d))
    with pytest.raises(ResultError, match="d_mlp=1536"):
        Circuit.load(tmp_path / "other.json", model=tiny_llama)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ResultError, match="not JSON"):
        Circuit.load(tmp_path / "bad.json")
    dm, dz = difference_vectors(stats)
    ivs = modulation_interventions(tiny_llama, c, dm, dz, scale=1.0)
    assert all(iv.pos == (Pos.from_last() if iv.site.kind == "neuron" else Pos.all()) for iv in ivs)
    assert {iv.site.kind for iv in ivs} == {"neuron", "head"}


def test_modulation_at_scale_zero_reproduces_unmodulated_text(tiny_llama):
    items, ps, stats, dirs = _setup(tiny_llama)
    e = "surprise"
    c = assemble_circuit(tiny_llama, e, sublayer_influence(tiny_llama, neu_prompts(items).prompts, dirs, sigma(stats),
                                                             [e], alphas=(0.5,))[e],
                         neuron_scores_from_stats(tiny_llama, stats, dirs, e),
                         head_scores_from_stats(tiny_llama, stats, dirs, e), budget_per_sublayer=4)
    dm, dz = difference_vectors(stats)
    prompts = neu_prompts(items).prompts
    base = tiny_llama.generate(prompts, max_new_tokens=10)
    assert tiny_llama.generate(prompts, max_new_tokens=10,
                               interventions=modulation_interventions(tiny_llama, c, dm, dz, 0.0)) == base
    assert tiny_llama.generate(prompts, max_new_tokens=10,
                               interventions=modulation_interventions(tiny_llama, c, dm, dz, 8.0)) != base
    steer = steering_interventions(tiny_llama, dirs, e, [1, 2], alpha=4.0)
    assert all(iv.rms and iv.pos == Pos.from_last() and iv.site.kind == "resid_post" for iv in steer)
    assert tiny_llama.generate(prompts, max_new_tokens=10, interventions=steer) != base
