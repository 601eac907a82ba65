"""Judge ensembles: agreement (Cohen's / Fleiss' kappa), majority vote, accuracy with Wilson intervals.

One judge's accuracy can be an artefact of that judge (a lexicon that rewards naming the emotion, a
probe that rewards text resembling its training set). :class:`JudgeEnsemble` runs several
independent judges on the same (text, target) pairs, reports how far they agree beyond chance, and
aggregates them by a majority vote on the per-sample ``match`` decisions.

* :func:`wilson_interval` - Wilson score interval of a binomial proportion (no normal-approximation
  collapse at 0 % / 100 %).
* :func:`cohen_kappa` - chance-corrected agreement of two raters over nominal labels.
* :func:`fleiss_kappa` - chance-corrected agreement of ``m`` raters over nominal labels.
* :func:`majority_vote` - a sample matches when more than half of the judges say it matches.
* :func:`accuracy_table` - accuracy, n and Wilson 95 % interval per group and per judge.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _st

from emolens.errors import InputError

from .judges import Judge

__all__ = ["wilson_interval", "cohen_kappa", "cohen_kappa_ci", "fleiss_kappa", "majority_vote", "pairwise_kappa",
           "JudgeEnsemble", "accuracy_table", "intervals_overlap"]


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials.

    ``centre = (p + z^2/2n) / (1 + z^2/n)``, ``half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)``
    with ``z`` the two-sided normal quantile of ``level``. ``n = 0`` gives ``(nan, nan)``.
    """
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise InputError(f"wilson_interval(): need 0 <= k <= n, got k={k}, n={n}")
    if not 0 < level < 1:
        raise InputError(f"wilson_interval(): level must be in (0, 1), got {level}")
    if n == 0:
        return float("nan"), float("nan")
    z = float(_st.norm.ppf(0.5 + level / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Do two closed intervals overlap?"""
    return not (a[1] < b[0] or b[1] < a[0])


def cohen_kappa(a: Sequence, b: Sequence) -> float:
    """Cohen's kappa of two raters over nominal labels: ``(p_o - p_e) / (1 - p_e)``.

    ``p_o`` is the observed agreement; ``p_e = sum_c p_a(c) p_b(c)`` the agreement expected from the
    raters' marginal label frequencies. When both raters use one and the same label throughout
    (``p_e = 1``), kappa is undefined and NaN is returned.
    """
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise InputError(f"cohen_kappa(): {len(a)} vs {len(b)} ratings; pass one label per item from each rater")
    if not a:
        raise InputError("cohen_kappa(): no ratings; pass at least one item")
    n = len(a)
    cats = sorted(set(a) | set(b), key=str)
    po = sum(x == y for x, y in zip(a, b)) / n
    pe = sum((a.count(c) / n) * (b.count(c) / n) for c in cats)
    if pe >= 1.0:
        return float("nan")
    return (po - pe) / (1 - pe)


def cohen_kappa_ci(a: Sequence, b: Sequence, level: float = 0.95, n_boot: int = 1000,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`cohen_kappa` (items resampled with replacement).

    Items are treated as independent; replies that share a prompt are not, so read the interval as a
    lower bound on the uncertainty. Resamples where kappa is undefined are dropped; ``(nan, nan)``
    when every one is.
    """
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise InputError(f"cohen_kappa_ci(): need equal, non-zero numbers of ratings (got {len(a)} and {len(b)})")
    if not 0 < level < 1 or n_boot < 1:
        raise InputError(f"cohen_kappa_ci(): level must be in (0, 1) and n_boot >= 1 (got {level}, {n_boot})")
    cats = sorted(set(a) | set(b), key=str)
    ia = np.array([cats.index(x) for x in a])
    ib = np.array([cats.index(x) for x in b])
    n, c = len(ia), len(cats)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    ra, rb = ia[idx], ib[idx]  # [boot, n]
    po = (ra == rb).mean(1)
    pa = np.stack([(ra == k).mean(1) for k in range(c)], 1)  # [boot, cats]
    pb = np.stack([(rb == k).mean(1) for k in range(c)], 1)
    pe = (pa * pb).sum(1)
    ok = pe < 1.0
    if not ok.any():
        return float("nan"), float("nan")
    k = (po[ok] - pe[ok]) / (1 - pe[ok])
    q = (1 - level) / 2
    return float(np.quantile(k, q)), float(np.quantile(k, 1 - q))


def fleiss_kappa(ratings: Sequence[Sequence]) -> float:
    """Fleiss' kappa for ``m`` raters: ``ratings[i]`` holds the ``m`` labels given to item ``i``.

    ``P_i = (sum_c n_ic^2 - m) / (m (m - 1))``, ``P_bar = mean_i P_i``,
    ``P_e = sum_c p_c^2`` with ``p_c`` the share of all ratings in category ``c``;
    kappa = ``(P_bar - P_e) / (1 - P_e)`` (NaN when ``P_e = 1``).
    """
    rows = [list(r) for r in ratings]
    if not rows:
        raise InputError("fleiss_kappa(): no items; pass one list of labels per item")
    m = len(rows[0])
    if m < 2 or any(len(r) != m for r in rows):
        raise InputError("fleiss_kappa(): every item needs the same number (>= 2) of ratings")
    cats = sorted({x for r in rows for x in r}, key=str)
    counts = np.array([[r.count(c) for c in cats] for r in rows], dtype=float)  # [items, cats]
    n = len(rows)
    p_i = ((counts ** 2).sum(1) - m) / (m * (m - 1))
    p_bar = p_i.mean()
    p_c = counts.sum(0) / (n * m)
    p_e = float((p_c ** 2).sum())
    if p_e >= 1.0:
        return float("nan")
    return float((p_bar - p_e) / (1 - p_e))


def majority_vote(matches: Sequence[Sequence[bool]] | np.ndarray) -> np.ndarray:
    """Per-item majority of binary ``match`` decisions: ``matches[i][j]`` is judge ``j`` on item ``i``.

    An item matches when strictly more than half of its judges say so (2 of 3, 3 of 4, 2 of 2);
    a tie counts as no match (conservative).
    """
    m = np.asarray(matches, dtype=bool)
    if m.ndim != 2 or m.shape[1] == 0:
        raise InputError(f"majority_vote(): need an [items, judges] array of bools, got shape {m.shape}")
    return m.sum(1) * 2 > m.shape[1]


def pairwise_kappa(frame: pd.DataFrame, judges: Sequence[str], column: str = "match") -> pd.DataFrame:
    """Cohen's kappa for every pair of judges over ``{judge}_{column}`` columns of ``frame``, with its 95 %
    bootstrap interval (``kappa_lo``, ``kappa_hi``; :func:`cohen_kappa_ci`)."""
    rows = []
    for i, a in enumerate(judges):
        for b in judges[i + 1:]:
            xa, xb = frame[f"{a}_{column}"].tolist(), frame[f"{b}_{column}"].tolist()
            lo, hi = cohen_kappa_ci(xa, xb)
            rows.append({"judge_a": a, "judge_b": b, "n": len(frame), "kappa": cohen_kappa(xa, xb),
                         "kappa_lo": lo, "kappa_hi": hi,
                         "agreement": float((frame[f"{a}_{column}"] == frame[f"{b}_{column}"]).mean())})
    return pd.DataFrame(rows)


class JudgeEnsemble:
    """Several independent judges on the same (text, target) pairs.

    Args:
        judges: ``{name: Judge}`` (e.g. ``{"nrc": NRCJudge(), "nade": NADEJudge(), "probe": ProbeJudge()}``
            plus ``"llm": OpenAIJudge(url, model)`` when a server is available).
    """

    def __init__(self, judges: Mapping[str, Judge]):
        if not judges:
            raise InputError("JudgeEnsemble needs at least one judge, e.g. {'nrc': NRCJudge()}")
        for k, j in judges.items():
            if not isinstance(j, Judge):
                raise InputError(f"JudgeEnsemble: {k!r} is {type(j).__name__}, not an emolens Judge")
        self.judges = dict(judges)

    @property
    def names(self) -> list[str]:
        return list(self.judges)

    def judge(self, texts: Sequence[str], targets: Sequence[str]) -> pd.DataFrame:
        """One row per text: ``{name}_match``, ``{name}_label`` for each judge, and ``majority``.

        ``majority`` is :func:`majority_vote` over the judges' ``match`` columns.
        """
        texts, targets = list(texts), list(targets)
        out = pd.DataFrame({"text": texts, "target": targets})
        for name, j in self.judges.items():
            v = j.judge(texts, targets)
            out[f"{name}_match"] = [bool(x.match) for x in v]
            out[f"{name}_label"] = [x.label for x in v]
        out["majority"] = majority_vote(out[[f"{n}_match" for n in self.names]].to_numpy())
        return out

    def agreement(self, frame: pd.DataFrame) -> dict:
        """Pairwise Cohen's kappa (on ``match`` and on ``label``) and Fleiss' kappa on ``match``.

        Returns ``{"pairs": DataFrame, "fleiss_match": float, "max_pair_kappa": float}``; ``pairs`` has
        ``kappa`` with ``kappa_lo``/``kappa_hi`` (95 % bootstrap) on ``match`` and ``kappa_label`` on labels.
        """
        names = self.names
        if len(names) < 2:
            return {"pairs": pd.DataFrame(), "fleiss_match": float("nan"), "max_pair_kappa": float("nan")}
        pairs = pairwise_kappa(frame, names, "match")
        lab = pairwise_kappa(frame, names, "label")
        pairs["kappa_label"] = lab["kappa"].to_numpy()
        fl = fleiss_kappa(frame[[f"{n}_match" for n in names]].to_numpy().tolist())
        ks = pairs["kappa"].to_numpy(dtype=float)
        return {"pairs": pairs, "fleiss_match": fl,
                "max_pair_kappa": float(np.nanmax(ks)) if np.isfinite(ks).any() else float("nan")}


def accuracy_table(frame: pd.DataFrame, columns: Sequence[str], by: str | None = "target",
                   level: float = 0.95) -> pd.DataFrame:
    """Accuracy with n and Wilson interval for each boolean column, per group of ``by`` and overall.

    Returns one row per (group, column) with ``group, judge, k, n, acc, lo, hi`` (fractions).
    """
    rows = []
    groups = [("overall", frame)]
    if by is not None:
        groups = [(str(g), f) for g, f in frame.groupby(by, sort=False)] + groups
    for g, f in groups:
        for c in columns:
            k, n = int(f[c].sum()), int(len(f))
            lo, hi = wilson_interval(k, n, level)
            rows.append({"group": g, "judge": c.removesuffix("_match"), "k": k, "n": n,
                         "acc": k / n if n else float("nan"), "lo": lo, "hi": hi})
    return pd.DataFrame(rows)
