"""Paired significance tests and tables for steered-vs-unsteered comparisons.

The typical design uses the same prompts with and without an intervention, so every test here is
*paired*: ``a[i]`` and ``b[i]`` are scores of replies to the same prompt. Differences are always
``a - b`` (condition minus baseline).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _st

from emolens.errors import InputError

__all__ = ["PairedTest", "paired_test", "bootstrap_ci", "holm", "results_table"]


@dataclass(frozen=True)
class PairedTest:
    """Result of :func:`paired_test` (differences are ``a - b``).

    Attributes:
        n: number of pairs used (pairs with a NaN on either side are dropped).
        mean_a, mean_b: means of the two samples over the used pairs.
        mean_diff: mean of ``a - b``.
        t: paired t statistic; ``t_p`` its two-sided p-value.
        wilcoxon_p: two-sided Wilcoxon signed-rank p-value (zero differences dropped).
        cohens_dz: mean difference / SD of the differences (ddof=1).
        ci_low, ci_high: seeded percentile-bootstrap CI of the mean difference.
        ci_level: confidence level of that interval.

    When every difference is zero there is no evidence of a difference: ``t`` and ``cohens_dz``
    are 0, both p-values are 1 and the CI is (0, 0). When all differences are equal but non-zero
    the t-test degenerates (``t``/``cohens_dz`` = +-inf, ``t_p`` = 0).
    """

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    t: float
    t_p: float
    wilcoxon_p: float
    cohens_dz: float
    ci_low: float
    ci_high: float
    ci_level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def _as_1d(x, name: str, fn: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{fn}(): {name} must be a sequence of numbers, got {type(x).__name__}") from None
    if arr.ndim != 1:
        arr = arr.reshape(-1) if arr.ndim == 0 else arr
        if arr.ndim != 1:
            raise InputError(f"{fn}(): {name} must be 1-D, got shape {arr.shape}; pass one score per reply")
    if arr.size == 0:
        raise InputError(
            f"{fn}(): {name} is empty; pass one score per reply (e.g. a column of emolens.evaluate.score_texts(replies))"
        )
    return arr


def bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    stat: Callable = np.mean,
    n: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``stat(x)``; deterministic for a given ``seed``.

    ``stat`` is called as ``stat(samples, axis=1)`` on an ``(n, len(x))`` array when it accepts
    ``axis`` (numpy reductions do), otherwise once per resample. NaNs in ``x`` are dropped.
    """
    arr = _as_1d(x, "x", "bootstrap_ci")
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        raise InputError("bootstrap_ci(): x has only NaN values; pass at least one finite score")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"bootstrap_ci(): n (number of resamples) must be a positive int, got {n!r}")
    if not 0.0 < level < 1.0:
        raise InputError(f"bootstrap_ci(): level must be in (0, 1), e.g. 0.95; got {level!r}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(int(n), arr.size))
    samples = arr[idx]
    try:
        boots = np.asarray(stat(samples, axis=1), dtype=float)
        if boots.shape != (int(n),):
            raise TypeError
    except TypeError:
        boots = np.array([float(stat(s)) for s in samples])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedTest:
    """Paired comparison of ``a`` (condition) against ``b`` (baseline), differences ``a - b``.

    Runs scipy's paired t-test and Wilcoxon signed-rank test, Cohen's d_z and a seeded bootstrap
    CI of the mean difference. Pairs with a NaN on either side are dropped (``n`` says how many
    remain); at least 2 pairs are required.
    """
    a_arr = _as_1d(a, "a", "paired_test")
    b_arr = _as_1d(b, "b", "paired_test")
    if a_arr.shape != b_arr.shape:
        raise InputError(
            f"paired_test(): a has {a_arr.size} values but b has {b_arr.size}; paired tests need one "
            "score per prompt in both conditions, in the same prompt order"
        )
    keep = ~(np.isnan(a_arr) | np.isnan(b_arr))
    a_arr, b_arr = a_arr[keep], b_arr[keep]
    if a_arr.size < 2:
        raise InputError(
            f"paired_test(): only {a_arr.size} complete pair(s) (NaNs dropped); collect at least 2 "
            "prompts scored in both conditions"
        )
    d = a_arr - b_arr
    mean_diff = float(d.mean())
    sd = float(d.std(ddof=1))
    if np.all(d == 0):
        t, t_p, w_p, dz = 0.0, 1.0, 1.0, 0.0
        ci = (0.0, 0.0)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            tt = _st.ttest_rel(a_arr, b_arr)
            t, t_p = float(tt.statistic), float(tt.pvalue)
            if sd == 0.0:  # all differences equal and non-zero: scipy returns nan here
                t, t_p = float(np.sign(mean_diff) * np.inf), 0.0
            try:
                w_p = float(_st.wilcoxon(a_arr, b_arr).pvalue)
            except ValueError:
                w_p = float("nan")
        dz = mean_diff / sd if sd > 0 else float(np.sign(mean_diff) * np.inf)
        ci = bootstrap_ci(d, np.mean, n=n_boot, seed=seed, level=level)
    return PairedTest(
        n=int(d.size),
        mean_a=float(a_arr.mean()),
        mean_b=float(b_arr.mean()),
        mean_diff=mean_diff,
        t=t,
        t_p=t_p,
        wilcoxon_p=w_p,
        cohens_dz=float(dz),
        ci_low=ci[0],
        ci_high=ci[1],
        ci_level=level,
    )


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaNs stay NaN and do not count as tests)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def results_table(
    conditions: Mapping[str, pd.DataFrame],
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-condition means and paired tests against ``baseline``.

    Args:
        conditions: condition name -> per-reply score frame (e.g. ``score_texts(replies)``), all
            with one row per prompt in the same prompt order.
        baseline: the key of the unsteered condition (default: the first key).
        metrics: columns to compare (default: numeric columns present in every frame).

    Returns:
        A long DataFrame indexed by ``(condition, metric)`` with columns ``n``, ``mean``,
        ``baseline_mean``, ``mean_diff``, ``ci_low``, ``ci_high``, ``t``, ``t_p``, ``wilcoxon_p``,
        ``cohens_dz`` and ``t_p_holm`` (Holm-adjusted over the metrics of that condition). Baseline
        rows carry their means and NaN test columns; metrics with fewer than 2 complete pairs get NaN
        tests too. ``table["mean"].unstack()`` gives a condition x metric table of means.
    """
    if not isinstance(conditions, Mapping) or not conditions:
        raise InputError(
            "results_table(): conditions is empty; pass {'baseline': score_texts(base_replies), "
            "'steered': score_texts(steered_replies), ...}"
        )
    for k, v in conditions.items():
        if not isinstance(v, pd.DataFrame):
            raise InputError(f"results_table(): condition {k!r} is a {type(v).__name__}, not a DataFrame; use score_texts()")
        if len(v) == 0:
            raise InputError(f"results_table(): condition {k!r} has no rows; score at least 2 replies per condition")
    if baseline is None:
        baseline = next(iter(conditions))
    if baseline not in conditions:
        raise InputError(f"results_table(): baseline {baseline!r} is not a condition; choose one of {list(conditions)}")
    base = conditions[baseline]
    n_rows = len(base)
    for k, v in conditions.items():
        if len(v) != n_rows:
            raise InputError(
                f"results_table(): condition {k!r} has {len(v)} rows but baseline {baseline!r} has {n_rows}; "
                "score the same prompts, in the same order, in every condition"
            )
    if metrics is None:
        common = [c for c in base.columns if all(c in v.columns for v in conditions.values())]
        metrics = [c for c in common if all(pd.api.types.is_numeric_dtype(v[c]) for v in conditions.values())]
        if not metrics:
            raise InputError("results_table(): the frames share no numeric columns; pass frames from score_texts()")
    else:
        metrics = list(metrics)
        for k, v in conditions.items():
            missing = [m for m in metrics if m not in v.columns]
            if missing:
                raise InputError(f"results_table(): condition {k!r} lacks column(s) {missing}; available: {list(v.columns)}")

    rows = []
    for name, df in conditions.items():
        block = []
        for m in metrics:
            a = df[m].to_numpy(dtype=float)
            row = {"condition": name, "metric": m}
            if name == baseline:
                ok = ~np.isnan(a)
                row.update(n=int(ok.sum()), mean=float(a[ok].mean()) if ok.any() else np.nan)
                row["baseline_mean"] = row["mean"]
            else:
                b = base[m].to_numpy(dtype=float)
                if int((~(np.isnan(a) | np.isnan(b))).sum()) < 2:  # e.g. distinct_2 of 1-word replies
                    ok = ~(np.isnan(a) | np.isnan(b))
                    row.update(n=int(ok.sum()), mean=float(a[ok].mean()) if ok.any() else np.nan,
                               baseline_mean=float(b[ok].mean()) if ok.any() else np.nan, t_p=np.nan)
                    block.append(row)
                    continue
                r = paired_test(a, b, n_boot=n_boot, seed=seed)
                row.update(
                    n=r.n, mean=r.mean_a, baseline_mean=r.mean_b, mean_diff=r.mean_diff,
                    ci_low=r.ci_low, ci_high=r.ci_high, t=r.t, t_p=r.t_p,
                    wilcoxon_p=r.wilcoxon_p, cohens_dz=r.cohens_dz,
                )
            block.append(row)
        if name != baseline:
            adj = holm([r["t_p"] for r in block])
            for r, p in zip(block, adj):
                r["t_p_holm"] = float(p)
        rows.extend(block)
    cols = ["condition", "metric", "n", "mean", "baseline_mean", "mean_diff", "ci_low", "ci_high",
            "t", "t_p", "wilcoxon_p", "cohens_dz", "t_p_holm"]
    out = pd.DataFrame(rows).reindex(columns=cols)
    return out.set_index(["condition", "metric"])
