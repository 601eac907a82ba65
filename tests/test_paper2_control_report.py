"""Paper 2's issue-10 report parts on tiny-llama: every method judged by the judge ensemble (Wilson intervals,
majority vote, kappa), side-effect cards, example replies, and the circuit-head attention widgets (offline)."""

from __future__ import annotations

import json
import math
import re
import shutil

import pandas as pd
import pytest

import emolens.pipelines.paper2 as P2
from emolens import report
from emolens.evaluate.agreement import JudgeEnsemble
from emolens.evaluate.judges import Judge, Verdict
from emolens.pipelines.paper2 import Paper2Config, ensemble_tables, run
from emolens.results import Result

from conftest import get_model

EMOS = ("anger", "happiness", "fear")
NEW_STEPS = ("eval_unsteered_texts", "ensemble", "side_effects", "circuit_attention")
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def hand_wilson(k: int, n: int) -> tuple[float, float]:
    p = k / n
    c = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    h = Z95 / (1 + Z95 ** 2 / n) * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n))
    return max(0.0, c - h), min(1.0, c + h)


def cfg(**kw) -> Paper2Config:
    return Paper2Config.for_model("tiny-llama").replace(emotions=EMOS, **kw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("p2")
    secs = run(get_model("tiny-llama"), out, config=cfg(), progress=False)
    return out, secs


def _section(secs, start):
    return [s for s in secs if s.title.startswith(start)][0]


def test_config_and_quick_retention_subset():
    q = Paper2Config.for_model("smollm2-135m-instruct").quick()
    assert q.retention_questions == 12 and Paper2Config().retention_questions is None  # full: all 50
    assert Paper2Config().ensemble_judges == ("nrc", "nade", "probe")
    from emolens.errors import InputError

    with pytest.raises(InputError, match="ensemble_judges"):
        Paper2Config().replace(ensemble_judges=("nrc", "gpt"))
    with pytest.raises(InputError, match="judge_url"):
        Paper2Config().replace(ensemble_judges=("nrc", "openai"))
    qa = P2._retention_qa(q)
    assert len(qa) == 12 and len({x["question"] for x in qa}) == 12


def test_ensemble_outputs_every_method_with_wilson_intervals(tiny_run):
    out, secs = tiny_run
    root = out / "paper2"
    allf = pd.read_parquet(root / "ensemble.parquet")
    n_rows = cfg().test_max_records * 3 * len(EMOS)  # items (records x valences) x emotions
    assert list(dict.fromkeys(allf["method"])) == ["unsteered", "prompting", "steering", "circuit"]
    assert (allf.groupby("method").size() == n_rows).all()
    # the unsteered baseline: one reply per item, the same for its emotion rows
    un = allf[allf["method"] == "unsteered"]
    assert (un.groupby(["skeleton_id", "valence"])["text"].nunique() == 1).all()
    # majority = strictly more than half of the three judges, recomputed from the judges' columns
    votes = allf[["nrc_match", "nade_match", "probe_match"]].sum(1)
    assert (allf["majority"] == (votes >= 2)).all()
    acc = pd.read_parquet(root / "ensemble_accuracy.parquet")
    sec = _section(secs, "Step 9")
    tables = dict(ensemble_tables(acc))
    for m in ("unsteered", "circuit"):
        for e in ("anger", "fear"):
            for j in ("nade", "majority"):
                col = "majority" if j == "majority" else f"{j}_match"
                g = allf[(allf["method"] == m) & (allf["target"] == e)]
                k, n = int(g[col].sum()), len(g)
                lo, hi = hand_wilson(k, n)
                row = acc[(acc["method"] == m) & (acc["group"] == e) & (acc["judge"] == j)].iloc[0]
                assert (row.k, row.n) == (k, n) and row.lo == pytest.approx(lo, abs=1e-9) and \
                    row.hi == pytest.approx(hi, abs=1e-9)
                cell = tables[j].set_index("method").loc[m, e]
                assert cell == f"{100 * k / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    caps = [c for c, _ in sec.tables]
    assert [c for c in caps if c.startswith("Accuracy per method")] == [
        f"Accuracy per method and emotion (%), {x}" for x in ("judge nrc", "judge nade", "judge probe",
                                                               "majority vote")]
    ag = json.loads((root / "ensemble_agreement.json").read_text())
    assert ag["n"] == 4 * n_rows and len(ag["pairs"]) == 3
    # example replies: every method, the first inputs under every emotion
    ex = [t for c, t in sec.tables if c.startswith("Example replies")]
    assert len(ex) == 4 and all(len(t) == cfg().examples_per_emotion * len(EMOS) for t in ex)


def test_wilson_cells_on_a_textbook_case():
    # 3 of 10: Wilson 95 % interval [0.1078, 0.6032] (Newcombe 1998, method 3); 0 of 8: [0, 0.3244]
    acc = pd.DataFrame([{"group": "anger", "judge": "majority", "k": 3, "n": 10, "acc": 0.3, "lo": 0.10779,
                         "hi": 0.60322, "method": "circuit"},
                        {"group": "overall", "judge": "majority", "k": 3, "n": 10, "acc": 0.3, "lo": 0.10779,
                         "hi": 0.60322, "method": "circuit"}])
    t = ensemble_tables(acc)["majority"]
    assert t.loc[0, "anger"] == "30.0 [10.8, 60.3]" and t.loc[0, "n"] == 10
    from emolens.evaluate.agreement import accuracy_table

    f = pd.DataFrame({"target": ["anger"] * 10 + ["fear"] * 8, "m": [True] * 3 + [False] * 15})
    a = accuracy_table(f, ["m"], by="target")
    assert a.iloc[0][["lo", "hi"]].tolist() == pytest.approx([0.10779, 0.60322], abs=5e-5)
    assert a.iloc[1][["lo", "hi"]].tolist() == pytest.approx([0.0, 0.32441], abs=5e-5)


class _TargetJudge(Judge):
    """Hand-made judge: a reply matches when its target is in ``yes`` (whatever the text)."""

    def __init__(self, yes):
        self.yes = set(yes)

    def judge(self, texts, targets):
        return [Verdict(t in self.yes, t if t in self.yes else "none", 1.0) for t in targets]


def test_majority_vote_table_on_hand_made_judges(tiny_run, monkeypatch, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run[0], out)  # the module's run folder stays as it was
    # a: anger+happiness, b: anger, c: happiness+fear -> majority: anger yes (a,b), happiness yes (a,c), fear no (c)
    ens = JudgeEnsemble({"a": _TargetJudge({"anger", "happiness"}), "b": _TargetJudge({"anger"}),
                         "c": _TargetJudge({"happiness", "fear"})})
    monkeypatch.setattr(P2, "make_ensemble", lambda c, reuse=None: ens)
    log = {}
    secs = run(get_model("tiny-llama"), out, config=cfg(ensemble_judges=("nrc", "nade")), progress=False,
               on_step=lambda e: log.__setitem__(e.step, e.status))
    assert log["ensemble"] == "computed" and log["side_effects"] == "reused" and log["circuits"] == "reused"
    t = {c: x for c, x in _section(secs, "Step 9").tables}
    maj = t["Accuracy per method and emotion (%), majority vote"].set_index("method")
    n = cfg().test_max_records * 3
    lo0, hi0 = hand_wilson(0, n)
    lo1, hi1 = hand_wilson(n, n)
    for m in ("unsteered", "prompting", "steering", "circuit"):
        assert maj.loc[m, "anger"] == maj.loc[m, "happiness"] == f"100.0 [{100 * lo1:.1f}, {100 * hi1:.1f}]"
        assert maj.loc[m, "fear"] == f"0.0 [{100 * lo0:.1f}, {100 * hi0:.1f}]"
        assert maj.loc[m, "n"] == 3 * n
    b = t["Accuracy per method and emotion (%), judge b"].set_index("method")
    assert b.loc["circuit", "happiness"] == f"0.0 [{100 * lo0:.1f}, {100 * hi0:.1f}]"
    pairs = t[[c for c in t if c.startswith("Judge agreement")][0]]
    ab = pairs[(pairs["judge_a"] == "a") & (pairs["judge_b"] == "b")].iloc[0]
    # a vs b over equal numbers of the three targets: agree on anger (both yes) and fear (both no) -> 2/3;
    # p_e = (2/3)(1/3) + (1/3)(2/3) = 4/9 -> kappa = (2/3 - 4/9) / (5/9) = 0.4
    assert ab["agreement"] == pytest.approx(2 / 3, abs=1e-3) and ab["kappa"] == pytest.approx(0.4, abs=1e-3)


def test_side_effect_cards(tiny_run):
    out, secs = tiny_run
    root = out / "paper2"
    card = pd.read_parquet(root / "side_effects.parquet").set_index("method")
    info = json.loads((root / "side_effect_cards.json").read_text())
    rr = pd.read_parquet(root / "retention_replies.parquet")
    assert list(card.index) == ["unsteered", "prompting", "steering", "circuit"]
    assert info["retention_questions"] == cfg().retention_questions == 4
    assert (rr.groupby("method").size() == 4).all()
    # retention: the share of correct answers among the saved replies; drop relative to unsteered
    for m in card.index:
        r = 100 * rr[rr["method"] == m]["correct"].mean()
        assert card.loc[m, "retention_%"] == pytest.approx(r, abs=0.05)
        assert card.loc[m, "retention_drop_pts"] == pytest.approx(card.loc["unsteered", "retention_%"] - r, abs=0.1)
    assert card.loc["unsteered", "ppl_ratio"] == 1.0
    # the prompting retention questions carry the emotion prompt, the others the neutral system prompt
    ens = pd.read_parquet(root / "ensemble.parquet")
    for m in ("steering", "circuit"):
        texts = ens[ens["method"] == m]
        from emolens.evaluate.side_effects import names_emotion

        rate = 100 * sum(names_emotion(t, e) for t, e in zip(texts["text"], texts["target"])) / len(texts)
        assert card.loc[m, "names_emotion_%"] == pytest.approx(rate, abs=0.05)
    sec = _section(secs, "Step 10")
    assert any("a subset" in p and "quick mode" in p for p in sec.text)


def test_report_has_new_sections_and_offline_circuitsvis(tiny_run, tmp_path):
    out, secs = tiny_run
    titles = [s.title for s in secs]
    i = titles.index("Step 4: local components (neurons and heads) and their ablation / enhancement")
    assert titles[i + 1].startswith("Circuit heads: attention patterns")  # next to the head/neuron heatmaps
    assert any(t.startswith("Step 9") for t in titles) and any(t.startswith("Step 10") for t in titles)
    att = Result.load(out / "paper2" / "circuit_attention" / "fear")
    assert att.axes == ("head", "query", "key") and att.shape[0] == cfg().attention_top_heads
    # causal probabilities over the shown window (the last positions): no future keys, rows sum to <= 1
    assert att.scores.triu(1).abs().max() == 0 and (att.scores.sum(-1) <= 1 + 1e-5).all()
    assert att.labels["query"] == att.labels["key"] and len(att.labels["query"]) == cfg().attention_max_tokens
    path = report.write_report(secs, tmp_path / "r")
    h = path.read_text()
    for t in ("Step 9: every method judged", "Step 10: side-effect card", "Circuit heads: attention patterns"):
        assert t in h
    assert h.count('data-emolens="circuitsvis-bundle"') == 1 and h.count("CircuitsVis.render(") == len(EMOS)
    assert re.search(r"<script[^>]*\ssrc=", h) is None and "unpkg.com" not in h
    assert re.search(r"<link[^>]*href=\"?https?:", h) is None


def test_resume_reuses_the_new_steps(tiny_run):
    out, _ = tiny_run
    log = {}
    run(get_model("tiny-llama"), out, config=cfg(), progress=False, on_step=lambda e: log.__setitem__(e.step, e))
    assert all(log[s].status == "reused" for s in NEW_STEPS), {s: log[s].reason for s in NEW_STEPS}
    log.clear()
    run(get_model("tiny-llama"), out, config=cfg(retention_questions=2), progress=False,
        on_step=lambda e: log.__setitem__(e.step, e))
    assert log["side_effects"].status == "computed" and "retention_questions" in log["side_effects"].reason
    assert all(log[s].status == "reused" for s in ("ensemble", "circuit_attention", "eval_unsteered_texts"))


@pytest.mark.browser
def test_paper2_report_renders_offline_in_chromium(tiny_run, tmp_path):
    import browser_check
    from test_report import _need_browser

    _need_browser()
    out, secs = tiny_run
    path = report.write_report(secs, tmp_path / "r")
    with browser_check.Browser() as b:
        res = browser_check.check_page(path, browser=b)
    assert not res.external_requests and not res.console_errors, res.summary()
    assert [f["kind"] for f in res.figures].count("circuitsvis") == len(EMOS), res.summary()
    assert all(f["ok"] for f in res.figures), res.summary()


def test_corpus_perplexity_scores_repeats_once_with_the_same_value():
    import math

    from emolens.evaluate.fluency import corpus_perplexity, reply_nll

    m = get_model("tiny-llama")
    prompts = ["I lost my keys.", "I lost my keys.", "I won a prize.", "I lost my keys.", "I won a prize."]
    texts = ["Oh no, that is bad.", "Oh no, that is bad.", "Great news!", "Keep looking.", "Great news!"]
    nll, n = reply_nll(m, prompts, texts)  # independent reference: every row scored
    want = math.exp(float(nll.sum()) / float(n.sum()))
    assert corpus_perplexity(m, prompts, texts) == pytest.approx(want, rel=1e-6)
    assert corpus_perplexity(m, prompts[:3], texts[:3]) != pytest.approx(want, rel=1e-3)  # the weights matter
