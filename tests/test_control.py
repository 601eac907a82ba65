"""Judge ensembles, agreement statistics, Wilson intervals and the side-effect card, against
hand-computed tiny cases and published worked examples."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from emolens.errors import InputError
from emolens.evaluate import judges as J
from emolens.evaluate.agreement import (JudgeEnsemble, accuracy_table, cohen_kappa, fleiss_kappa, intervals_overlap,
                                        majority_vote, wilson_interval)
from emolens.evaluate.lexicon import DATA_DIR, tokenize
from emolens.evaluate.side_effects import (Guards, SideEffectCard, answer_correct, load_retention_qa, names_emotion,
                                           restatement_overlap, restates, select_operating_point, side_effect_card)


# ----------------------------------------------------------------------------- Wilson
def test_wilson_matches_hand_computation_and_published_values():
    # 8/10, z = 1.959964: centre = (0.8 + z^2/20) / (1 + z^2/10) = 0.71674,
    # half = z/(1 + z^2/10) * sqrt(0.016 + z^2/400) = 0.22658  -> (0.4902, 0.9433) (Newcombe 1998, table I)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # 0/10: lower bound exactly 0, upper z^2/(n + z^2) = 3.8415/13.8415 = 0.2775
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    # symmetric around 1/2 for k = n/2
    lo, hi = wilson_interval(25, 50)
    assert (lo + hi) / 2 == pytest.approx(0.5, abs=1e-12)
    assert np.isnan(wilson_interval(0, 0)[0])
    with pytest.raises(InputError):
        wilson_interval(5, 3)
    assert intervals_overlap((0.1, 0.3), (0.25, 0.5)) and not intervals_overlap((0.1, 0.2), (0.3, 0.5))


# ----------------------------------------------------------------------------- kappa
def test_cohen_kappa_hand_cases():
    # 2x2 worked example: yes/yes 20, yes/no 5, no/yes 10, no/no 15 (n = 50):
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    # p_o = 0.75, p_e = 0.5*0.25 + 0.5*0.75 = 0.5 -> 0.5
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    assert cohen_kappa(list("abc"), list("abc")) == pytest.approx(1.0)
    # systematic disagreement is below chance
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert np.isnan(cohen_kappa([1, 1], [1, 1]))
    with pytest.raises(InputError):
        cohen_kappa([1], [1, 0])


def test_cohen_kappa_ci_equals_a_loop_over_the_same_resamples():
    """The vectorised bootstrap equals cohen_kappa() on each resample drawn with the same generator."""
    from emolens.evaluate.agreement import cohen_kappa_ci

    rng = np.random.default_rng(3)
    a = rng.integers(0, 3, 200).tolist()
    b = [x if rng.random() < 0.6 else int(rng.integers(0, 3)) for x in a]
    lo, hi = cohen_kappa_ci(a, b, n_boot=300, seed=7)
    idx = np.random.default_rng(7).integers(0, len(a), size=(300, len(a)))
    ref = [cohen_kappa([a[i] for i in r], [b[i] for i in r]) for r in idx]
    assert (lo, hi) == pytest.approx((np.quantile(ref, 0.025), np.quantile(ref, 0.975)))
    assert lo < cohen_kappa(a, b) < hi
    assert cohen_kappa_ci(a, a, n_boot=50) == pytest.approx((1.0, 1.0))
    assert all(np.isnan(cohen_kappa_ci([1, 1], [1, 1], n_boot=20)))
    with pytest.raises(InputError):
        cohen_kappa_ci([1], [1, 0])


def test_fleiss_kappa_wikipedia_example():
    # Fleiss (1971) worked example as on Wikipedia: 10 items, 14 raters, 5 categories -> 0.210
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    ratings = [[c for c, k in enumerate(row) for _ in range(k)] for row in counts]
    assert fleiss_kappa(ratings) == pytest.approx(0.2099, abs=5e-4)
    assert fleiss_kappa([[1, 1], [0, 0], [1, 1]]) == pytest.approx(1.0)
    with pytest.raises(InputError):
        fleiss_kappa([[1, 0], [1]])


def test_majority_vote_strict_majority():
    m = majority_vote([[True, True, False], [True, False, False], [True, True, True], [False, False, False]])
    assert m.tolist() == [True, False, True, False]
    assert majority_vote([[True, False], [True, True]]).tolist() == [False, True]  # tie -> no match


class _Fixed(J.Judge):
    def __init__(self, labels):
        self.labels = labels

    def judge(self, texts, targets):
        texts, targets = J._check_pairs(texts, targets, self.emotions, "Fixed")
        return [J.Verdict(l == t, l, 1.0) for l, t in zip(self.labels, targets)]


def test_ensemble_majority_agreement_and_table():
    tg = ["anger", "anger", "sadness", "fear"]
    ens = JudgeEnsemble({"a": _Fixed(["anger", "anger", "sadness", "none"]),
                         "b": _Fixed(["anger", "sadness", "sadness", "fear"]),
                         "c": _Fixed(["fear", "anger", "happiness", "none"])})
    df = ens.judge(["t1", "t2", "t3", "t4"], tg)
    # matches: a = 1,1,1,0; b = 1,0,1,1; c = 0,1,0,0 -> majority 1,1,1,0
    assert df["majority"].tolist() == [True, True, True, False]
    ag = ens.agreement(df)
    pairs = ag["pairs"].set_index(["judge_a", "judge_b"])
    # a vs b on match: [1,1,1,0] vs [1,0,1,1]: p_o = 0.5, p_e = .75*.75 + .25*.25 = 0.625 -> -1/3
    assert pairs.loc[("a", "b"), "kappa"] == pytest.approx(-1 / 3)
    tab = accuracy_table(df, ["a_match", "majority"], by="target")
    row = tab[(tab.group == "overall") & (tab.judge == "majority")].iloc[0]
    assert (row.k, row.n) == (3, 4)
    assert (row.lo, row.hi) == pytest.approx(wilson_interval(3, 4))
    anger = tab[(tab.group == "anger") & (tab.judge == "a")].iloc[0]
    assert (anger.k, anger.n) == (2, 2)
    with pytest.raises(InputError):
        JudgeEnsemble({})


# ----------------------------------------------------------------------------- NADE
@pytest.mark.skipif(importlib.util.find_spec("nade") is None, reason="nade not installed")
def test_nade_judge_reads_clear_texts_and_beats_chance():
    j = J.NADEJudge()
    v = j.judge(["I am furious and outraged. This is infuriating, I hate how they lied to us and I want to scream at them.",
                 "I am so happy and delighted today, we won and everyone is celebrating!"],
                ["anger", "anger"])
    assert v[0].label == "anger" and v[0].match
    assert v[1].label == "happiness" and not v[1].match
    acc, conf = J.evaluate_judge(j)
    assert acc >= 0.5  # 6-way chance is 1/6; measured 0.667 on judge_eval.jsonl
    assert conf.attrs["n"] == 192


# ----------------------------------------------------------------------------- data disjointness
def _ngrams(text, n=6):
    t = tokenize(text)
    return {tuple(t[i:i + n]) for i in range(len(t) - n + 1)}


def test_judge_data_and_retention_disjoint_from_generation_prompts():
    # no judge or retention text shares a 6-word sequence with any SEV scenario or event (all three splits);
    # shorter common phrases ("in the middle of the") do occur and are not copying
    sev = set()
    for split in ("sev_analysis", "sev_test", "sev_confirm", "sev_confirm2", "sev_confirm3",
                  "sev_confirm4", "sev_confirm5", "sev_confirm6"):
        for line in (DATA_DIR / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            sev |= _ngrams(r["scenario"])
            for e in r["event"].values():
                sev |= _ngrams(e)
    for name in ("judge_train", "judge_eval"):
        for line in (DATA_DIR / f"{name}.jsonl").read_text().splitlines():
            assert not (_ngrams(json.loads(line)["text"]) & sev), (name, line)
    qa = load_retention_qa()
    assert len(qa) == 50
    assert not any(_ngrams(q["question"]) & sev for q in qa)


def _sev_texts(rec):
    return [rec["scenario"], *rec["event"].values()]


@pytest.mark.parametrize("name,tag,earlier", [("sev_confirm", "c", ()), ("sev_confirm2", "d", ("sev_confirm",)),
                                                    ("sev_confirm3", "e", ("sev_confirm", "sev_confirm2")),
                                                    ("sev_confirm4", "f",
                                                     ("sev_confirm", "sev_confirm2", "sev_confirm3")),
                                                    ("sev_confirm5", "g",
                                                     ("sev_confirm", "sev_confirm2", "sev_confirm3", "sev_confirm4")),
                                                    ("sev_confirm6", "h",
                                                     ("sev_confirm", "sev_confirm2", "sev_confirm3", "sev_confirm4",
                                                      "sev_confirm5"))])
def test_confirm_split_is_new_text(name, tag, earlier):
    # sev_confirm*.jsonl: confirmation test files (benchmarks/control.py --test), each written after its protocol
    # was fixed; each must load, be balanced, and share no 6-word sequence with any other shipped SEV, story or
    # judge text, nor with the confirmation files written before it (so a hit on it cannot come from tuning on,
    # or copying from, those files)
    from collections import Counter

    from emolens.datasets import load_sev
    path = DATA_DIR / f"{name}.jsonl"
    ds = load_sev(path)
    assert ds.num_rows == 24
    assert Counter(ds["theme"]) == {t: 3 for t in ("work", "family", "health", "travel", "school", "friendship",
                                                    "money", "home")}
    ids = list(ds["skeleton_id"])
    assert len(set(ids)) == 24 and all(i == f"{t}-{tag}{i[-2:]}" for i, t in zip(ids, ds["theme"]))
    other = set()
    for name in ("sev_analysis", "sev_test", *earlier):
        for line in (DATA_DIR / f"{name}.jsonl").read_text().splitlines():
            for t in _sev_texts(json.loads(line)):
                other |= _ngrams(t)
    for name in ("emotion_stories", "judge_train", "judge_eval"):
        for line in (DATA_DIR / f"{name}.jsonl").read_text().splitlines():
            other |= _ngrams(json.loads(line)["text"])
    hits = [(r["skeleton_id"], t) for r in ds for t in _sev_texts(r) if _ngrams(t) & other]
    assert not hits, hits
    # the check can fail: a sentence copied from the test split is caught
    copied = json.loads((DATA_DIR / "sev_test.jsonl").read_text().splitlines()[0])["event"]["neutral"]
    assert _ngrams(copied) & other


# ----------------------------------------------------------------------------- side effects
def test_restatement_and_name_detection():
    prompt = "I sent a client a quote for the renovation of their office space."
    # reply bigrams: (i,sent) (sent,a) (a,client) (client,a) (a,quote) (quote,today) -> 5/6 in the prompt
    assert restatement_overlap("I sent a client a quote today", prompt) == pytest.approx(5 / 6)
    assert restates("I sent a client a quote today", prompt)
    assert restates("Here's a revised version of your text: hello there friend", prompt)  # edit marker
    assert not restates("That is wonderful news, congratulations on the new work!", prompt)
    assert restatement_overlap("", prompt) == 0.0
    assert names_emotion("I feel so ANGRY about it.", "anger")
    assert names_emotion("Sadly, no.", "sadness")
    assert not names_emotion("I am furious.", "anger")  # a synonym is not the emotion's name
    assert not names_emotion("Happy-go-lucky? no, just sad", "happiness") is False  # 'happy' token present
    with pytest.raises(InputError):
        names_emotion("x", "joy")


def test_retention_answer_matching():
    assert answer_correct("The capital of France is Paris.", ["Paris"])
    assert answer_correct("It is 13.", ["13", "thirteen"])
    assert not answer_correct("It is 130.", ["13"])
    assert answer_correct("Twenty-five.", ["25", "twenty-five"])


def test_side_effect_card_and_selection_rule():
    prompts = ["I sent a client a quote for the renovation.", "My train was late again today."]
    replies = ["I sent a client a quote for the renovation.", "I am so angry that the train was late!"]
    card = side_effect_card("circuit", prompts, replies, ["anger", "anger"], ppl=6.0, ppl_base=2.0,
                            retention=0.7, retention_base=0.9)
    assert card.restate_rate == 0.5 and card.name_rate == 0.5
    assert card.ppl_ratio == pytest.approx(3.0)
    assert card.retention_drop == pytest.approx(0.2)
    fails = card.failures(Guards())
    assert len(fails) == 3 and any("restate" in f for f in fails) and any("retention" in f for f in fails)
    assert card.passes(Guards(max_restate=0.5, max_name=0.5, max_retention_drop=0.25))
    g = Guards()
    good = SideEffectCard("s", 10, 3.0, 1.0, 0.8, 0.1, 0.1, 0.8, 0.85)
    bad = SideEffectCard("s", 10, 9.0, 1.0, 0.8, 0.1, 0.1, 0.8, 0.85)  # ppl ratio 9
    rows = [{"value": 1.0, "accuracy": 0.3, "card": good}, {"value": 4.0, "accuracy": 0.9, "card": bad},
            {"value": 2.0, "accuracy": 0.3, "card": good}]
    assert select_operating_point(rows, g)["value"] == 1.0  # best passing; tie -> weaker
    assert select_operating_point([rows[1]], g) is None
    assert Guards.from_dict(g.to_dict()) == g


def test_per_emotion_mix_picks_family_and_scale_under_per_emotion_guards():
    from emolens.circuits.control import per_emotion_choice, per_emotion_mix

    ok = SideEffectCard("s", 12, 3.0, 1.0, 0.8, 0.1, 0.1, 0.40, 0.42)
    lost = SideEffectCard("s", 12, 3.0, 1.0, 0.8, 0.1, 0.1, 0.20, 0.42)  # retention -22 points
    rows = {
        # the story payload is best for disgust and passes there ...
        "disgust": [{"method": "circuit_blend", "value": 2.0, "accuracy": 0.25, "card": ok},
                    {"method": "circuit_story", "value": 3.0, "accuracy": 0.83, "card": ok}],
        # ... but fails retention for anger, so the blend is chosen although it is less accurate
        "anger": [{"method": "circuit_blend", "value": 2.0, "accuracy": 0.67, "card": ok},
                  {"method": "circuit_story", "value": 3.0, "accuracy": 0.90, "card": lost}],
        # a tie in accuracy and value: the earlier row (family order) wins
        "sadness": [{"method": "circuit_blend", "value": 2.0, "accuracy": 0.5, "card": ok},
                    {"method": "circuit_story", "value": 2.0, "accuracy": 0.5, "card": ok}],
        # nothing passes: the default
        "fear": [{"method": "circuit_story", "value": 4.0, "accuracy": 0.1, "card": lost}],
    }
    got = per_emotion_mix(rows, Guards(), ("circuit_blend", 1.75))
    assert got == {"disgust": ("circuit_story", 3.0), "anger": ("circuit_blend", 2.0),
                   "sadness": ("circuit_blend", 2.0), "fear": ("circuit_blend", 1.75)}
    # per_emotion_choice is the one-family case of the same rule
    one = {e: [{k: v for k, v in r.items() if k != "method"} for r in rs] for e, rs in rows.items()}
    assert per_emotion_choice(one, Guards(), 1.5) == {"disgust": 3.0, "anger": 2.0, "sadness": 2.0, "fear": 1.5}


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "steering,circuit,circuit_mix", "--mix-families", "circuit,circuit_blend"], "--mix-families"),
    (["--methods", "steering,circuit,circuit_mix", "--mix-families", ""], "--mix-families"),
    (["--methods", "steering,circiut"], "unknown ['circiut']"),
    (["--methods", "circuit,circuit_blend"], "steering and circuit are required"),
    (["--focus-heads", "0"], "--focus-heads 0: pass a positive number"),
])
def test_control_benchmark_rejects_bad_arguments_before_loading_anything(argv, needle):
    # benchmarks/control.py checks --methods / --mix-families / --focus-heads right after parsing (a typo costs
    # seconds, not a model load and an analysis); the message names the fix
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "control.py"
    p = subprocess.run([sys.executable, str(script), *argv, "--out", "/nonexistent/never-written"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert needle in p.stderr and "Loading" not in p.stderr, p.stderr[-2000:]


# ----------------------------------------------------------------------------- circuit attention viz
def test_circuit_attention_section_patterns_match_bridge_cache(tiny_llama):
    import torch

    from emolens.circuits.assembly import Circuit
    from emolens.report import ReportView
    from emolens.viz.circuit_attention import circuit_attention_section, reply_head_patterns, top_circuit_heads

    m = tiny_llama
    dims = {"name": m.name, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_head": m.d_head, "d_mlp": m.d_mlp,
            "d_model": m.d_model}
    c = Circuit("anger", dims, {0: [1]}, {0: [0, 2], 2: [1]})
    scores = torch.zeros(m.n_layers, m.n_heads)
    scores[0, 2], scores[2, 1], scores[0, 0] = 3.0, 2.0, 1.0
    assert top_circuit_heads(c, scores, k=2) == [(0, 2), (2, 1)]
    assert top_circuit_heads(c, None, k=1) == [(2, 1)]  # no scores: deepest layer first

    view = reply_head_patterns(m, "hello there", "general kenobi", [(0, 2), (2, 1)], max_tokens=None)
    b = m.encode(["hello there"], continuations=["general kenobi"])
    with torch.no_grad():
        _, cache = m.bridge.run_with_cache(b.input_ids, attention_mask=b.attention_mask)
    off = int(b.pad_offset[0])
    for i, (L, h) in enumerate([(0, 2), (2, 1)]):
        ref = cache[f"blocks.{L}.attn.hook_pattern"][0, h, off:, off:].float()
        torch.testing.assert_close(view.pattern[i], ref, atol=1e-5, rtol=1e-4)
    assert len(view.tokens) == b.input_ids.shape[1] - off
    short = reply_head_patterns(m, "hello there", "general kenobi", [(0, 2)], max_tokens=3)
    assert short.pattern.shape == (1, 3, 3) and short.tokens == view.tokens[-3:]

    sec = circuit_attention_section(m, {"anger": c}, {"anger": ("hello there", "general kenobi")},
                                    head_scores=scores, k=2)
    assert len(sec.figures) == 1 and sec.tables[0][1]["heads"].tolist() == ["L0H2, L2H1"]
    html = ReportView([sec], title="t")._repr_html_()
    assert "CircuitsVis.render" in html and "unpkg.com" not in html
    with pytest.raises(InputError):
        circuit_attention_section(m, {"anger": c}, {"fear": ("x", "y")})


# ----------------------------------------------------------------------------- control variants
def test_confound_basis_hand_case():
    import torch

    from emolens.circuits.control import confound_basis

    # variance 9 along e0, 1 along e1, 0 elsewhere: 90 % on e0
    acts = torch.tensor([[3.0, 1.0, 0.0], [-3.0, -1.0, 0.0], [3.0, -1.0, 0.0], [-3.0, 1.0, 0.0]])
    b = confound_basis(acts, var_frac=0.5)
    assert b.shape == (1, 3)
    torch.testing.assert_close(b[0].abs(), torch.tensor([1.0, 0.0, 0.0]))
    assert confound_basis(acts, var_frac=0.95).shape[0] == 2
    assert confound_basis(acts, var_frac=0.95, max_k=1).shape[0] == 1


def test_story_directions_unit_centred_and_confound_free(tiny_llama):
    import torch

    from emolens.circuits.control import confound_basis, story_directions
    from emolens.capture import capture
    from emolens.sites import Pos, resid

    m = tiny_llama
    emos = ("anger", "sadness")
    stories = [("he shouted and slammed the door", "anger"), ("they lied and I yelled", "anger"),
               ("she cried alone at the grave", "sadness"), ("the empty chair at dinner", "sadness")]
    neutral = ["the bus leaves at nine", "bring the report on tuesday", "the shop sells bread and milk"]
    d = story_directions(m, neutral, stories=stories, emotions=emos, var_frac=0.5)
    assert tuple(d.scores.shape) == (2, m.n_layers, 2, m.d_model)
    torch.testing.assert_close(d.scores.norm(dim=-1), torch.ones(2, m.n_layers, 2), atol=1e-4, rtol=0)
    # two emotions, centred: the directions are opposite
    torch.testing.assert_close(d.scores[0], -d.scores[1], atol=1e-4, rtol=0)
    # independent recomputation of the confound basis at one layer: the direction is orthogonal to it
    L = m.n_layers - 1
    neu = capture(m, neutral, [resid(L, "post")], pos=Pos.prompt(), reduce="group_mean", groups=list(range(3)),
                  progress=False)
    basis = confound_basis(neu[str(resid(L, "post"))].double(), 0.5, 8).float()
    assert basis.shape[0] == d.meta["n_confound"][L] >= 1
    assert (basis @ d.scores[0, L, 1]).abs().max() < 1e-4


def test_text_difference_vectors_match_a_per_text_reference(tiny_llama):
    """Token-averaged group means, centred across emotions, recomputed text by text from the bridge cache."""
    import torch

    from emolens.circuits.control import text_difference_vectors

    m = tiny_llama
    texts = ["he shouted and slammed the door", "they lied and I yelled at them", "she cried alone at the grave",
             "a picnic in the sun", "the empty chair at dinner"]
    labels = ["anger", "anger", "sadness", "neutral", "sadness"]  # 'neutral' is not an emotion asked for: ignored
    emos = ("anger", "sadness")
    mn, z = text_difference_vectors(m, texts, labels, emotions=emos, batch_size=2)
    assert mn.kind == "neurons" and tuple(mn.scores.shape) == (2, m.n_layers, m.d_mlp)
    assert z.kind == "head_vectors" and tuple(z.scores.shape) == (2, m.n_layers, m.n_heads, m.d_head)
    # reference: one text at a time, no padding, sum over its tokens
    sums = {e: [torch.zeros(m.n_layers, m.d_mlp, dtype=torch.float64), 0] for e in emos}
    for t, e in zip(texts, labels):
        if e not in emos:
            continue
        ids = m.tokenizer(t, return_tensors="pt").input_ids
        _, cache = m.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("mlp.hook_post"))
        for l in range(m.n_layers):
            sums[e][0][l] += cache[f"blocks.{l}.mlp.hook_post"][0].double().sum(0)
        sums[e][1] += ids.shape[1]
    means = torch.stack([sums[e][0] / sums[e][1] for e in emos])
    ref = means - means.mean(0, keepdim=True)
    torch.testing.assert_close(mn.scores.double(), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="one each"):
        text_difference_vectors(m, texts, labels[:2], emotions=emos)
    with pytest.raises(InputError, match="no texts labelled"):
        text_difference_vectors(m, texts, labels, emotions=("anger", "fear"))


def test_name_confound_removed_hand_case():
    import torch

    from emolens.circuits.control import name_confound_removed
    from emolens.results import Result

    v = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # [emotion=1, layer=2, d=2]
    c = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # layer 1: zero confound -> unchanged
    mk = lambda s: Result("neurons", s, ("emotion", "layer", "neuron"), {"emotion": ["joy"]}, {}, {})  # noqa: E731
    out = name_confound_removed(mk(v), mk(c))
    torch.testing.assert_close(out.scores, torch.tensor([[[0.0, 4.0], [1.0, 0.0]]]))
    assert out.meta["confound_removed"] is True
    with pytest.raises(InputError, match="same model"):
        name_confound_removed(mk(v), mk(c[:, :1]))


def test_blend_payloads_hand_case_and_equals_two_modulations(tiny_llama):
    """a + w*b by hand; modulating with the blend at s equals modulating with a at s and b at s*w together."""
    import torch

    from emolens.circuits.assembly import DIMS, Circuit
    from emolens.circuits.control import blend_payloads
    from emolens.circuits.modulation import modulation_interventions
    from emolens.results import Result

    mk = lambda kind, s, axes: Result(kind, s, axes, {"emotion": ["anger", "fear"]}, {}, {})  # noqa: E731
    a = mk("neurons", torch.tensor([[[1.0, 2.0]], [[0.0, -1.0]]]), ("emotion", "layer", "neuron"))
    b = mk("neurons", torch.tensor([[[4.0, 0.0]], [[2.0, 2.0]]]), ("emotion", "layer", "neuron"))
    torch.testing.assert_close(blend_payloads(a, b, 0.5).scores, torch.tensor([[[3.0, 2.0]], [[1.0, 0.0]]]))
    with pytest.raises(InputError, match="same model"):
        blend_payloads(a, mk("neurons", torch.zeros(2, 2, 2), ("emotion", "layer", "neuron")), 1.0)
    with pytest.raises(InputError, match="different emotions"):
        blend_payloads(a, Result("neurons", b.scores, b.axes, {"emotion": ["fear", "anger"]}, {}, {}), 1.0)
    with pytest.raises(InputError, match="NaN"):
        blend_payloads(a, b, float("nan"))

    m = tiny_llama
    g = torch.Generator().manual_seed(0)
    E = ["anger", "fear"]
    pay = lambda: (  # noqa: E731
        Result("neurons", torch.randn(2, m.n_layers, m.d_mlp, generator=g), ("emotion", "layer", "neuron"),
               {"emotion": E}, {}, {}),
        Result("head_vectors", torch.randn(2, m.n_layers, m.n_heads, m.d_head, generator=g),
               ("emotion", "layer", "head", "dim"), {"emotion": E}, {}, {}))
    (am, aa), (bm, ba) = pay(), pay()
    circ = Circuit("fear", {k: getattr(m, k) for k in DIMS} | {"name": m.name}, {0: [1, 3], m.n_layers - 1: [0]},
                   {1: [0, m.n_heads - 1]})
    w, s = 0.5, 2.0
    one = modulation_interventions(m, circ, blend_payloads(am, bm, w), blend_payloads(aa, ba, w), s)
    two = modulation_interventions(m, circ, am, aa, s) + modulation_interventions(m, circ, bm, ba, s * w)
    prompts = ["I lost my keys again today", "The train was late"]
    base = m.forward(prompts)
    lo, lt = m.forward(prompts, interventions=one), m.forward(prompts, interventions=two)
    assert (lo - base).abs().max() > 1e-3  # the payload does something
    torch.testing.assert_close(lo, lt, atol=1e-4, rtol=1e-4)


def test_valence_arousal_axes_recover_a_planar_payload_and_reject_bad_input():
    """A payload built exactly as b + v V + a A is recovered (axes and every emotion's payload); a payload off the
    plane is replaced by its least-squares projection (residual orthogonal to the coordinate columns)."""
    import torch

    from emolens.circuits.control import VA_COORDS, valence_arousal_axes, valence_arousal_payload
    from emolens.results import Result

    E = list(VA_COORDS)
    g = torch.Generator().manual_seed(1)
    b, V, A = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    c = torch.tensor([VA_COORDS[e] for e in E], dtype=torch.float64)
    planar = b + c[:, 0, None, None] * V + c[:, 1, None, None] * A  # [E, 3, 5]
    dmu = Result("neurons", planar, ("emotion", "layer", "neuron"), {"emotion": E}, {}, {"method": "x"})
    ax = valence_arousal_axes(dmu)
    assert ax.axes == ("axis", "layer", "neuron") and ax.labels["axis"] == ["intercept", "valence", "arousal"]
    torch.testing.assert_close(ax.scores.double(), torch.stack([b, V, A]), atol=1e-5, rtol=1e-5)
    back = valence_arousal_payload(ax, {e: VA_COORDS[e] for e in E})
    torch.testing.assert_close(back.scores.double(), planar, atol=1e-5, rtol=1e-5)
    # a new point of the plane: b + v V + a A by hand
    calm = valence_arousal_payload(ax, {"calm": (0.5, -0.8)})
    assert calm.labels["emotion"] == ["calm"]
    torch.testing.assert_close(calm.scores[0].double(), b + 0.5 * V - 0.8 * A, atol=1e-5, rtol=1e-5)

    noisy = planar + torch.randn(planar.shape, generator=g, dtype=torch.float64)
    proj = valence_arousal_payload(valence_arousal_axes(Result("neurons", noisy, dmu.axes, dmu.labels, {}, {})),
                                   {e: VA_COORDS[e] for e in E}).scores.double()
    design = torch.cat([torch.ones(len(E), 1, dtype=torch.float64), c], 1)
    resid = (noisy - proj).reshape(len(E), -1)
    torch.testing.assert_close(design.T @ resid, torch.zeros(3, resid.shape[1], dtype=torch.float64), atol=1e-4,
                               rtol=0)

    with pytest.raises(InputError, match="coordinates"):
        valence_arousal_axes(dmu, {e: VA_COORDS[e] for e in E[:-1]})
    with pytest.raises(InputError, match="span"):
        valence_arousal_axes(dmu, {e: (0.1 * i, 0.2 * i) for i, e in enumerate(E)})
    with pytest.raises(InputError, match="NaN"):
        valence_arousal_axes(Result("neurons", planar * float("nan"), dmu.axes, dmu.labels, {}, {}))
    with pytest.raises(InputError, match="valence_arousal_axes"):
        valence_arousal_payload(dmu, {"x": (0.0, 0.0)})


def test_focused_heads_keeps_the_k_largest_payload_heads_and_modulates_only_them(tiny_llama):
    """Hand case: the k circuit heads of largest payload norm, no neurons; modulating the focused circuit equals
    modulating the full circuit with every other payload vector zeroed."""
    import torch

    from emolens.circuits.assembly import DIMS, Circuit
    from emolens.circuits.control import focused_heads, reply_modulation_interventions
    from emolens.results import Result

    m = tiny_llama
    E = ["anger", "fear"]
    z = torch.zeros(2, m.n_layers, m.n_heads, m.d_head)
    z[1, 0, 0, 0], z[1, 0, 1, 0], z[1, 1, 0, 0], z[1, 1, m.n_heads - 1, 1] = 1.0, -5.0, 3.0, 4.0
    z[0] = 9.0  # another emotion's payload never matters
    za = Result("head_vectors", z, ("emotion", "layer", "head", "dim"), {"emotion": E}, {}, {})
    zm = Result("neurons", torch.ones(2, m.n_layers, m.d_mlp), ("emotion", "layer", "neuron"), {"emotion": E}, {}, {})
    dims = {k: getattr(m, k) for k in DIMS} | {"name": m.name}
    circ = Circuit("fear", dims, {0: [1, 2]}, {0: [0, 1], 1: [0, m.n_heads - 1]})
    f = focused_heads(circ, za, 2)
    assert f.neurons == {} and f.heads == {0: [1], 1: [m.n_heads - 1]}  # norms 5 and 4 beat 3 and 1
    assert f.alloc["focused_heads"] == 2 and f.emotion == "fear"
    assert focused_heads(circ, za, 3).heads == {0: [1], 1: [m.n_heads - 1, 0]}
    assert focused_heads(circ, za, 99).n_heads == 4

    keep = torch.zeros_like(z)
    keep[1, 0, 1], keep[1, 1, m.n_heads - 1] = z[1, 0, 1], z[1, 1, m.n_heads - 1]
    ref = reply_modulation_interventions(m, Circuit("fear", dims, {}, circ.heads),
                                         zm, Result("head_vectors", keep, za.axes, za.labels, {}, {}), 2.0)
    mine = reply_modulation_interventions(m, f, zm, za, 2.0)
    prompts = ["I lost my keys again today", "The train was late"]
    base = m.forward(prompts)
    lf, lr = m.forward(prompts, interventions=mine), m.forward(prompts, interventions=ref)
    assert (lf - base).abs().max() > 1e-3
    torch.testing.assert_close(lf, lr, atol=1e-5, rtol=1e-5)

    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="positive integer"):
            focused_heads(circ, za, bad)
    with pytest.raises(InputError, match="head_vectors"):
        focused_heads(circ, zm, 2)
    with pytest.raises(InputError, match="NaN"):
        focused_heads(circ, Result("head_vectors", z * float("nan"), za.axes, za.labels, {}, {}), 2)
