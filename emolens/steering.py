"""Steering generation with emotion vectors: intervention lists, baselines, sweeps, calibration.

Everything here builds :class:`~emolens.interventions.Add` specs and runs them through the one
intervention engine (:meth:`EmoModel.generate`), so steering composes with any other
intervention and serialises like one.

Position modes (``position=``)
------------------------------
``"locus"``
    only the locus window of the *prompt*, as offsets from the prompt end (``window=(-3, -2, -1)``
    = the last three prompt tokens; with a chat template these are the assistant header). Under
    KV-cached generation the window is steered once, at prefill; later tokens see it through
    the cache (paper 1 v3 "localised injection").
``"generated"``
    t* (the last prompt token, which predicts the first new token) and every generated token.
``"all"``
    every position, prompt and generated (ActAdd / CAA-style "all positions").
``"locus+generated"``
    the locus window plus every generated token (CAA's "every position after the instruction").

Strength modes (``strength_mode=``)
-----------------------------------
``"absolute"``
    ``h += s · v`` with the raw vector ``v`` (CAA multipliers).
``"rms"``
    ``h += s · RMS(h_t) · v / RMS(v)``: the added vector is ``s`` times as large as the
    activation at that very position (paper 2's "× RMS").
``"norm"``
    ``h += s · median‖h‖ · v / ‖v‖``: ``s`` times the site's median activation norm (measured
    when the vectors were built), the same at every position (the spec's α·‖v‖ = s·‖h‖).

Relative modes make a strength mean the same thing across layers and models; the right value is
still model-specific, which is what :func:`sweep` and :func:`calibrate` are for.

Baselines: :func:`global_interventions` (every layer with a vector, every position) and
:func:`priming_system` (a system prompt asking for the emotion, no intervention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .directions import EmotionVectors
from .errors import InputError, InterventionError
from .interventions import Add
from .results import Result
from .sites import Pos, Site

__all__ = ["POSITION_MODES", "STRENGTH_MODES", "position_rules", "scaled_vector", "steering_interventions",
           "global_interventions", "priming_system", "generate", "Condition", "run_conditions", "score_condition",
           "sweep", "SweepResult", "calibrate", "Calibration", "FiniteLogitsGuard", "pooled_perplexity"]

POSITION_MODES = ("locus", "generated", "all", "locus+generated")
STRENGTH_MODES = ("absolute", "rms", "norm")

#: Default system prompt of the instruction-priming baseline; ``{emotions}`` is filled in.
PRIMING_TEMPLATE = ("You are a warm, caring friend. In every reply, express {emotions}, and speak personally "
                    "about how you yourself feel.")


# =========================================================================================
# Building interventions
# =========================================================================================
def position_rules(position: str, window: Sequence[int] = (-1,)) -> list[Pos]:
    """The :class:`Pos` rules of a position mode (see the module docstring)."""
    if position not in POSITION_MODES:
        raise InputError(f"Unknown position mode {position!r}; use one of {', '.join(POSITION_MODES)}.")
    if position in ("locus", "locus+generated"):
        win = tuple(int(w) for w in window)
        if not win:
            raise InputError("The locus window is empty; pass offsets from the prompt end, e.g. window=(-2, -1).")
        if any(w >= 0 for w in win):
            raise InputError(f"Locus window {win} must hold negative offsets from the prompt end (-1 = last prompt "
                             "token), so that it maps onto prompts of any length.")
        rules = [Pos.index(*win)]
        if position == "locus+generated":
            rules.append(Pos.generated())
        return rules
    if position == "generated":
        return [Pos.from_last()]
    return [Pos.all()]


def scaled_vector(vectors: EmotionVectors, emotion: str, site: "Site | str", strength_mode: str
                  ) -> tuple[torch.Tensor, bool]:
    """The vector to hand to :class:`Add` for a strength mode, and its ``rms`` flag.

    ``absolute``: the raw vector; ``rms``: ``v / RMS(v)`` with ``rms=True``; ``norm``:
    ``v / ||v|| · median||h||`` at that site.
    """
    v = vectors.get(emotion, site)
    if strength_mode == "absolute":
        return v, False
    n = float(v.norm())
    if n == 0.0:
        raise InterventionError(f"The {emotion!r} vector at {Site.parse(site)} is zero; it has no direction to "
                                f"scale in strength_mode={strength_mode!r}.")
    if strength_mode == "rms":
        return v / (n / math.sqrt(v.numel())), True
    if strength_mode == "norm":
        return v / n * vectors.reference_norm(site), False
    raise InputError(f"Unknown strength_mode {strength_mode!r}; use one of {', '.join(STRENGTH_MODES)}.")


def _weights(emotions: "str | Sequence[str] | Mapping[str, float]") -> dict[str, float]:
    if isinstance(emotions, str):
        return {emotions: 1.0}
    if isinstance(emotions, Mapping):
        w = {str(k): float(v) for k, v in emotions.items()}
    else:
        w = {str(e): 1.0 for e in emotions}
    if not w:
        raise InputError("No emotions given; pass one name, a list, or {emotion: weight}.")
    return w


def steering_interventions(vectors: EmotionVectors, emotions: "str | Sequence[str] | Mapping[str, float]", *,
                           layers: "int | Sequence[int]", strength: float, kind: str = "resid_post",
                           strength_mode: str = "absolute", position: str = "all",
                           window: Sequence[int] = (-1,), model=None) -> list[Add]:
    """Add specs that steer with one or several vectors at one or several layers.

    Args:
        vectors: emotion vectors.
        emotions: an emotion name, a list (each at ``strength``), or ``{emotion: weight}`` (each at
            ``weight · strength``): several vectors at once.
        layers: layer(s) to add at (sites ``Site(kind, layer)``).
        strength: the coefficient ``s`` (meaning depends on ``strength_mode``).
        position, window: position mode and locus window (module docstring).
        model: optional; checks widths and layers now instead of at run time.

    Returns:
        a list of :class:`~emolens.interventions.Add` (empty at strength 0: exactly unsteered).
    """
    if not math.isfinite(float(strength)):
        raise InterventionError(f"Steering strength {strength} is not finite.")
    layer_list = [layers] if isinstance(layers, int) else [int(L) for L in layers]
    if not layer_list:
        raise InputError("No layers given; pass at least one layer to steer at.")
    rules = position_rules(position, window)
    if float(strength) == 0.0:
        return []
    out: list[Add] = []
    for e, w in _weights(emotions).items():
        for L in layer_list:
            site = Site(kind, L)
            v, rms = scaled_vector(vectors, e, site, strength_mode)
            for rule in rules:
                out.append(Add(site, v, strength=float(strength) * w, rms=rms, pos=rule))
    if model is not None:
        for iv in out:
            iv.check(model)
    return out


def global_interventions(vectors: EmotionVectors, emotions: "str | Sequence[str] | Mapping[str, float]", *,
                         strength: float, kind: str = "resid_post", strength_mode: str = "norm",
                         layers: Sequence[int] | None = None, spread: bool = True) -> list[Add]:
    """Global steering baseline: every layer's own vector at every position.

    With ``spread`` (default) each of the ``n`` layers gets ``strength / n``, so ``strength`` is
    comparable to single-layer steering (the residual stream accumulates the additions).
    """
    layer_list = list(layers) if layers is not None else sorted(
        set.intersection(*(set(vectors.layers(e, kind)) for e in _weights(emotions))))
    if not layer_list:
        raise InputError(f"No layer holds a {kind} vector for all of {list(_weights(emotions))}.")
    s = float(strength) / len(layer_list) if spread else float(strength)
    return steering_interventions(vectors, emotions, layers=layer_list, strength=s, kind=kind,
                                  strength_mode=strength_mode, position="all")


def priming_system(emotions: "str | Sequence[str]", template: str = PRIMING_TEMPLATE) -> str:
    """System prompt of the instruction-priming baseline, e.g. ``... express joy and trust ...``."""
    names = [emotions] if isinstance(emotions, str) else list(emotions)
    if not names:
        raise InputError("priming_system needs at least one emotion.")
    desc = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return template.format(emotions=desc)


# =========================================================================================
# Generation with a NaN guard
# =========================================================================================
def _guard_base():
    from transformers import LogitsProcessor

    return LogitsProcessor


class FiniteLogitsGuard(_guard_base()):
    """A transformers logits processor that stops generation on NaN/inf logits, naming the setting."""

    def __init__(self, label: str):
        self.label = label

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(scores).all():
            bad = "NaN" if torch.isnan(scores).any() else "inf"
            raise InterventionError(f"Steering at {self.label} produced {bad} logits; this strength breaks the model. "
                                    "Use a smaller strength (or a relative strength_mode such as 'rms').")
        return scores


def generate(model, prompts: Sequence[Any], interventions: Sequence[Any] | None = None, *, label: str = "this setting",
             system: str | None = None, max_new_tokens: int = 40, batch_size: int = 32, progress: bool = False,
             **gen_kwargs: Any) -> list[str]:
    """:meth:`EmoModel.generate` with a guard that raises :class:`InterventionError` on NaN/inf logits.

    ``label`` names the setting in the error (e.g. ``"strength 8.0 at resid_post.8"``).
    """
    from transformers import LogitsProcessorList

    prompts = list(prompts)
    if not prompts:
        raise InputError("No prompts to generate from; the evaluation set is empty.")
    procs = LogitsProcessorList(list(gen_kwargs.pop("logits_processor", None) or []))
    procs.append(FiniteLogitsGuard(label))
    return model.generate(prompts, interventions=list(interventions or []), system=system,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                          logits_processor=procs, **gen_kwargs)


@dataclass
class Condition:
    """One generation condition: interventions and/or a system prompt."""

    name: str
    interventions: list = field(default_factory=list)
    system: str | None = None
    info: dict = field(default_factory=dict)


def run_conditions(model, prompts: Sequence[Any], conditions: Sequence[Condition], *, max_new_tokens: int = 40,
                   batch_size: int = 32, progress: bool = True, **gen_kwargs: Any) -> dict[str, list[str]]:
    """Generate replies to ``prompts`` under each condition (same prompts, same decoding)."""
    from .progress import progress_bar

    out: dict[str, list[str]] = {}
    for c in progress_bar(list(conditions), desc="conditions", disable=not progress):
        out[c.name] = generate(model, prompts, c.interventions, label=f"condition {c.name!r}", system=c.system,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, **gen_kwargs)
    return out


def score_condition(model, prompts: Sequence[Any], texts: Sequence[str], *, fluency: bool = True,
                    batch_size: int = 16) -> pd.DataFrame:
    """:func:`emolens.evaluate.score_texts` plus per-reply ``nll``, ``n_reply_tokens`` and ``perplexity``
    under the unsteered ``model`` (no system prompt: the reference is the plain chat model)."""
    from .evaluate import score_texts
    from .evaluate.fluency import reply_nll

    texts = list(texts)
    if not texts:
        raise InputError("No replies to score; the evaluation set is empty.")
    df = score_texts(texts)
    if fluency:
        nll, n = reply_nll(model, prompts, texts, batch_size=batch_size)
        df["nll"] = nll
        df["n_reply_tokens"] = n
        with np.errstate(divide="ignore", invalid="ignore"):
            df["perplexity"] = np.where(n > 0, np.exp(nll / np.maximum(n, 1)), np.nan)
    return df


def pooled_perplexity(df: pd.DataFrame) -> float:
    """Token-pooled perplexity of a frame from :func:`score_condition`."""
    n = float(df["n_reply_tokens"].sum())
    return math.exp(float(df["nll"].sum()) / n) if n > 0 else float("nan")


# =========================================================================================
# Sweeps and calibration
# =========================================================================================
@dataclass
class SweepResult:
    """Scores of a strength × layer sweep.

    Attributes:
        table: one row per (layer, strength): means of every score column, ``ppl`` (token-pooled
            perplexity under the unsteered model), ``ppl_ratio`` (over the unsteered baseline),
            ``distinct_2_ratio`` (mean distinct-2 over baseline, replies under two words counting 0),
            and for each target metric its paired ``*_dz`` (Cohen's d_z vs
            baseline) and ``*_p`` (paired t-test p-value); ``objective`` (min d_z over targets).
        scores: ``{(layer, strength): per-reply score frame}``; ``(None, 0.0)`` is the baseline.
        texts: the replies, keyed like ``scores``.
        settings: what was swept and how.
    """

    table: pd.DataFrame
    scores: dict
    texts: dict
    settings: dict

    def curve(self, metric: str, layer: int, *, ratio: bool = False, n_boot: int = 1000) -> Result:
        """A ``curve`` result of ``metric`` over strength at ``layer`` (strength 0 = baseline), with a
        bootstrap 95% CI of the mean (for ``ppl``: of the token-pooled perplexity; ``ratio``: over baseline)."""
        from .evaluate import bootstrap_ci

        strengths = sorted({s for (L, s) in self.scores if L == layer} | {0.0})
        ys, lo, hi = [], [], []
        base = self.scores[(None, 0.0)]
        for s in strengths:
            df = base if s == 0.0 else self.scores[(layer, s)]
            if metric == "ppl":
                y = pooled_perplexity(df)
                # bootstrap over replies of the pooled perplexity
                rng = np.random.default_rng(0)
                nll, n = df["nll"].to_numpy(), df["n_reply_tokens"].to_numpy()
                idx = rng.integers(0, len(df), size=(n_boot, len(df)))
                boots = np.exp(nll[idx].sum(1) / np.maximum(n[idx].sum(1), 1))
                l, h = np.quantile(boots, [0.025, 0.975])
                if ratio:
                    b = pooled_perplexity(base)
                    y, l, h = y / b, l / b, h / b
            else:
                vals = df[metric].to_numpy(dtype=float)
                y = _nanmean(vals)
                l, h = bootstrap_ci(vals, n=n_boot) if np.isfinite(vals).sum() > 0 else (np.nan, np.nan)
            ys.append(y)
            lo.append(l)
            hi.append(h)
        name = f"{metric}{' ratio' if ratio else ''}"
        return Result("curve", torch.tensor(ys), ("strength",), {"strength": [float(s) for s in strengths]},
                      {"ci_low": torch.tensor(lo, dtype=torch.float32), "ci_high": torch.tensor(hi, dtype=torch.float32)},
                      {"metric": name, "name": name, "layer": layer, **{k: v for k, v in self.settings.items()
                                                                         if isinstance(v, (str, int, float))}})


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _summary_row(df: pd.DataFrame, base: pd.DataFrame, targets: Sequence[str]) -> dict:
    from .evaluate import paired_test

    row = {c: _nanmean(df[c]) for c in df.columns
           if pd.api.types.is_numeric_dtype(df[c]) and c not in ("nll", "n_reply_tokens")}
    row["ppl"] = pooled_perplexity(df) if "nll" in df else float("nan")
    row["ppl_ratio"] = row["ppl"] / pooled_perplexity(base) if "nll" in df else float("nan")
    if "distinct_2" in base and "distinct_2" in df:
        # a reply with fewer than two words (e.g. only emoji) counts as fully repetitive (0), not as missing
        b2 = float(base["distinct_2"].fillna(0.0).mean())
        row["distinct_2_ratio"] = float(df["distinct_2"].fillna(0.0).mean()) / b2 if b2 > 0 else float("nan")
    else:
        row["distinct_2_ratio"] = float("nan")
    dzs = []
    for t in targets:
        if df is base:
            row[f"{t}_dz"], row[f"{t}_p"] = 0.0, 1.0
            dzs.append(0.0)
            continue
        try:
            r = paired_test(df[t].to_numpy(dtype=float), base[t].to_numpy(dtype=float), n_boot=200)
            dz = r.cohens_dz if math.isfinite(r.cohens_dz) else math.copysign(10.0, r.cohens_dz)
            row[f"{t}_dz"], row[f"{t}_p"] = dz, r.t_p
        except InputError:
            dz = float("nan")
            row[f"{t}_dz"], row[f"{t}_p"] = dz, float("nan")
        dzs.append(dz)
    row["objective"] = float(min(dzs)) if dzs and all(d == d for d in dzs) else float("nan")
    return row


def _sweep_grid(prompts, layers, strengths, max_new_tokens: int, batch_size: int, gen_kwargs: dict):
    """Checked sweep arguments: (prompts, layers, sorted non-zero strengths, generation kwargs)."""
    prompts = list(prompts)
    if not prompts:
        raise InputError("sweep(): the evaluation set is empty; pass at least two prompts.")
    layer_list = [layers] if isinstance(layers, int) else [int(L) for L in layers]
    svals = sorted({float(s) for s in strengths if float(s) != 0.0})
    for s in svals:
        if not math.isfinite(s):
            raise InterventionError(f"Sweep strength {s} is not finite.")
    return prompts, layer_list, svals, dict(max_new_tokens=max_new_tokens, batch_size=batch_size, **gen_kwargs)


def sweep(model, prompts: Sequence[Any], vectors: EmotionVectors,
          emotions: "str | Sequence[str] | Mapping[str, float]", *, strengths: Sequence[float],
          layers: "int | Sequence[int]", kind: str = "resid_post", strength_mode: str = "norm",
          position: str = "all", window: Sequence[int] = (-1,),
          make_interventions: Callable[[float, int], list] | None = None,
          targets: Sequence[str] = ("joy_trust", "first_person_rate"), max_new_tokens: int = 32,
          batch_size: int = 32, fluency: bool = True, baseline: "tuple[list[str], pd.DataFrame] | None" = None,
          progress: bool = True, backend=None, **gen_kwargs: Any) -> SweepResult:
    """Generate and score replies over a strength × layer grid (plus the unsteered baseline, once).

    Args:
        prompts: evaluation prompts (e.g. a calibration split of the openers).
        vectors, emotions, kind, strength_mode, position, window: as in :func:`steering_interventions`.
        strengths: strengths to try (0 is the baseline and is always included).
        layers: layer(s) to try.
        make_interventions: optional ``fn(strength, layer) -> interventions`` replacing the default
            builder (e.g. to sweep global steering).
        targets: score columns whose rise is the goal (``objective`` = min paired d_z over them).
        max_new_tokens, batch_size, gen_kwargs: decoding (greedy unless ``do_sample=True``).
        fluency: score perplexity under the unsteered model.
        baseline: reuse ``(texts, scores)`` of an earlier unsteered run on the same prompts.
        backend: ``None``/``"local"``, ``"ray"`` or a :class:`~emolens.scale.ScaleConfig`: one shard
            per grid point over Ray workers (:func:`emolens.scale.sweep`; ``make_interventions``
            must then be picklable without the model).

    Raises:
        InterventionError: a strength produced NaN/inf logits (the message names it).
    """
    from .progress import progress_bar

    if backend not in (None, "local"):
        from .scale import sweep as scaled_sweep

        return scaled_sweep(model, prompts, vectors, emotions, strengths=strengths, layers=layers, kind=kind,
                            strength_mode=strength_mode, position=position, window=window,
                            make_interventions=make_interventions, targets=targets, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, fluency=fluency, baseline=baseline, backend=backend,
                            progress=progress, **gen_kwargs)

    prompts, layer_list, svals, gen = _sweep_grid(prompts, layers, strengths, max_new_tokens, batch_size, gen_kwargs)
    texts: dict = {}
    scores: dict = {}
    if baseline is not None:
        texts[(None, 0.0)], scores[(None, 0.0)] = list(baseline[0]), baseline[1]
    else:
        texts[(None, 0.0)] = generate(model, prompts, [], label="strength 0 (unsteered)", **gen)
        scores[(None, 0.0)] = score_condition(model, prompts, texts[(None, 0.0)], fluency=fluency)
    grid = [(L, s) for L in layer_list for s in svals]
    for L, s in progress_bar(grid, desc="steering sweep", disable=not progress):
        ivs = (make_interventions(s, L) if make_interventions is not None else
               steering_interventions(vectors, emotions, layers=L, strength=s, kind=kind, strength_mode=strength_mode,
                                      position=position, window=window, model=model))
        label = f"strength {s:g} ({strength_mode}) at {kind}.{L}, position mode {position!r}"
        texts[(L, s)] = generate(model, prompts, ivs, label=label, **gen)
        scores[(L, s)] = score_condition(model, prompts, texts[(L, s)], fluency=fluency)
    return _sweep_result(texts, scores, grid, emotions, targets, kind=kind, strength_mode=strength_mode,
                         position=position, window=window, max_new_tokens=max_new_tokens, n_prompts=len(prompts))


def _sweep_result(texts: dict, scores: dict, grid: list, emotions, targets: Sequence[str], **settings: Any
                  ) -> SweepResult:
    """The sweep table from per-point replies and scores (shared with :func:`emolens.scale.sweep`)."""
    base = scores[(None, 0.0)]
    rows = [{"layer": None, "strength": 0.0, **_summary_row(base, base, targets)}]
    rows += [{"layer": L, "strength": s, **_summary_row(scores[(L, s)], base, targets)} for L, s in grid]
    settings = dict(emotions=list(_weights(emotions)), **settings, targets=list(targets))
    settings["window"] = list(settings["window"])
    return SweepResult(pd.DataFrame(rows), scores, texts, settings)


@dataclass
class Calibration:
    """The operating point chosen by :func:`calibrate`.

    Attributes:
        layer, strength: the chosen point (strength 0 / layer None when nothing qualified).
        ok: whether a point passed the guards *and* raised every target.
        reason: a sentence saying why this point was chosen.
        table: the sweep table with ``admissible`` and ``chosen`` columns.
    """

    layer: int | None
    strength: float
    ok: bool
    reason: str
    table: pd.DataFrame

    def to_dict(self) -> dict:
        return {"layer": self.layer, "strength": self.strength, "ok": self.ok, "reason": self.reason}


def calibrate(result: SweepResult, *, max_ppl_increase: float = 0.25, max_distinct_drop: float | None = 0.3,
              min_objective: float = 0.0) -> Calibration:
    """Choose a (layer, strength) from a sweep: the highest objective that passes the fluency guard.

    A point is admissible when its pooled perplexity under the unsteered model is at most
    ``(1 + max_ppl_increase)`` × the baseline's and (repetition guard; perplexity rewards repeated
    text) its mean distinct-2 is at least ``(1 − max_distinct_drop)`` × the baseline's. Among admissible
    points whose objective (min paired d_z over the targets) exceeds ``min_objective``, the best
    objective wins (ties: the smaller strength). When none qualifies, ``ok`` is False and the
    admissible point with the best objective is returned (or strength 0), with the reason.
    """
    if max_ppl_increase < 0:
        raise InputError(f"max_ppl_increase={max_ppl_increase} must be >= 0 (0.25 = at most 25% higher perplexity).")
    t = result.table.copy()
    adm = t["ppl_ratio"].le(1.0 + max_ppl_increase) | t["ppl_ratio"].isna()
    if max_distinct_drop is not None and "distinct_2_ratio" in t:
        adm &= t["distinct_2_ratio"].ge(1.0 - max_distinct_drop) | t["distinct_2_ratio"].isna()
    adm &= t["layer"].notna()
    t["admissible"] = adm
    cand = t[adm & t["objective"].gt(min_objective)]
    ok = not cand.empty
    pool = cand if ok else t[adm & t["objective"].notna()]
    if pool.empty:
        t["chosen"] = False
        return Calibration(None, 0.0, False, "No steered point passed the fluency guard "
                           f"(perplexity ≤ {1 + max_ppl_increase:.2f}× baseline"
                           + (f", distinct-2 ≥ {1 - max_distinct_drop:.2f}× baseline" if max_distinct_drop is not None else "")
                           + "); try smaller strengths.", t)
    best = pool.sort_values(["objective", "strength"], ascending=[False, True]).index[0]
    t["chosen"] = t.index == best
    row = t.loc[best]
    targets = result.settings.get("targets", [])
    desc = ", ".join(f"{k} d_z={row[f'{k}_dz']:.2f}" for k in targets if f"{k}_dz" in row)
    reason = (f"layer {int(row['layer'])}, strength {row['strength']:g} ({result.settings.get('strength_mode')}): "
              f"{desc}; perplexity ×{row['ppl_ratio']:.2f} (bound ×{1 + max_ppl_increase:.2f})")
    if not ok:
        reason = "No admissible point raised every target; best trade-off: " + reason
    return Calibration(int(row["layer"]), float(row["strength"]), ok, reason, t)
