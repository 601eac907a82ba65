"""Tests for emolens.evaluate.lexicon and emolens.evaluate.stats (fast, no model)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from emolens.errors import EmolensError, InputError
from emolens.evaluate import (
    NRC_CATEGORIES,
    bootstrap_ci,
    distinct_n,
    first_person_rate,
    holm,
    nrc_rates,
    paired_test,
    results_table,
    score_texts,
    tokenize,
    vader_compound,
)
from emolens.evaluate.lexicon import first_person_pronouns

JOYFUL = [
    "I am so happy and delighted today! We won the prize and everyone is celebrating with laughter and love.",
    "What a wonderful, cheerful morning; my friends threw me a lovely surprise party and I adore them.",
    "We laughed and sang together, full of joy, and the whole family felt blessed.",
]
ANGRY = [
    "I am furious and outraged. This is infuriating, I hate how they lied to us and I want to scream at them.",
    "You are a disgraceful liar and I am angry that you cheated everyone again.",
    "He raged at the stupid, hateful jerks who wrecked his car and attacked his brother.",
]
NEUTRAL = [
    "The meeting is scheduled for Tuesday at 3 pm in room 204. Please bring the quarterly report.",
    "The bus stops at platform six at ten past nine.",
    "Add two cups of water to the pot and set the timer for twelve minutes.",
]


# ----------------------------------------------------------------------------- tokenizer / lexicon


def test_tokenize_contractions_and_apostrophes():
    assert tokenize("I'm SO happy, don't you think?") == ["i'm", "so", "happy", "don't", "you", "think"]
    # curly apostrophes are normalised; trailing possessive apostrophes and hyphens split cleanly
    assert tokenize("I\u2019ve seen the students' well-being") == ["i've", "seen", "the", "students", "well", "being"]
    assert tokenize("") == []


def test_nrc_rates_hand_computed():
    # love: joy, positive | friend: joy, positive, trust | rage: anger, negative | my, table: none
    df = nrc_rates(["I love my friend rage table"])
    assert list(df.columns) == list(NRC_CATEGORIES)
    row = df.iloc[0]
    assert row["joy"] == pytest.approx(2 / 6)
    assert row["positive"] == pytest.approx(2 / 6)
    assert row["trust"] == pytest.approx(1 / 6)
    assert row["anger"] == pytest.approx(1 / 6)
    assert row["negative"] == pytest.approx(1 / 6)
    assert row["fear"] == 0 and row["sadness"] == 0 and row["disgust"] == 0


def test_nrc_suffix_fallback_and_empty_text():
    # "celebrating" -> celebrate, "cried" -> cry: inflected forms still count
    df = nrc_rates(["celebrating", "cried", ""])
    assert df.loc[0, "joy"] == 1.0
    assert df.loc[1, "sadness"] == 1.0
    assert (df.loc[2] == 0).all()  # no tokens -> all zero, not NaN


def test_scorer_ordering_joyful_angry_neutral():
    joy = score_texts(JOYFUL)
    ang = score_texts(ANGRY)
    neu = score_texts(NEUTRAL)
    # joy/trust and positive: joyful > neutral, joyful > angry
    assert joy["joy_trust"].mean() > ang["joy_trust"].mean()
    assert joy["joy_trust"].mean() > neu["joy_trust"].mean()
    assert joy["positive"].mean() > ang["positive"].mean()
    # anger/negative: angry > both others
    assert ang["anger"].mean() > joy["anger"].mean()
    assert ang["anger"].mean() > neu["anger"].mean()
    assert ang["negative"].mean() > max(joy["negative"].mean(), neu["negative"].mean())
    # these neutral texts carry no emotion words at all
    assert neu[["anger", "fear", "sadness", "disgust", "joy"]].to_numpy().sum() == 0
    # VADER: joyful > neutral > angry, per text
    v_joy, v_ang, v_neu = vader_compound(JOYFUL), vader_compound(ANGRY), vader_compound(NEUTRAL)
    assert (v_joy > 0.5).all() and (v_ang < -0.5).all()
    assert v_joy.min() > v_neu.max() > v_neu.min() > v_ang.max()


def test_score_texts_columns_and_joy_trust():
    df = score_texts(JOYFUL + ANGRY)
    expected = ["n_tokens", *NRC_CATEGORIES, "joy_trust", "vader_compound", "first_person_rate", "distinct_1", "distinct_2"]
    assert list(df.columns) == expected
    assert len(df) == 6
    np.testing.assert_allclose(df["joy_trust"], df["joy"] + df["trust"])
    assert df.loc[0, "n_tokens"] == 19


def test_first_person_rate_hand_computed():
    assert set(first_person_pronouns()) == {"i", "me", "my", "mine", "myself", "i'm", "i've", "i'd", "i'll"}
    rates = first_person_rate([
        "I think my dog likes me.",  # i, my, me of 6 tokens
        "I\u2019m sure it's mine, myself.",  # i'm, mine, myself of 5 tokens (curly apostrophe)
        "We went to their house.",  # plural / third person: 0
        "",  # no tokens -> 0
    ])
    np.testing.assert_allclose(rates, [3 / 6, 3 / 5, 0.0, 0.0])


def test_distinct_n_hand_computed():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    # corpus level: n-grams never cross texts; "a b" appears in both texts
    assert distinct_n(["a b", "a b c"], 2) == pytest.approx(2 / 3)
    per = distinct_n(["a a a", "x", "p q r"], 2, per_text=True)
    assert per[0] == pytest.approx(1 / 2) and math.isnan(per[1]) and per[2] == 1.0
    with pytest.raises(InputError):
        distinct_n(["a b"], 0)


@pytest.mark.parametrize("fn", [nrc_rates, vader_compound, first_person_rate, score_texts, lambda t: distinct_n(t, 2)])
def test_scorers_reject_empty_and_non_strings(fn):
    with pytest.raises(InputError, match="pass a non-empty list"):
        fn([])
    with pytest.raises(InputError, match="not str"):
        fn(["ok", 3])


def test_single_string_is_one_text():
    assert len(score_texts("I am happy.")) == 1


# ----------------------------------------------------------------------------- stats

A = [2.1, 3.4, 1.9, 5.0, 4.2, 3.3]
B = [1.8, 2.9, 2.2, 4.1, 3.5, 3.0]


def test_paired_test_matches_scipy_and_hand_values():
    r = paired_test(A, B)
    # by hand: d = [.3, .5, -.3, .9, .7, .3], mean .4, sd (ddof 1) = sqrt(.86/5)
    sd = math.sqrt(0.86 / 5)
    assert r.n == 6
    assert r.mean_diff == pytest.approx(0.4)
    assert r.cohens_dz == pytest.approx(0.4 / sd)
    assert r.t == pytest.approx(0.4 / sd * math.sqrt(6))
    ref_t = st.ttest_rel(A, B)
    assert r.t == pytest.approx(ref_t.statistic)
    assert r.t_p == pytest.approx(ref_t.pvalue)
    assert r.wilcoxon_p == pytest.approx(st.wilcoxon(A, B).pvalue)
    assert r.mean_a == pytest.approx(np.mean(A)) and r.mean_b == pytest.approx(np.mean(B))
    assert r.ci_low < r.mean_diff < r.ci_high
    assert r.to_dict()["n"] == 6


def test_paired_test_direction_is_a_minus_b():
    r = paired_test(B, A)
    assert r.mean_diff == pytest.approx(-0.4) and r.t < 0 and r.cohens_dz < 0


def test_paired_test_all_zero_differences_is_graceful():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning leaks either
        r = paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (r.mean_diff, r.t, r.t_p, r.wilcoxon_p, r.cohens_dz) == (0.0, 0.0, 1.0, 1.0, 0.0)
    assert (r.ci_low, r.ci_high) == (0.0, 0.0)


def test_paired_test_constant_nonzero_difference():
    r = paired_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert r.mean_diff == 1.0 and r.t == math.inf and r.t_p == 0.0 and r.cohens_dz == math.inf


def test_paired_test_drops_nan_pairs():
    r = paired_test([1.0, np.nan, 3.0, 4.0], [0.5, 1.0, np.nan, 2.0])
    assert r.n == 2 and r.mean_diff == pytest.approx((0.5 + 2.0) / 2)


def test_paired_test_input_errors():
    with pytest.raises(InputError, match="empty"):
        paired_test([], [])
    with pytest.raises(InputError, match="same prompt order"):
        paired_test([1, 2, 3], [1, 2])
    with pytest.raises(InputError, match="at least 2"):
        paired_test([1.0], [2.0])
    with pytest.raises(EmolensError):
        paired_test(["a", "b"], [1, 2])


def test_bootstrap_ci_deterministic_under_seed():
    x = np.random.default_rng(1).normal(1.0, 2.0, size=40)
    a = bootstrap_ci(x, seed=7)
    b = bootstrap_ci(x, seed=7)
    c = bootstrap_ci(x, seed=8)
    assert a == b
    assert a != c
    assert a[0] < x.mean() < a[1]
    # width ~ 2 * 1.96 * s / sqrt(n)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert (a[1] - a[0]) == pytest.approx(2 * 1.96 * se, rel=0.25)
    # narrower level gives a narrower interval
    lo, hi = bootstrap_ci(x, seed=7, level=0.5)
    assert a[0] < lo < hi < a[1]


def test_bootstrap_ci_custom_stat_without_axis():
    x = [1.0, 2.0, 3.0, 4.0, 100.0]
    lo, hi = bootstrap_ci(x, stat=lambda s: float(np.median(s)), n=500, seed=0)
    assert 1.0 <= lo <= 3.0 <= hi <= 100.0
    assert (lo, hi) == bootstrap_ci(x, stat=np.median, n=500, seed=0)


def test_bootstrap_ci_input_errors():
    with pytest.raises(InputError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(InputError, match="NaN"):
        bootstrap_ci([np.nan, np.nan])
    with pytest.raises(InputError):
        bootstrap_ci([1.0, 2.0], level=1.5)


def test_holm():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    out = holm([0.5, np.nan])
    assert out[0] == 0.5 and np.isnan(out[1])


def test_results_table_against_paired_test():
    base = score_texts(NEUTRAL + ANGRY)
    steered = score_texts(JOYFUL + JOYFUL)
    table = results_table({"baseline": base, "joy+4": steered}, baseline="baseline")
    assert table.index.names == ["condition", "metric"]
    assert {"n", "mean", "baseline_mean", "mean_diff", "ci_low", "ci_high", "t", "t_p",
            "wilcoxon_p", "cohens_dz", "t_p_holm"} <= set(table.columns)
    row = table.loc[("joy+4", "joy_trust")]
    ref = paired_test(steered["joy_trust"], base["joy_trust"])
    assert row["mean_diff"] == pytest.approx(ref.mean_diff)
    assert ref.mean_diff > 0
    assert row["t_p"] == pytest.approx(ref.t_p)
    assert row["ci_low"] == pytest.approx(ref.ci_low)
    assert row["t_p_holm"] >= row["t_p"]
    b = table.loc[("baseline", "joy_trust")]
    assert b["mean"] == pytest.approx(base["joy_trust"].mean()) and np.isnan(b["t_p"])
    means = table["mean"].unstack()
    assert means.loc["joy+4", "joy_trust"] > means.loc["baseline", "joy_trust"]


def test_results_table_default_baseline_metrics_and_short_columns():
    base = pd.DataFrame({"x": [1.0, 2.0, 3.0], "d2": [np.nan, np.nan, 1.0], "name": ["a", "b", "c"]})
    cond = pd.DataFrame({"x": [2.0, 2.5, 4.0], "d2": [np.nan, 1.0, 1.0], "name": ["a", "b", "c"]})
    t = results_table({"base": base, "cond": cond})  # first key is the baseline
    assert set(t.index.get_level_values("metric")) == {"x", "d2"}  # non-numeric dropped
    assert np.isnan(t.loc[("cond", "d2"), "t_p"]) and t.loc[("cond", "d2"), "n"] == 1
    assert t.loc[("cond", "x"), "mean_diff"] == pytest.approx(2.5 / 3)


def test_results_table_input_errors():
    df = score_texts(JOYFUL)
    with pytest.raises(InputError, match="empty"):
        results_table({})
    with pytest.raises(InputError, match="baseline"):
        results_table({"a": df, "b": df}, baseline="nope")
    with pytest.raises(InputError, match="same order"):
        results_table({"a": df, "b": df.iloc[:2]})
    with pytest.raises(InputError, match="no rows"):
        results_table({"a": df, "b": df.iloc[:0]})
    with pytest.raises(InputError, match="lacks"):
        results_table({"a": df, "b": df}, metrics=["joy", "nope"])
