"""Steering: position/strength modes checked by capture, strength 0 = unsteered, NaN guard, fluency, calibration."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from emolens import InputError, InterventionError
from emolens.capture import run_with_cache
from emolens.directions import EmotionVectors
from emolens.evaluate import score_texts
from emolens.evaluate.fluency import corpus_perplexity, perplexity, reply_nll
from emolens.interventions import Add
from emolens.sites import Pos, resid
from emolens.steering import (SweepResult, calibrate, generate, global_interventions, position_rules,
                              priming_system, scaled_vector, steering_interventions, sweep)

PROMPTS = ["Hi there, how are you?", "Tell me about your weekend plans please."]  # different lengths



def _vectors(m, layers=(1, 2), seed=0, emotions=("joy", "trust")):
    g = torch.Generator().manual_seed(seed)
    vec = {e: {resid(L).hook_name: torch.randn(m.d_model, generator=g) for L in layers} for e in emotions}
    stats = {resid(L).hook_name: {"norm_median": 5.0 + L, "rms_median": 1.0} for L in layers}
    return EmotionVectors(vec, stats, meta={"model": m.name})


def _delta(m, ivs, layer, batch):
    """Change of resid_post.layer caused by ivs, read by capture (after the interventions)."""
    _, base = run_with_cache(m, batch, [resid(layer)])
    _, steer = run_with_cache(m, batch, [resid(layer)], interventions=ivs)
    h = resid(layer).hook_name
    return steer[h] - base[h], base[h]


# -- position modes ------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["locus", "generated", "all", "locus+generated"])
def test_position_modes_touch_only_their_positions(tiny_llama, position):
    m = tiny_llama
    vecs = _vectors(m)
    window = (-3, -1)
    ivs = steering_interventions(vecs, "joy", layers=1, strength=2.0, position=position, window=window, model=m)
    # teacher-forced continuations stand in for generated tokens (positions >= prompt_len)
    batch = m.encode(PROMPTS, continuations=["Fine, thanks!", "Sure."])
    delta, _ = _delta(m, ivs, 1, batch)
    touched = delta.abs().amax(-1) > 1e-5  # [batch, pos]
    for r in range(len(PROMPTS)):
        off, P = int(batch.pad_offset[r]), int(batch.prompt_len[r])
        rel = torch.arange(batch.input_ids.shape[1]) - off
        real = rel >= 0
        want = {
            "locus": (rel == P - 3) | (rel == P - 1),
            "generated": rel >= P - 1,
            "all": real,
            "locus+generated": (rel == P - 3) | (rel == P - 1) | (rel >= P),
        }[position] & real
        assert torch.equal(touched[r], want), (position, r, touched[r].nonzero().flatten().tolist())
        # where touched, the change is exactly strength * vector at this layer
        torch.testing.assert_close(delta[r, want], (2.0 * vecs.get("joy", resid(1))).expand(int(want.sum()), -1),
                                   atol=1e-4, rtol=1e-4)


def test_locus_window_must_be_negative_offsets():
    with pytest.raises(InputError, match="negative offsets"):
        position_rules("locus", (0, 1))
    with pytest.raises(InputError, match="Unknown position"):
        position_rules("everywhere")


# -- strength modes --------------------------------------------------------------------------------
def test_strength_modes_scale_as_documented(tiny_llama):
    m = tiny_llama
    vecs = _vectors(m)
    batch = m.encode(PROMPTS)
    # rms: the added vector's norm is s * ||h_t|| at each position
    ivs = steering_interventions(vecs, "joy", layers=1, strength=0.5, strength_mode="rms", position="all")
    delta, base = _delta(m, ivs, 1, batch)
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(delta.norm(dim=-1)[mask], 0.5 * base.norm(dim=-1)[mask], rtol=1e-3, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(delta[mask], vecs.get("joy", resid(1))[None], dim=-1)
    assert bool((cos > 0.999).all())
    # norm: s * median||h|| (from the stats), the same everywhere
    ivs = steering_interventions(vecs, "joy", layers=2, strength=0.5, strength_mode="norm", position="all")
    delta, _ = _delta(m, ivs, 2, batch)
    torch.testing.assert_close(delta.norm(dim=-1)[mask], torch.full((int(mask.sum()),), 0.5 * 7.0), rtol=1e-4, atol=1e-4)
    v, rms = scaled_vector(vecs, "joy", resid(2), "absolute")
    assert rms is False and torch.equal(v, vecs.get("joy", resid(2)))
    with pytest.raises(InputError, match="strength_mode"):
        scaled_vector(vecs, "joy", resid(2), "percent")


def test_several_vectors_and_layers_at_once(tiny_llama):
    m = tiny_llama
    vecs = _vectors(m)
    batch = m.encode(PROMPTS)
    ivs = steering_interventions(vecs, {"joy": 1.0, "trust": -0.5}, layers=[1, 2], strength=2.0, position="all")
    assert len(ivs) == 4
    delta, _ = _delta(m, [iv for iv in ivs if iv.site.layer == 1], 1, batch)
    want = 2.0 * vecs.get("joy", resid(1)) - 1.0 * vecs.get("trust", resid(1))
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(delta[mask], want.expand(int(mask.sum()), -1), atol=1e-4, rtol=1e-4)
    g = global_interventions(vecs, "joy", strength=1.0, strength_mode="absolute")
    assert [iv.site.layer for iv in g] == [1, 2] and all(iv.strength == 0.5 for iv in g)
    assert all(iv.pos == Pos.all() for iv in g)
    assert "joy and trust" in priming_system(["joy", "trust"])


# -- strength 0 == unsteered ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["absolute", "rms", "norm"])
def test_strength_zero_reproduces_unsteered_greedy_text(tiny, mode):
    m = tiny
    vecs = _vectors(m)
    base = m.generate(PROMPTS, max_new_tokens=8, return_ids=True)
    assert steering_interventions(vecs, "joy", layers=1, strength=0.0, strength_mode=mode) == []
    # the engine path with an explicit zero-strength Add gives the same tokens too
    v, rms = scaled_vector(vecs, "joy", resid(1), mode)
    zero = generate(m, PROMPTS, [Add(resid(1), v, strength=0.0, rms=rms, pos=Pos.all())], max_new_tokens=8,
                    return_ids=True)
    assert all(torch.equal(a, b) for a, b in zip(base, zero))
    strong = generate(m, PROMPTS, steering_interventions(vecs, "joy", layers=1, strength=50.0), max_new_tokens=8,
                      return_ids=True)
    assert any(not torch.equal(a, b) for a, b in zip(base, strong))


# -- bad input -----------------------------------------------------------------------------------------
def test_nan_producing_strength_raises_naming_it(tiny_llama):
    m = tiny_llama
    vecs = _vectors(m)
    with pytest.raises(InterventionError, match=r"strength 1e\+38"):
        sweep(m, PROMPTS, vecs, "joy", strengths=[1e38], layers=1, strength_mode="absolute", max_new_tokens=3,
              fluency=False, progress=False)
    with pytest.raises(InterventionError, match="not finite"):
        steering_interventions(vecs, "joy", layers=1, strength=float("inf"))


def test_wrong_width_vector_and_empty_sets(tiny_llama):
    m = tiny_llama
    bad = EmotionVectors({"joy": {"resid_post.1": torch.ones(m.d_model + 1)}})
    with pytest.raises(InterventionError, match="d_model"):
        steering_interventions(bad, "joy", layers=1, strength=1.0, model=m)
    vecs = _vectors(m)
    with pytest.raises(InputError, match="empty"):
        sweep(m, [], vecs, "joy", strengths=[1.0], layers=1)
    with pytest.raises(InputError, match="empty"):
        perplexity(m, [], [])
    with pytest.raises(InputError, match="empty"):
        generate(m, [], [])
    with pytest.raises(InputError, match="prompts but"):
        perplexity(m, PROMPTS, ["only one"])


# -- fluency ---------------------------------------------------------------------------------------------
def test_perplexity_matches_manual_reference(tiny_llama):
    m = tiny_llama
    texts = ["I'm fine, thanks.", "Let us go!"]
    ppl = perplexity(m, PROMPTS, texts)
    for i, (p, t) in enumerate(zip(PROMPTS, texts)):
        prompt_ids = m.tokenizer(m.format_chat(p), add_special_tokens=False)["input_ids"]
        cont_ids = m.tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + cont_ids])
        with torch.no_grad():
            logp = torch.log_softmax(m.hf_model(input_ids=ids).logits[0].double(), -1)
        nll = -sum(float(logp[len(prompt_ids) + j - 1, tok]) for j, tok in enumerate(cont_ids))
        assert ppl[i] == pytest.approx(math.exp(nll / len(cont_ids)), rel=1e-4)
    nll, n = reply_nll(m, PROMPTS, texts)
    assert corpus_perplexity(m, PROMPTS, texts) == pytest.approx(math.exp(nll.sum() / n.sum()), rel=1e-6)
    assert np.isnan(perplexity(m, PROMPTS[:1], [""])[0])


def test_scorers_order_hand_written_sentences():
    joyful = "I'm so happy and grateful, what a wonderful, joyful day with my dear friends!"
    angry = "I hate this, it's infuriating and I'm furious at these awful, hostile people."
    neutral = "The meeting is on Tuesday at the office on the second floor."
    df = score_texts([joyful, angry, neutral])
    assert df.loc[0, "joy_trust"] > df.loc[2, "joy_trust"] and df.loc[0, "joy_trust"] > df.loc[1, "joy_trust"]
    assert df.loc[1, "anger"] > df.loc[0, "anger"] and df.loc[1, "anger"] > df.loc[2, "anger"]
    assert df.loc[0, "vader_compound"] > df.loc[2, "vader_compound"] > df.loc[1, "vader_compound"]
    assert df.loc[2, "first_person_rate"] == 0 and df.loc[0, "first_person_rate"] > 0


# -- sweep + calibrate --------------------------------------------------------------------------------------
def test_sweep_on_tiny_model_produces_a_table_and_curves(tiny_llama):
    m = tiny_llama
    vecs = _vectors(m)
    r = sweep(m, PROMPTS, vecs, ["joy", "trust"], strengths=[0.5, 2.0], layers=[1, 2], strength_mode="rms",
              max_new_tokens=4, progress=False)
    assert len(r.table) == 5 and r.table.loc[0, "ppl_ratio"] == pytest.approx(1.0)
    assert {"joy_trust_dz", "first_person_rate_p", "objective", "distinct_2_ratio"} <= set(r.table.columns)
    c = r.curve("ppl", 1, ratio=True)
    assert c.kind == "curve" and c.labels["strength"] == [0.0, 0.5, 2.0] and float(c.scores[0]) == pytest.approx(1.0)
    assert r.curve("joy_trust", 2).shape == (3,)


def _fake_sweep(rows):
    t = pd.DataFrame(rows)
    return SweepResult(t, {}, {}, {"targets": ["joy_trust"], "strength_mode": "norm"})


def test_calibrate_respects_the_fluency_guard():
    base = dict(layer=None, strength=0.0, ppl_ratio=1.0, distinct_2_ratio=1.0, objective=0.0, joy_trust_dz=0.0)
    rows = [base,
            dict(layer=8, strength=0.1, ppl_ratio=1.05, distinct_2_ratio=1.0, objective=0.3, joy_trust_dz=0.3),
            dict(layer=8, strength=0.2, ppl_ratio=1.20, distinct_2_ratio=0.95, objective=0.6, joy_trust_dz=0.6),
            dict(layer=8, strength=0.4, ppl_ratio=1.60, distinct_2_ratio=0.9, objective=1.2, joy_trust_dz=1.2),
            dict(layer=10, strength=0.2, ppl_ratio=1.10, distinct_2_ratio=0.5, objective=0.9, joy_trust_dz=0.9)]
    c = calibrate(_fake_sweep(rows))
    assert (c.layer, c.strength, c.ok) == (8, 0.2, True)
    assert c.table["chosen"].sum() == 1 and not c.table.loc[3, "admissible"] and not c.table.loc[4, "admissible"]
    c2 = calibrate(_fake_sweep(rows), max_ppl_increase=0.5, max_distinct_drop=None)
    assert (c2.layer, c2.strength) == (10, 0.2)
    c3 = calibrate(_fake_sweep(rows), max_ppl_increase=0.01)
    assert c3.ok is False and c3.strength == 0.0
    with pytest.raises(InputError):
        calibrate(_fake_sweep(rows), max_ppl_increase=-1)
