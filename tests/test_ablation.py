"""Ablation/enhancement specs, top-k and random-k selection, effect and scale curves."""

from __future__ import annotations

import pytest
import torch

from emolens import attn_out, capture, head, mlp_out, neuron, resid, run_with_cache
from emolens.ablation import (ablate, effect_curve, merge_sites, metric_measure, random_k_sites, scale_curve,
                              top_k_sites)
from emolens.errors import EmolensError, InputError, InterventionError, MetricError, ResultError
from emolens.interventions import Add, Mean, Replace, Scale, Zero
from emolens.metrics import projection
from emolens.results import Result

PROMPTS = ["I feel great today", "The meeting moved", "What a lovely surprise", "Hi there"]


def _direction(m, seed=0):
    return torch.randn(m.d_model, generator=torch.Generator().manual_seed(seed))


def test_ablation_kinds_build_the_right_specs(tiny_llama):
    m = tiny_llama
    sites = [head(1, 2), head(1, 0), neuron(2, 5), attn_out(3)]
    assert merge_sites(sites) == [head(1, (0, 2)), neuron(2, 5), attn_out(3)]
    z = ablate(m, PROMPTS, sites, "zero")
    assert [type(i) for i in z] == [Zero, Zero, Zero] and z[0].site == head(1, (0, 2))
    s = ablate(m, PROMPTS, sites, "scale", scale=2.0)
    assert all(isinstance(i, Scale) and float(i.factor) == 2.0 for i in s)
    mean = ablate(m, PROMPTS, [neuron(2, [1, 5])], "mean", reference=PROMPTS[:2])
    want = capture(m, PROMPTS[:2], [neuron(2, [1, 5])], pos="all", reduce="mean", progress=False)["neuron.2.1,5"]
    assert isinstance(mean[0], Mean) and torch.allclose(mean[0].value, want, atol=1e-6)
    vec = torch.randn(m.n_heads, m.d_head)
    add = ablate(m, PROMPTS, [head(1, 2)], "add", vector={1: vec}, scale=3.0)
    assert isinstance(add[0], Add) and add[0].strength == 3.0
    # add into head 2 only == hand edit of z
    b = m.encode(PROMPTS)
    _, cache = run_with_cache(m, b, [head(1)])
    z1 = cache["blocks.1.attn.hook_z"].clone()
    z1[:, :, 2] += 3.0 * vec[2]
    assert torch.allclose(m.forward(b, interventions=add), m.forward(b, interventions=[Replace(head(1), z1)]),
                          atol=1e-5)


def test_resample_uses_other_prompts_reproducibly(tiny_llama):
    m = tiny_llama
    a = ablate(m, PROMPTS, [neuron(1, 3)], "resample", seed=3, pos="last")
    b = ablate(m, PROMPTS, [neuron(1, 3)], "resample", seed=3, pos="last")
    assert isinstance(a[0], Replace) and torch.equal(a[0].source, b[0].source)
    batch = m.encode(PROMPTS)
    own = run_with_cache(m, batch, [neuron(1)])[1]["blocks.1.mlp.hook_post"][:, -1, 3]
    src = a[0].source[:, -1, 3]  # t* of each row comes from a donor's t*
    singles = torch.stack([run_with_cache(m, [p], [neuron(1)])[1]["blocks.1.mlp.hook_post"][0, -1, 3] for p in PROMPTS])
    for i in range(len(PROMPTS)):
        j = int(torch.argmin((singles - src[i]).abs()))
        assert abs(float(singles[j] - src[i])) < 1e-5 and j != i  # a real donor, never itself
    assert not torch.allclose(src, own)
    out = m.forward(batch, interventions=a)  # runs on exactly encode(PROMPTS)
    assert out.shape[0] == len(PROMPTS)


def test_bad_ablation_requests(tiny_llama):
    m = tiny_llama
    with pytest.raises(InterventionError, match="Unknown ablation kind"):
        ablate(m, PROMPTS, [head(0, 0)], "shuffle")
    with pytest.raises(EmolensError):
        ablate(m, PROMPTS, [head(0, 0)], "scale")  # no scale
    with pytest.raises(EmolensError):
        ablate(m, PROMPTS, [head(0, 0)], "add")  # no vector
    with pytest.raises(EmolensError):
        ablate(m, PROMPTS, [head(9, 0)], "zero")  # layer out of range
    assert ablate(m, PROMPTS, [], "zero") == []


def test_top_and_random_k(tiny_llama):
    m = tiny_llama
    scores = torch.arange(16, dtype=torch.float32).reshape(4, 4) - 8
    res = Result("heads", scores, ("layer", "head"))
    assert top_k_sites(res, 2) == [head(3, 3), head(3, 2)]
    assert top_k_sites(res, 2, largest=False) == [head(0, 0), head(0, 1)]
    assert top_k_sites(res, 1, by="abs") == [head(0, 0)]  # |-8| is the largest magnitude
    assert top_k_sites(res, 0) == []
    with pytest.raises(ResultError, match="larger than"):
        top_k_sites(res, 17)
    sub = Result("sublayers", torch.tensor([[0.0, 2.0], [3.0, 1.0], [0, 0], [0, 0]]), ("layer", "sublayer"),
                 {"sublayer": ["attn", "mlp"]})
    assert top_k_sites(sub, 2) == [attn_out(1), mlp_out(0)]
    r1 = random_k_sites(m, "heads", 5, seed=7, exclude=top_k_sites(res, 3))
    r2 = random_k_sites(m, "heads", 5, seed=7, exclude=top_k_sites(res, 3))
    r3 = random_k_sites(m, "heads", 5, seed=8, exclude=top_k_sites(res, 3))
    assert r1 == r2 and r1 != r3 and len(set(r1)) == 5
    assert not set(r1) & set(top_k_sites(res, 3))
    assert len(random_k_sites(m, "neuron", 10, seed=0, layers=[2])) == 10
    with pytest.raises(InputError, match="larger than"):
        random_k_sites(m, "heads", 15, seed=0, exclude=top_k_sites(res, 3))


def test_effect_curve_matches_hand_ablation(tiny_llama):
    m = tiny_llama
    v = _direction(m)
    measure = metric_measure(projection(resid(3), v))
    scores = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    res = Result("heads", scores, ("layer", "head"))
    curves = effect_curve(m, PROMPTS, res, measure, ks=(0, 1, 3), n_random=2, seed=5, n_boot=200, progress=False)
    top, rnd = curves["top"], curves["random"]
    assert top.kind == "curve" and top.axes == ("k",) and top.labels["k"] == [0, 1, 3]
    assert float(top.scores[0]) == 0.0 and float(rnd.scores[0]) == 0.0  # k = 0 is the unablated model
    base = measure(m, PROMPTS, [])
    hand = measure(m, PROMPTS, [Zero(s) for s in top_k_sites(res, 3)])
    assert abs(float(top.scores[2]) - float((hand - base).mean())) < 1e-5
    assert float(top.extra["ci_low"][2]) <= float(top.scores[2]) <= float(top.extra["ci_high"][2])
    again = effect_curve(m, PROMPTS, res, measure, ks=(0, 1, 3), n_random=2, seed=5, n_boot=200, progress=False)
    assert torch.equal(again["random"].scores, rnd.scores)  # seeded controls reproduce
    sc = scale_curve(m, PROMPTS, res, measure, k=2, scales=(0.0, 1.0, 2.0), n_random=1, n_boot=50, progress=False)
    assert float(sc["top"].scores[1]) == 0.0 and sc["top"].axes == ("scale",)
    zero = measure(m, PROMPTS, [Zero(s) for s in top_k_sites(res, 2)])
    assert abs(float(sc["top"].scores[0]) - float((zero - base).mean())) < 1e-5  # scale 0 == zero ablation


def test_effect_curve_bad_inputs(tiny_llama):
    m = tiny_llama
    res = Result("heads", torch.randn(4, 4), ("layer", "head"))
    measure = metric_measure(projection(resid(3), _direction(m)))
    with pytest.raises(EmolensError, match="larger than"):
        effect_curve(m, PROMPTS, res, measure, ks=(0, 20), progress=False)
    with pytest.raises(MetricError):
        effect_curve(m, PROMPTS, res, lambda mm, p, iv: torch.zeros(2), ks=(0, 1), progress=False)
    with pytest.raises(InterventionError):
        effect_curve(m, PROMPTS, res, measure, ks=(1,), kind="bogus", progress=False)
