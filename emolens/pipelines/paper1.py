"""Paper 1 end to end: locus by attribution patching, emotion vectors, steering, evaluation.

"Conversations: Love Them, Hate Them, Steer Them" (Yeo, Jaidka, Chebrolu; arXiv 2505.17413 /
2511.12832). The paper's full text was not available; the steps below follow
``specs/paper1-conversations.md`` and every inferred choice is a :class:`Paper1Config` field.

Steps (:data:`STEPS`, each a public function on the step engine :mod:`emolens.pipelines.engine`;
raw results under ``OUT/paper1/``; a rerun skips a step only when its configuration fields, model,
data and inputs are unchanged, and recomputes it and everything downstream otherwise):

1. **locus** — diagnostic tasks become clean/corrupted pairs that differ only in a warm vs cold
   system framing of equal token length (``"You are a warm, kind and gentle friend."`` vs
   ``"You are a cold, rude and brutal critic."``; the first pair in ``framings`` whose two sides
   tokenise to the same length wins, else prompts are right-aligned on t*), with the same
   aligned/misaligned replies on both sides. Metric: ``log p(aligned) − log p(misaligned)``
   (teacher-forced). Attribution patching over residual ``layer × position``
   (``resid_post``, so a locus layer ``L`` is directly llama.cpp's ``direction.L``), then exact
   patching of the top cells (:func:`emolens.patching.verify`). The *locus layer* is, by default,
   the first layer at which the attribution reaching the last ``window_span`` prompt positions
   (the positions that exist in every new prompt: end of the user turn and the assistant header)
   is at least ``onset_fraction`` of its maximum over layers (``locus_rule="onset"``; ``"argmax"``
   takes the maximum) — the layer where the warm/cold disposition arrives where a reply is
   produced. The *window* is the top ``window_max`` positions there, stored as offsets from the
   prompt end so it maps onto any prompt.
2. **vectors** — mean-difference vectors (``method``; PCA optional) of the contrastive pairs of
   each emotion in ``emotions`` at every layer (exemplars' last token, raw text), their mean as
   the steering vector ``steer_name``, quality on the held-out pairs (AUROC, Cohen's d), a
   GGUF control-vector export.
3. **calibration** — on the first ``n_calibration`` openers: for every position mode in
   ``positions`` (each with its own grid of relative strengths, ``strength_mode="norm"``:
   multiples of the layer's median activation norm), every layer ``locus + layer_offsets``, and
   global steering over ``global_strengths``: generate, score (NRC joy+trust, first-person rate,
   distinct-2) and measure perplexity under the unsteered model. :func:`emolens.steering.calibrate`
   picks, per mode, the best point whose perplexity rises by at most ``max_ppl_increase``.
4. **evaluation** — on the held-out openers (the rest, ≥ 100 by default): unsteered, each steering
   mode at its calibrated point, global steering, instruction priming; paired tests
   (:func:`emolens.evaluate.results_table`) and the acceptance check.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from .. import io
from .engine import (Context, PipelineConfig, RunFolder, Step, log_table, model_fingerprint, register_kind,
                     run_steps, sections as engine_sections)
from ..directions import EmotionVectors, emotion_vectors, evaluate_vectors
from ..errors import InputError
from ..results import Result, saved_path
from ..sections import Section
from ..steering import (Condition, SweepResult, calibrate, generate, global_interventions,
                        priming_system, score_condition, steering_interventions, sweep)

log = logging.getLogger("emolens")

__all__ = ["Paper1Config", "DEFAULT_FRAMINGS", "STEPS", "diagnostic_pairs", "find_locus", "step_locus",
           "step_vectors", "step_calibration", "step_evaluation", "load_tasks", "load_pairs", "load_openers_split",
           "check_data", "run", "steer_cli", "add_steer_args", "SteerConfig", "STEER_STEPS", "steer_vectors_step",
           "steer_unsteered_step", "steer_steered_step"]

#: (warm, cold) system framings for the clean/corrupted runs, tried in order until both sides
#: tokenise to the same length.
DEFAULT_FRAMINGS: tuple[tuple[str, str], ...] = (
    ("You are a warm, kind and gentle friend.", "You are a cold, rude and brutal critic."),
    ("You are a warm and caring friend.", "You are a cold and hostile critic."),
    ("Reply warmly.", "Reply coldly."),
)




@dataclass
class Paper1Config(PipelineConfig):
    """All hyperparameters of the paper-1 pipeline (inferred choices; see the module docstring).

    Strengths are relative (``strength_mode="norm"``: multiples of the steered layer's median
    activation norm) and layers are offsets from the attribution locus, so the defaults carry
    over between models; the operating point is always chosen by the fluency-guarded sweep.

    Data fields (``None`` = the packaged file) take a JSONL/CSV/parquet path or a Hugging Face
    ``datasets`` folder; ``*_columns`` maps schema fields to your column names
    (``{"prompt": "question"}``); see :mod:`emolens.datasets` for the schemas.
    """

    # data
    tasks_data: str | None = None             # diagnostic tasks (prompt, aligned, misaligned, emotion)
    tasks_columns: dict[str, str] = field(default_factory=dict)
    pairs_data: str | None = None             # contrastive pairs (emotion, positive, negative[, split])
    pairs_columns: dict[str, str] = field(default_factory=dict)
    openers_data: str | None = None           # conversation openers (text)
    openers_columns: dict[str, str] = field(default_factory=dict)
    emotions: tuple[str, ...] = ("joy", "trust")
    steer_name: str = "joy_trust"
    # 1. locus
    framings: tuple[tuple[str, str], ...] = DEFAULT_FRAMINGS
    n_diagnostic: int | None = 26            # diagnostic tasks used, emotions interleaved (None = all 52)
    attribution_method: str = "atp"           # "atp", "atp*" or "ig"
    attribution_batch_size: int = 8
    locus_rule: str = "onset"                 # "onset" or "argmax"
    onset_fraction: float = 0.5
    window_span: int = 8                      # candidate window: the last N prompt positions
    window_max: int = 3
    verify_k: int = 6                         # top cells checked by exact patching
    verify_controls: int = 3
    n_verify_tasks: int | None = 8            # tasks used for exact patching (None = all)
    # 2. vectors
    max_pairs: int | None = None              # training pairs per emotion (None = all)
    vector_kind: str = "resid_post"
    method: str = "mean_diff"                 # or "pca"
    pca_center: bool = False
    token_reduce: str = "last"
    compare_pca: bool = True                  # also build PCA vectors (cosine figure)
    # 3. steering + calibration
    strength_mode: str = "norm"
    positions: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "all": (0.05, 0.1, 0.15, 0.2), "locus": (0.5, 1.0, 2.0)})
    layer_offsets: tuple[int, ...] = (-3, 0)
    global_strengths: tuple[float, ...] = (0.1, 0.2, 0.3)
    priming_template: str = ("You are a warm, caring friend. In every reply, express {emotions}, and speak "
                             "personally about how you yourself feel.")
    max_ppl_increase: float = 0.25
    max_distinct_drop: float | None = 0.3
    targets: tuple[str, ...] = ("joy_trust", "first_person_rate")
    # 4. evaluation
    n_calibration: int = 20
    n_heldout: int | None = None              # None = every opener after the calibration ones
    max_new_tokens: int = 32
    batch_size: int = 32
    alpha: float = 0.01
    n_examples: int = 6
    seed: int = 0

    def quick(self) -> "Paper1Config":
        """A smoke-test configuration: few tasks, pairs, openers and tokens."""
        return self.replace(
            n_diagnostic=6, verify_k=3, verify_controls=1, n_verify_tasks=3, max_pairs=24,
            # sized so that calibrated steering on the embedded model passes its own fluency guard
            # (measured: layer locus-3, 0.15 x median norm, perplexity x1.19) and the held-out test has the
            # power to show it: n = 48 gave joy+trust d_z 0.23, p = 0.12; n = 96 p < 0.001 (benchmarks/RESULTS.md)
            positions={"all": (0.1, 0.15), "locus": (1.0,)}, layer_offsets=(-3,), global_strengths=(0.2,),
            n_calibration=12, n_heldout=96, max_new_tokens=24, batch_size=16, n_examples=3, compare_pca=False)

    def check(self) -> None:
        from ..steering import POSITION_MODES, STRENGTH_MODES

        if not self.emotions:
            raise InputError("Paper1Config.emotions is empty; name at least one emotion (e.g. ('joy', 'trust')).")
        bad = [p for p in self.positions if p not in POSITION_MODES]
        if bad or not self.positions:
            raise InputError(f"Paper1Config.positions has unknown mode(s) {bad or '(none given)'}; use "
                             f"{', '.join(POSITION_MODES)}.")
        if self.strength_mode not in STRENGTH_MODES:
            raise InputError(f"strength_mode={self.strength_mode!r}; use one of {', '.join(STRENGTH_MODES)}.")
        if self.vector_kind not in ("resid_pre", "resid_post"):
            raise InputError(f"vector_kind={self.vector_kind!r}; attribution and control vectors use 'resid_post' "
                             "(default) or 'resid_pre'.")
        if self.locus_rule not in ("onset", "argmax"):
            raise InputError(f"locus_rule={self.locus_rule!r}; use 'onset' or 'argmax'.")
        if self.attribution_method not in ("atp", "atp*", "ig"):
            raise InputError(f"attribution_method={self.attribution_method!r}; use 'atp', 'atp*' or 'ig'.")
        if self.method not in ("mean_diff", "pca"):
            raise InputError(f"method={self.method!r}; use 'mean_diff' or 'pca'.")
        if self.n_calibration < 2:
            raise InputError("n_calibration must be at least 2 (paired statistics need two prompts).")
        if self.max_ppl_increase < 0:
            raise InputError("max_ppl_increase must be >= 0.")
        for k in ("attribution_batch_size", "batch_size", "max_new_tokens", "window_span", "window_max"):
            if getattr(self, k) < 1:
                raise InputError(f"Paper1Config.{k} must be >= 1, got {getattr(self, k)}.")


# =========================================================================================
# Step 1: diagnostic pairs and the locus
# =========================================================================================
def diagnostic_pairs(model, tasks: Any, framings: Sequence[tuple[str, str]] = DEFAULT_FRAMINGS):
    """Clean/corrupted prompts and the metric for attribution on diagnostic tasks.

    Each task (``prompt``, ``aligned``, ``misaligned``) becomes a clean prompt with a warm system
    framing and a corrupted prompt with a cold framing; both are scored on the same pair of replies
    with ``continuation_logprob_diff`` (``log p(aligned) − log p(misaligned)``). The first framing
    pair whose sides tokenise to the same length for every task is used (positions then pair one to
    one); if none does, prompts are right-aligned on t* (``align="right"``).

    Returns:
        dict with ``clean``, ``corrupted`` (prompt lists), ``metric``, ``align`` (None or "right"),
        ``framing`` (the pair used), ``tasks`` (list of dicts).
    """
    from ..metrics import continuation_logprob_diff

    rows = [dict(r) for r in tasks]
    if not rows:
        raise InputError("No diagnostic tasks; pass at least one task with prompt, aligned and misaligned.")
    for i, r in enumerate(rows):
        for k in ("prompt", "aligned", "misaligned"):
            if not isinstance(r.get(k), str) or not r[k].strip():
                raise InputError(f"Diagnostic task {r.get('id', i)} has no {k!r} text; every task needs prompt, "
                                 "aligned and misaligned.")
    if not framings:
        raise InputError("No framings; pass at least one (warm, cold) system-prompt pair.")
    metric = continuation_logprob_diff(model, [r["aligned"] for r in rows], [r["misaligned"] for r in rows])
    chat = model.has_chat_template

    def build(text):
        if chat:
            return [[{"role": "system", "content": text}, {"role": "user", "content": r["prompt"]}] for r in rows]
        return [f"{text}\nUser: {r['prompt']}\nAssistant:" for r in rows]

    for warm, cold in framings:
        clean, corr = build(warm), build(cold)
        cb, xb = metric.encode(model, clean, chat=chat), metric.encode(model, corr, chat=chat)
        if torch.equal(cb.prompt_len.cpu(), xb.prompt_len.cpu()) and torch.equal(cb.seq_len.cpu(), xb.seq_len.cpu()):
            return {"clean": clean, "corrupted": corr, "metric": metric, "align": None, "framing": (warm, cold),
                    "tasks": rows, "chat": chat}
    warm, cold = framings[0]
    log.warning("emolens: no framing pair tokenises to equal lengths on %s; right-aligning prompts on t*.", model.name)
    return {"clean": build(warm), "corrupted": build(cold), "metric": metric, "align": "right",
            "framing": (warm, cold), "tasks": rows, "chat": chat}


def find_locus(attr: Result, p_max: int, *, rule: str = "onset", onset_fraction: float = 0.5, window_span: int = 8,
               window_max: int = 3) -> dict:
    """The key intervention locus from a ``resid_pos`` attribution result.

    Args:
        attr: attribution over ``(layer, position)``, positions aligned on t* (index ``p_max - 1``).
        p_max: number of prompt positions on the aligned axis (t* is the last of them).
        rule: ``"onset"``: the first layer whose attribution mass (sum of |score|) over the last
            ``window_span`` prompt positions reaches ``onset_fraction`` of its maximum over layers;
            ``"argmax"``: the layer of that maximum.
        window_max: positions in the window (the top ones by |score| at the locus layer).

    Returns:
        ``{"layer", "window"`` (offsets from the prompt end, -1 = t*), ``"window_tokens"``,
        ``"profile"`` (per-layer mass), ``"rule"}``.
    """
    if attr.kind != "resid_pos":
        raise InputError(f"find_locus needs a 'resid_pos' result, not {attr.kind!r}.")
    s = attr.scores
    span = max(1, min(int(window_span), p_max))
    tail = s[:, p_max - span:p_max].abs().nan_to_num(0.0)  # [layer, span]
    profile = tail.sum(1)
    if float(profile.max()) <= 0:
        raise InputError("The attribution is zero at every prompt position near t*; the clean and corrupted runs "
                         "do not differ in the metric (check the framings / tasks).")
    if rule == "argmax":
        layer = int(profile.argmax())
    elif rule == "onset":
        layer = int((profile >= onset_fraction * profile.max()).nonzero()[0])
    else:
        raise InputError(f"Unknown locus rule {rule!r}; use 'onset' or 'argmax'.")
    k = max(1, min(int(window_max), span))
    top = torch.topk(tail[layer], k).indices.tolist()
    offsets = sorted(int(j) - span for j in top)  # column span-1 is t* = offset -1
    labels = attr.labels.get("position")
    toks = [labels[p_max + o] if labels else "" for o in offsets]
    return {"layer": layer, "window": offsets, "window_tokens": toks, "profile": profile.tolist(), "rule": rule,
            "onset_fraction": onset_fraction if rule == "onset" else None}



# =========================================================================================
# Data (validated up front: errors name the file, line and missing field)
# =========================================================================================
def load_tasks(cfg: Paper1Config) -> list[dict]:
    """The diagnostic tasks the locus step uses (``n_diagnostic`` of them, emotions interleaved)."""
    from ..datasets import load_diagnostic_tasks

    tasks = [dict(r) for r in load_diagnostic_tasks(cfg.tasks_data, columns=cfg.tasks_columns)]
    if cfg.n_diagnostic is not None:
        # keep the emotion balance: interleave tasks of each emotion
        by_e: dict[str, list] = {}
        for t in tasks:
            by_e.setdefault(t.get("emotion", ""), []).append(t)
        inter = [t for group in zip(*by_e.values()) for t in group] if len(by_e) > 1 else tasks
        tasks = (inter + [t for t in tasks if t not in inter])[:cfg.n_diagnostic]
    return tasks


def load_pairs(cfg: Paper1Config):
    """``(train, heldout)`` contrastive pairs of ``cfg.emotions`` (train capped at ``max_pairs`` per emotion)."""
    from ..datasets import load_contrastive_pairs

    train = load_contrastive_pairs(cfg.pairs_data, emotions=list(cfg.emotions), split="train",
                                   columns=cfg.pairs_columns)
    held = load_contrastive_pairs(cfg.pairs_data, emotions=list(cfg.emotions), split="heldout",
                                  columns=cfg.pairs_columns)
    missing = [e for e in cfg.emotions if e not in set(train["emotion"])]
    if missing:
        raise InputError(f"The contrastive pairs ({cfg.pairs_data or 'packaged file'}) have no training pairs for "
                         f"{missing}; add pairs for them or change Paper1Config.emotions.")
    if cfg.max_pairs is not None:
        seen: dict[str, int] = {}
        keep = []
        for i, r in enumerate(train):
            seen[r["emotion"]] = seen.get(r["emotion"], 0) + 1
            if seen[r["emotion"]] <= cfg.max_pairs:
                keep.append(i)
        train = train.select(keep)
    return train, held


def load_openers_split(cfg: Paper1Config) -> tuple[list[str], list[str]]:
    """``(calibration openers, held-out openers)``."""
    from ..datasets import load_openers

    texts = list(load_openers(cfg.openers_data, columns=cfg.openers_columns)["text"])
    cal = texts[:cfg.n_calibration]
    held = texts[cfg.n_calibration:]
    if cfg.n_heldout is not None:
        held = held[:cfg.n_heldout]
    if len(cal) < 2 or len(held) < 2:
        raise InputError(f"Too few openers: {len(cal)} for calibration and {len(held)} held out; lower n_calibration "
                         "or pass a longer openers file.")
    return cal, held


def check_data(cfg: Paper1Config) -> None:
    """Read and validate every data input before any work (a bad file fails in seconds, not after a step)."""
    load_tasks(cfg)
    load_pairs(cfg)
    load_openers_split(cfg)


# =========================================================================================
# Sweeps as an engine output kind
# =========================================================================================
_BASELINE_LAYER = -9999  # marks the unsteered rows of a saved sweep (global steering uses layer -1)


def _save_sweeps(sweeps: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sr in sweeps.items():
        sr.sweep_result.table.to_parquet(folder / f"{name}_table.parquet", index=False)
        frames = []
        for (L, s), df in sr.sweep_result.scores.items():
            d = df.copy()
            d.insert(0, "idx", range(len(d)))
            d.insert(0, "strength", float(s))
            d.insert(0, "layer", _BASELINE_LAYER if L is None else int(L))
            d["text"] = sr.sweep_result.texts[(L, s)]
            frames.append(d)
        pd.concat(frames, ignore_index=True).to_parquet(folder / f"{name}_replies.parquet", index=False)
        (folder / f"{name}_settings.json").write_text(json.dumps(sr.sweep_result.settings, default=_json_default))


def _load_sweeps(folder: Path, model=None) -> dict:
    out = {}
    for t in sorted(folder.glob("*_table.parquet")):
        name = t.name[:-len("_table.parquet")]
        table = pd.read_parquet(t)
        long = pd.read_parquet(folder / f"{name}_replies.parquet")
        scores, texts = {}, {}
        for (L, s), d in long.groupby(["layer", "strength"], sort=False):
            key = (None if int(L) == _BASELINE_LAYER else int(L), float(s))
            d = d.sort_values("idx")
            texts[key] = d["text"].tolist()
            scores[key] = d.drop(columns=["layer", "strength", "idx", "text"]).reset_index(drop=True)
        out[name] = _Sweep(SweepResult(table, scores, texts, json.loads((folder / f"{name}_settings.json").read_text())))
    return out


@dataclass
class _Sweep:
    """Wrapper marking a saved sweep (the engine picks the output kind by type)."""

    sweep_result: SweepResult


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


register_kind("sweeps", lambda o: isinstance(o, dict) and bool(o) and all(isinstance(v, _Sweep) for v in o.values()),
              lambda o, p: _save_sweeps(o, p), lambda p, m: _load_sweeps(p, m))


def _candidate_layers(locus_layer: int, offsets: Sequence[int], n_layers: int) -> list[int]:
    return sorted({min(max(locus_layer + int(o), 0), n_layers - 1) for o in offsets})


# =========================================================================================
# Steps
# =========================================================================================
def step_locus(ctx: Context) -> dict:
    """1. Attribution patching over layer x position on the diagnostic tasks, the locus rule, exact patching
    of the top cells. Outputs: ``attribution_resid``, ``attribution_exact`` (Results), ``locus``, ``verify``."""
    from ..attribution import attribute, prepare_pairs
    from ..patching import verify

    model, cfg, progress = ctx.model, ctx.config, ctx.progress
    tasks = load_tasks(cfg)
    dp = diagnostic_pairs(model, tasks, cfg.framings)
    rsite = cfg.vector_kind.replace("resid_", "")
    attr = attribute(model, dp["clean"], dp["corrupted"], dp["metric"], nodes="resid", method=cfg.attribution_method,
                     resid_site=rsite, align=dp["align"], chat=dp["chat"], batch_size=cfg.attribution_batch_size,
                     progress=progress)["resid"]
    attr.meta.update(framing_warm=dp["framing"][0], framing_cold=dp["framing"][1], n_tasks=len(tasks))
    pairs = prepare_pairs(model, dp["clean"], dp["corrupted"], dp["metric"], align=dp["align"], chat=dp["chat"])
    locus = find_locus(attr, pairs.p_max, rule=cfg.locus_rule, onset_fraction=cfg.onset_fraction,
                       window_span=cfg.window_span, window_max=cfg.window_max)
    locus.update(site=f"{cfg.vector_kind}.{locus['layer']}", p_max=pairs.p_max, framing=list(dp["framing"]),
                 align=dp["align"], clean_metric=attr.meta.get("clean_metric"),
                 corrupted_metric=attr.meta.get("corrupted_metric"))
    out: dict[str, Any] = {"attribution_resid": attr, "locus": json.loads(json.dumps(locus, default=_json_default))}
    # exact patching of the top cells (on a subset of tasks: each cell costs a forward per task)
    n_v = len(tasks) if cfg.n_verify_tasks is None else min(cfg.n_verify_tasks, len(tasks))
    info: dict = {"n_tasks": n_v, "k": cfg.verify_k}
    if cfg.verify_k > 0 and n_v > 0:
        sub = diagnostic_pairs(model, tasks[:n_v], [dp["framing"]])
        # verify() patches the cells of an attribution computed on the same prompts: attribute the subset too
        attr_v = attr if n_v == len(tasks) else attribute(
            model, sub["clean"], sub["corrupted"], sub["metric"], nodes="resid", method=cfg.attribution_method,
            resid_site=rsite, align=sub["align"], chat=sub["chat"], batch_size=cfg.attribution_batch_size,
            progress=progress)["resid"]
        k = min(cfg.verify_k, attr_v.scores.numel())
        v = verify(model, attr_v, sub["clean"], sub["corrupted"], sub["metric"], k=k, n_control=cfg.verify_controls,
                   align=sub["align"], chat=sub["chat"], progress=progress)
        out["attribution_exact"] = v["exact"]
        p_sub = prepare_pairs(model, sub["clean"], sub["corrupted"], sub["metric"], align=sub["align"],
                              chat=sub["chat"]).p_max
        labels = attr_v.labels.get("position", [])
        info.update(spearman=v["spearman"], pearson=v["pearson"], topk_overlap=v["topk_overlap"],
                    cells=[{"layer": int(c[0]), "position": int(c[1]),
                            "token": labels[int(c[1])] if labels else "",
                            "offset": int(c[1]) - p_sub,
                            "attribution": float(a), "exact": float(e)}
                           for c, a, e in zip(v["cells"], v["attribution_values"], v["exact_values"])])
    out["verify"] = json.loads(json.dumps(info, default=_json_default))
    return out


def step_vectors(ctx: Context) -> dict:
    """2. Mean-difference (and PCA) vectors at every layer, held-out quality, GGUF export.
    Outputs: ``vectors``, ``vectors_pca`` (EmotionVectors), ``vector_quality`` (table), ``STEER.gguf``."""
    from ..directions import pair_activations
    from ..sites import Site

    model, cfg, progress = ctx.model, ctx.config, ctx.progress
    train, held = load_pairs(cfg)
    layers = list(range(model.n_layers))
    # one capture of the training pairs serves both the mean-difference and the PCA vectors
    acts = pair_activations(model, train, [Site(cfg.vector_kind, L) for L in layers], token_reduce=cfg.token_reduce,
                            progress=progress)
    vecs = emotion_vectors(model, train, layers=layers, kind=cfg.vector_kind, method=cfg.method,
                           center=cfg.pca_center, token_reduce=cfg.token_reduce, progress=progress, activations=acts)
    vecs.combine(list(cfg.emotions), cfg.steer_name)
    # quality on held-out pairs; the combined vector is judged on the pooled held-out pairs of its parts
    held_rows = [dict(r) for r in held]
    pooled = [{**r, "emotion": cfg.steer_name} for r in held_rows]
    out: dict[str, Any] = {"vectors": vecs,
                           "vector_quality": evaluate_vectors(model, vecs, held_rows + pooled, progress=progress)}
    if cfg.compare_pca:
        other = "pca" if cfg.method == "mean_diff" else "mean_diff"
        vp = emotion_vectors(model, train, layers=layers, kind=cfg.vector_kind, method=other, center=cfg.pca_center,
                             token_reduce=cfg.token_reduce, progress=progress, activations=acts)
        vp.combine(list(cfg.emotions), cfg.steer_name)
        out["vectors_pca"] = vp
    # GGUF control vector of the steering vector (llama.cpp: --control-vector-scaled FILE:SCALE)
    try:
        export = EmotionVectors({cfg.steer_name: {k: v for k, v in vecs[cfg.steer_name].items()
                                                  if Site.parse(k) != Site("resid_pre", 0)}}, meta=dict(vecs.meta))
        import warnings as _w

        with _w.catch_warnings():
            _w.simplefilter("ignore")
            export.to_gguf(ctx.path(f"{cfg.steer_name}.gguf"), cfg.steer_name)
    except (InputError, ImportError) as e:  # e.g. a non-residual vector kind
        log.warning("emolens: GGUF export skipped: %s", e)
    return out


def step_calibration(ctx: Context) -> dict:
    """3. Strength x layer sweep per position mode (and global steering) on the calibration openers, picked
    under the fluency guard. Outputs: ``calibration`` (JSON), ``sweeps`` (tables + replies)."""
    model, cfg, progress = ctx.model, ctx.config, ctx.progress
    vecs, locus = ctx.load("vectors"), ctx.load("locus")
    prompts, _ = load_openers_split(cfg)
    layers = _candidate_layers(int(locus["layer"]), cfg.layer_offsets, model.n_layers)
    gen_kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    base_texts = generate(model, prompts, [], label="strength 0 (unsteered)", **gen_kw)
    base = (base_texts, score_condition(model, prompts, base_texts))
    out: dict = {"sweeps": [], "modes": {}, "layers": layers, "n_prompts": len(prompts)}
    sweeps: dict[str, _Sweep] = {}
    window = tuple(locus["window"])
    for mode, strengths in cfg.positions.items():
        sr = sweep(model, prompts, vecs, cfg.steer_name, strengths=strengths, layers=layers, kind=cfg.vector_kind,
                   strength_mode=cfg.strength_mode, position=mode, window=window, targets=cfg.targets, baseline=base,
                   progress=progress, **gen_kw)
        c = calibrate(sr, max_ppl_increase=cfg.max_ppl_increase, max_distinct_drop=cfg.max_distinct_drop)
        sr.table = c.table
        name = f"steer_{mode.replace('+', '_')}"
        sweeps[name] = _Sweep(sr)
        out["sweeps"].append(name)
        out["modes"][mode] = {**c.to_dict(), "sweep": name}
    if cfg.global_strengths:
        def make(s, L):
            return global_interventions(vecs, cfg.steer_name, strength=s, kind=cfg.vector_kind,
                                        strength_mode=cfg.strength_mode)

        sr = sweep(model, prompts, vecs, cfg.steer_name, strengths=cfg.global_strengths, layers=[-1],
                   make_interventions=make, targets=cfg.targets, baseline=base, progress=progress, **gen_kw)
        c = calibrate(sr, max_ppl_increase=cfg.max_ppl_increase, max_distinct_drop=cfg.max_distinct_drop)
        c.reason = c.reason.replace("layer -1, ", "all layers, ")
        sr.table = c.table
        sweeps["global"] = _Sweep(sr)
        out["sweeps"].append("global")
        out["global"] = {**c.to_dict(), "sweep": "global"}
    # the main condition: the mode whose calibrated point has the best objective
    best, best_obj = None, -math.inf
    for mode, c in out["modes"].items():
        row = sweeps[c["sweep"]].sweep_result.table
        row = row[row["chosen"]]
        obj = float(row["objective"].iloc[0]) if len(row) else -math.inf
        c["objective"] = obj
        if c["ok"] and obj > best_obj:
            best, best_obj = mode, obj
    if best is None:  # nothing passed: report the best trade-off of the first mode honestly
        best = next(iter(out["modes"]))
    out["main"] = best
    return {"calibration": json.loads(json.dumps(out, default=_json_default)), "sweeps": sweeps}


def step_evaluation(ctx: Context) -> dict:
    """4. Held-out openers: unsteered, each mode at its calibrated point, global steering, priming; paired
    tests. Outputs: ``replies`` (one table per condition), ``results_table``, ``acceptance``."""
    from ..evaluate import results_table
    from ..progress import progress_bar
    from ..steering import pooled_perplexity

    model, cfg, progress = ctx.model, ctx.config, ctx.progress
    vecs, locus, calib = ctx.load("vectors"), ctx.load("locus"), ctx.load("calibration")
    _, prompts = load_openers_split(cfg)
    gen_kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    window = tuple(locus["window"])
    conds = [Condition("unsteered")]
    for mode, c in calib["modes"].items():
        if c["layer"] is None or c["strength"] == 0:
            continue
        ivs = steering_interventions(vecs, cfg.steer_name, layers=int(c["layer"]), strength=float(c["strength"]),
                                     kind=cfg.vector_kind, strength_mode=cfg.strength_mode, position=mode,
                                     window=window, model=model)
        conds.append(Condition(f"steer:{mode}", ivs, info={"layer": c["layer"], "strength": c["strength"],
                                                           "position": mode, "main": mode == calib["main"]}))
    g = calib.get("global")
    if g and g["strength"]:
        conds.append(Condition("global", global_interventions(vecs, cfg.steer_name, strength=float(g["strength"]),
                                                               kind=cfg.vector_kind, strength_mode=cfg.strength_mode),
                               info={"strength": g["strength"]}))
    conds.append(Condition("priming", system=priming_system(list(cfg.emotions), cfg.priming_template)))
    frames: dict[str, pd.DataFrame] = {}
    for c in progress_bar(conds, desc="held-out conditions", disable=not progress):
        label = f"condition {c.name!r}" + (f" (strength {c.info['strength']:g} {cfg.strength_mode}"
                                           + (f" at layer {c.info['layer']}" if c.info.get("layer") is not None else "")
                                           + ")" if c.info.get("strength") is not None else "")
        texts = generate(model, prompts, c.interventions, label=label, system=c.system, **gen_kw)
        df = score_condition(model, prompts, texts)
        df["text"] = texts
        frames[c.name] = df
    scores = {k: v.drop(columns=["text"]) for k, v in frames.items()}
    metrics = [m for m in ("joy_trust", "joy", "trust", "first_person_rate", "positive", "negative", "vader_compound",
                           "distinct_2", "n_tokens", "perplexity") if m in scores["unsteered"]]
    table = results_table(scores, baseline="unsteered", metrics=metrics, seed=cfg.seed)
    base_ppl = pooled_perplexity(scores["unsteered"])
    acc: dict = {"alpha": cfg.alpha, "max_ppl_increase": cfg.max_ppl_increase, "n_heldout": len(prompts),
                 "baseline_ppl": base_ppl, "conditions": {}}
    for name, df in scores.items():
        if name == "unsteered":
            continue
        row = {"ppl": pooled_perplexity(df), "ppl_ratio": pooled_perplexity(df) / base_ppl,
               **next((c.info for c in conds if c.name == name), {})}
        passed = row["ppl_ratio"] <= 1.0 + cfg.max_ppl_increase
        for t in cfg.targets:
            r = table.loc[(name, t)]
            row[t] = {"mean": float(r["mean"]), "baseline": float(r["baseline_mean"]), "diff": float(r["mean_diff"]),
                      "t": float(r["t"]), "p": float(r["t_p"]), "wilcoxon_p": float(r["wilcoxon_p"]),
                      "dz": float(r["cohens_dz"])}
            passed &= bool(r["mean_diff"] > 0 and r["t_p"] < cfg.alpha)
        row["passes"] = bool(passed)
        acc["conditions"][name] = row
    acc["main"] = f"steer:{calib['main']}"
    acc["passes"] = bool(acc["conditions"].get(acc["main"], {}).get("passes", False))
    acc["any_steering_passes"] = any(v["passes"] for k, v in acc["conditions"].items() if k.startswith("steer:"))
    return {"replies": {k.replace(":", "_"): v for k, v in frames.items()}, "results_table": table.reset_index(),
            "acceptance": json.loads(json.dumps(acc, default=_json_default))}


# =========================================================================================
# Report sections (one per step)
# =========================================================================================
def _locus_section(ctx: Context) -> Section:
    from .. import viz

    cfg = ctx.config
    attr, locus, verify_info = ctx.load("attribution_resid"), ctx.load("locus"), ctx.load("verify")
    s1 = Section("1. Locus: attribution patching over layer × position")
    s1.add_text(
        f"Clean runs: system '{locus['framing'][0]}'; corrupted: '{locus['framing'][1]}' (same token length"
        f"{'' if locus['align'] is None else '; not available, right-aligned on t*'}), {attr.meta.get('n_tasks')} "
        f"diagnostic tasks, metric log p(aligned reply) − log p(misaligned reply) (nats): clean "
        f"{locus['clean_metric']:.2f}, corrupted {locus['corrupted_metric']:.2f}. Scores: attribution patching "
        f"({attr.meta.get('method')}) of {cfg.vector_kind} at every layer and position (positions aligned on the last "
        "prompt token; reply tokens follow it), denoising convention: positive = patching the warm run's activation "
        "into the cold run raises the metric.",
        f"Locus layer {locus['layer']}: the "
        + (f"first layer at which the attribution over the last {cfg.window_span} prompt positions reaches "
           f"{cfg.onset_fraction:.0%} of its maximum" if locus["rule"] == "onset" else
           f"layer with the most attribution over the last {cfg.window_span} prompt positions")
        + f" (rule '{locus['rule']}'); window = top {cfg.window_max} positions there: offsets {locus['window']} = "
        f"{locus['window_tokens']}.")
    s1.figure("Attribution patching: residual stream, layer × position (nats)", viz.resid_heatmap, attr,
              title=f"Attribution patching ({attr.meta.get('method')}), {cfg.vector_kind} × position")
    prof = Result("layers", torch.tensor(locus["profile"]), ("layer",), {"layer": list(range(len(locus["profile"])))},
                  meta={"metric": f"sum |AtP| over the last {cfg.window_span} prompt positions", "name": "window mass"})
    s1.figure("Attribution mass near the reply, per layer (the locus rule's input)", viz.layer_lines, prof,
              title=f"Attribution mass over the last {cfg.window_span} prompt positions")
    if verify_info.get("cells"):
        s1.add_text(f"Exact activation patching of the top {verify_info['k']} cells (+ {cfg.verify_controls} random "
                    f"controls) on {verify_info['n_tasks']} tasks: Spearman {verify_info['spearman']:.2f}, Pearson "
                    f"{verify_info['pearson']:.2f}, top-k overlap {verify_info['topk_overlap']:.2f}.")
        s1.add_table("Top cells: attribution estimate vs exact patching (nats)", pd.DataFrame(verify_info["cells"]))
    s1.results["attribution_resid"] = attr
    if ctx.has("attribution_exact"):
        s1.results["attribution_exact"] = ctx.load("attribution_exact")
    return s1


def _vectors_section(ctx: Context) -> Section:
    from .. import viz

    cfg = ctx.config
    vecs, quality, locus = ctx.load("vectors"), ctx.load("vector_quality"), ctx.load("locus")
    vecs_pca = ctx.load("vectors_pca", None)
    s2 = Section("2. Emotion vectors")
    s2.add_text(f"Mean-difference vectors of {', '.join(cfg.emotions)} (contrastive pairs, train split; exemplar's "
                f"last token, raw text) at {cfg.vector_kind} of every layer; '{cfg.steer_name}' is their mean. Quality "
                "on the held-out pairs: AUROC of the projection and Cohen's d. The steering vector is exported as a "
                f"llama.cpp control vector ({cfg.steer_name}.gguf: direction.L = {cfg.vector_kind}.L).")
    norms = vecs.norms(cfg.vector_kind)
    s2.figure("Vector L2 norm per layer", viz.layer_lines, norms, title="Emotion vector norm per layer")
    cos_series, cos_labels = [], []
    if len(cfg.emotions) >= 2:
        c = vecs.cosine_by_layer(cfg.emotions[0], cfg.emotions[1], cfg.vector_kind)
        cos_series.append(c.scores)
        cos_labels.append(f"cos({cfg.emotions[0]}, {cfg.emotions[1]})")
    if vecs_pca is not None:
        layers = vecs.layers(cfg.steer_name, cfg.vector_kind)
        cos_series.append(torch.tensor([float(torch.nn.functional.cosine_similarity(
            vecs.get(cfg.steer_name, f"{cfg.vector_kind}.{L}"), vecs_pca.get(cfg.steer_name, f"{cfg.vector_kind}.{L}"),
            dim=0)) for L in layers]))
        cos_labels.append("cos(mean-diff, PCA)")
    if cos_series:
        cres = Result("layers", torch.stack(cos_series), ("series", "layer"),
                      {"series": cos_labels, "layer": vecs.layers(kind=cfg.vector_kind)}, meta={"metric": "cosine"})
        s2.figure("Cosine similarity per layer", viz.layer_lines, cres, title="Cosine similarity per layer")
        s2.results["vector_cosines"] = cres
    if len(quality):
        piv = quality.pivot(index="emotion", columns="layer", values="auroc")
        qres = Result("layers", torch.tensor(piv.to_numpy(), dtype=torch.float32), ("emotion", "layer"),
                      {"emotion": list(piv.index), "layer": [int(x) for x in piv.columns]},
                      meta={"metric": "held-out AUROC", "name": "auroc"})
        s2.figure("Held-out separation (AUROC of the projection) per layer", viz.layer_lines, qres,
                  title="Held-out AUROC per layer")
        L = int(locus["layer"])
        s2.add_table(f"Held-out quality near the locus (layers {max(0, L - 3)}–{L + 3})",
                     quality[(quality.layer >= L - 3) & (quality.layer <= L + 3)].reset_index(drop=True))
        s2.results["vector_auroc"] = qres
    s2.results["vector_norms"] = norms
    return s2


def _calibration_section(ctx: Context) -> Section:
    from .. import viz

    cfg = ctx.config
    calib, sweeps, locus = ctx.load("calibration"), ctx.load("sweeps"), ctx.load("locus")
    s3 = Section("3. Calibration: strength × layer sweep with a fluency guard")
    s3.add_text(f"{calib['n_prompts']} calibration openers, greedy decoding, {cfg.max_new_tokens} new tokens. Strengths "
                f"are '{cfg.strength_mode}'-relative (multiples of the layer's median activation norm); layers = locus "
                f"{locus['layer']} + offsets {list(cfg.layer_offsets)}. A point is admissible when the pooled "
                f"perplexity of its replies under the unsteered model is ≤ ×{1 + cfg.max_ppl_increase:.2f} the "
                "unsteered replies' (and distinct-2 does not drop by more than "
                f"{cfg.max_distinct_drop if cfg.max_distinct_drop is not None else 'any'} — perplexity rewards "
                "repetition); among those, the best min(d_z) over the targets wins.")
    for mode, c in calib["modes"].items():
        s3.add_text(f"Position mode '{mode}': {c['reason']}")
    if calib.get("global"):
        s3.add_text(f"Global steering (every layer, every position, strength split over layers): {calib['global']['reason']}")
    for name, w in sweeps.items():
        sr = w.sweep_result
        mode = sr.settings.get("position", name)
        cinfo = calib["modes"].get(mode) if name != "global" else calib.get("global")
        L = cinfo["layer"] if cinfo and cinfo.get("layer") is not None else next(
            (k[0] for k in sr.scores if k[0] is not None), None)
        if L is None:
            continue
        rates = {m: sr.curve(m, L) for m in ("joy", "trust", "joy_trust", "first_person_rate") if m in sr.scores[(None, 0.0)]}
        title = "global steering" if name == "global" else f"mode '{mode}', layer {L}"
        s3.figure(f"Strength curves ({title}): NRC rates and first-person rate (95% bootstrap CI)", viz.curves, rates,
                  title=f"Rates vs strength ({title})", x_title=f"strength ({cfg.strength_mode})",
                  y_title="rate per word")
        s3.figure(f"Perplexity ratio under the unsteered model ({title})", viz.curves,
                  {"perplexity ratio": sr.curve("ppl", L, ratio=True)},
                  title=f"Perplexity ratio vs strength ({title})", x_title=f"strength ({cfg.strength_mode})",
                  y_title="× unsteered")
        cols = [c for c in ("layer", "strength", "joy_trust", "first_person_rate", "joy_trust_dz",
                            "first_person_rate_dz", "ppl", "ppl_ratio", "distinct_2_ratio", "objective",
                            "admissible", "chosen") if c in sr.table.columns]
        s3.add_table(f"Sweep table ({name})", sr.table[cols])
    return s3


def _evaluation_section(ctx: Context) -> Section:
    cfg = ctx.config
    table, acc, replies = ctx.load("results_table"), ctx.load("acceptance"), ctx.load("replies")
    s4 = Section("4. Held-out evaluation")
    s4.add_text(f"{acc['n_heldout']} held-out openers (not used for calibration), greedy, {cfg.max_new_tokens} new "
                "tokens. Conditions: unsteered; each position mode at its calibrated point; global steering; "
                "instruction priming (system prompt asking for the emotions). Paired t-tests and Wilcoxon vs "
                "unsteered, Holm adjusted within a condition; 95% bootstrap CIs of the mean difference. NRC rates are "
                "words per word token (Mohammad & Turney 2013, research use).")
    s4.figure("Change vs unsteered per condition (mean paired difference, 95% bootstrap CI)", _effects_figure, table,
              [m for m in ("joy_trust", "joy", "trust", "first_person_rate") if m in set(table["metric"])])
    s4.add_table("Results table (condition × metric)", table)
    texts = {k: v["text"].tolist() for k, v in replies.items()}
    n = min(cfg.n_examples, len(texts.get("unsteered", [])))
    _, held_prompts = load_openers_split(cfg)
    s4.add_table("Example replies", pd.DataFrame({"opener": held_prompts[:n], **{k: v[:n] for k, v in texts.items()}}))
    return s4


def _summary_section(ctx: Context) -> Section:
    cfg = ctx.config
    acc, locus = ctx.load("acceptance"), ctx.load("locus")
    s0 = Section("Paper 1: emotion vectors and steering (summary)")
    main = acc["main"]
    mrow = acc["conditions"].get(main, {})
    s0.add_text(
        "Reimplementation of 'Conversations: Love Them, Hate Them, Steer Them' (arXiv 2505.17413): find the "
        "intervention locus by attribution patching, build a joy/trust vector from contrastive pairs, steer "
        "generation there, and compare with the unsteered model, global steering and instruction priming. The "
        "paper's full text was not available; inferred steps are configuration (Paper1Config).",
        f"Model {ctx.model.name}; locus {locus['site']} (rule {locus['rule']}), window offsets {locus['window']} "
        f"(tokens {locus['window_tokens']}). Steering vector '{cfg.steer_name}' = mean of "
        f"{', '.join(cfg.emotions)} mean-difference vectors.",
        "Data: " + ", ".join(f"{k} = {getattr(cfg, k) or 'packaged'}" for k in ("tasks_data", "pairs_data",
                                                                                "openers_data")) + ".",
    )
    if mrow:
        jt, fp = mrow.get("joy_trust", {}), mrow.get("first_person_rate", {})
        verdict = "PASSES" if acc["passes"] else "does NOT pass"
        nan = float("nan")
        s0.add_text(
            f"Acceptance on {acc['n_heldout']} held-out openers ({main}: layer {mrow.get('layer')}, strength "
            f"{mrow.get('strength')} × median activation norm): NRC joy+trust rate {jt.get('baseline', nan):.4f} → "
            f"{jt.get('mean', nan):.4f} (paired t p = {jt.get('p', nan):.2g}, d_z = {jt.get('dz', nan):.2f}); "
            f"first-person singular rate {fp.get('baseline', nan):.4f} → {fp.get('mean', nan):.4f} "
            f"(p = {fp.get('p', nan):.2g}, d_z = {fp.get('dz', nan):.2f}); pooled perplexity under the "
            f"unsteered model ×{mrow.get('ppl_ratio', nan):.3f} (bound ×{1 + cfg.max_ppl_increase:.2f}). "
            f"The criterion (both p < {cfg.alpha}, perplexity rise ≤ {cfg.max_ppl_increase:.0%}) {verdict}.")
    else:
        s0.add_text("No steering condition passed calibration; see the calibration section for the trade-off curves.")
    rows = []
    for name, r in acc["conditions"].items():
        rows.append({"condition": name, "layer": r.get("layer"), "strength": r.get("strength"),
                     "joy_trust": r.get("joy_trust", {}).get("mean"), "joy_trust_p": r.get("joy_trust", {}).get("p"),
                     "first_person": r.get("first_person_rate", {}).get("mean"),
                     "first_person_p": r.get("first_person_rate", {}).get("p"), "ppl_ratio": r["ppl_ratio"],
                     "passes": r["passes"]})
    s0.add_table("Acceptance per condition (held-out openers; p = paired t-test vs unsteered)", pd.DataFrame(rows))
    s0.add_table("Steps in this call (computed or reused from the run folder, and why; reused steps show the time "
                 "of the run that computed them)", log_table(ctx))
    return s0


#: The paper-1 pipeline: public steps on the engine (:mod:`emolens.pipelines.engine`).
STEPS: tuple[Step, ...] = (
    Step("locus", step_locus, config=("tasks_columns", "n_diagnostic", "framings", "attribution_method",
                                       "attribution_batch_size", "vector_kind", "locus_rule", "onset_fraction",
                                       "window_span", "window_max", "verify_k", "verify_controls", "n_verify_tasks"),
         data=("tasks_data",), section=_locus_section),
    Step("vectors", step_vectors, config=("pairs_columns", "emotions", "steer_name", "max_pairs", "vector_kind",
                                          "method", "pca_center", "token_reduce", "compare_pca"),
         data=("pairs_data",), section=_vectors_section),
    Step("calibration", step_calibration, inputs=("locus", "vectors"),
         config=("openers_columns", "n_calibration", "n_heldout", "steer_name", "vector_kind", "positions",
                 "layer_offsets", "global_strengths", "strength_mode", "max_ppl_increase", "max_distinct_drop",
                 "targets", "max_new_tokens", "batch_size"),
         data=("openers_data",), section=_calibration_section),
    Step("evaluation", step_evaluation, inputs=("locus", "vectors", "calibration"),
         config=("openers_columns", "n_calibration", "n_heldout", "priming_template", "emotions", "steer_name",
                 "vector_kind", "strength_mode", "max_new_tokens", "batch_size", "seed", "alpha", "max_ppl_increase",
                 "targets", "n_examples"),
         data=("openers_data",), section=_evaluation_section),
)


def run(model, out_dir, *, quick: bool = False, progress: bool = True, config: Paper1Config | None = None,
        resume: bool = True, on_step=None) -> list[Section]:
    """Run paper 1 end to end on ``model``; raw results go to ``out_dir/paper1``; returns report sections.

    Args:
        model: an :class:`~emolens.model.EmoModel`.
        out_dir: run folder.
        quick: :meth:`Paper1Config.quick` (a smoke run; seconds on a tiny model, ~2 min on the embedded one).
        progress: progress bars.
        config: hyperparameters and data (default :class:`Paper1Config`).
        resume: reuse steps of an earlier run in ``out_dir`` whose fingerprint (config fields, model, data,
            inputs) still matches; the others, and everything downstream of them, recompute.
        on_step: called with each step's :class:`~emolens.pipelines.engine.StepLog` (e.g. to update run.json).

    Returns:
        report sections (summary, locus, vectors, calibration, held-out evaluation).
    """
    cfg = config if config is not None else Paper1Config()
    if quick:
        cfg = cfg.quick()
    cfg.check()
    check_data(cfg)
    root = Path(out_dir) / "paper1"
    ctx = run_steps(STEPS, model, cfg, root, progress=progress, resume=resume, on_step=on_step, label="paper 1")
    io.write_json(root / "run_config.json", {"config": cfg.to_dict(), "model": model_fingerprint(model)})
    return [_summary_section(ctx)] + engine_sections(STEPS, ctx)


def _effects_figure(table: pd.DataFrame, metrics: Sequence[str]):
    """Grouped bars: mean paired difference vs unsteered per condition and metric, with CI whiskers."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for m in metrics:
        t = table[(table["metric"] == m) & (table["condition"] != "unsteered")]
        fig.add_bar(name=m, x=list(t["condition"]), y=list(t["mean_diff"]),
                    error_y=dict(type="data", symmetric=False, array=list(t["ci_high"] - t["mean_diff"]),
                                 arrayminus=list(t["mean_diff"] - t["ci_low"])))
    fig.update_layout(barmode="group", height=420, yaxis_title="Δ rate per word vs unsteered",
                      xaxis_title="condition", title="Held-out openers: change vs the unsteered model")
    return fig



# =========================================================================================
# CLI: emolens steer
# =========================================================================================
def add_steer_args(p) -> None:
    """Options of ``emolens steer``."""
    p.add_argument("--model", default=None, help="model name (default: smollm2-135m-instruct)")
    p.add_argument("--device", default=None)
    p.add_argument("--prompt", default="Hey, how's your week been so far?", help="the user message")
    p.add_argument("--emotion", default="joy,trust",
                   help="emotion(s) whose mean vector steers, comma-separated (Plutchik names)")
    p.add_argument("--vectors", default=None, help="saved EmotionVectors (.safetensors) or a control-vector .gguf")
    p.add_argument("--run", default=None, help="a run folder with a paper-1 result: use its vectors and "
                   "calibrated layer/strength/position")
    p.add_argument("--layer", type=int, default=None, help="layer to steer (default: the run's calibrated layer, else "
                   "40%% of the depth)")
    p.add_argument("--strength", type=float, default=None, help="strength (default: the run's calibrated one, else 0.1 "
                   "with --mode norm)")
    p.add_argument("--mode", default=None, choices=("absolute", "rms", "norm"),
                   help="strength mode (default: the run's, else norm)")
    p.add_argument("--position", default=None, choices=("locus", "generated", "all", "locus+generated"),
                   help="position mode (default: the run's calibrated mode, else all)")
    p.add_argument("--window", default="-3,-2,-1", help="locus window: offsets from the prompt end")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--save-gguf", default=None, help="also write the steering vector as a llama.cpp control vector")
    p.add_argument("--pairs-data", default=None, help="contrastive pairs to build the vector from (JSONL/CSV/parquet "
                   "or a datasets folder; schema: emotion, positive, negative[, split]); default: the packaged pairs")
    from .options import add_run_folder_args

    add_run_folder_args(p, overwrite_with_resume="continue it under changed options (only the steps they affect "
                        "recompute)", resume_help="continue the steer run in DIR: the vectors and replies it finished "
                        "are reused; refused if DIR holds another model or options unless --overwrite")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass
class SteerConfig(PipelineConfig):
    """Everything ``emolens steer``'s replies depend on, defaults resolved (its run folder's identity).

    ``vectors``, ``run`` and ``pairs_data`` are absolute paths (their content is hashed into the
    fingerprints): a saved vectors file, a paper-1 run's ``paper1`` folder, or contrastive pairs; at
    most one is used, in that order of precedence (``run`` first).
    """

    prompt: str = "Hey, how's your week been so far?"
    emotions: tuple[str, ...] = ("joy", "trust")
    vectors: str | None = None
    run: str | None = None
    pairs_data: str | None = None
    layer: int = 0
    strength: float = 0.1
    mode: str = "norm"
    position: str = "all"
    window: tuple[int, ...] = (-3, -2, -1)
    max_new_tokens: int = 60

    def check(self) -> None:
        if not self.emotions:
            raise InputError("--emotion is empty; name at least one emotion, e.g. --emotion joy,trust.")
        if self.mode not in ("absolute", "rms", "norm"):
            raise InputError(f"Unknown strength mode {self.mode!r}; use absolute, rms or norm.")
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}.")


def steer_vectors_step(ctx: Context) -> dict:
    """The steering vector: a paper-1 run's vectors, a saved file, or built from contrastive pairs at ``layer``."""
    from ..datasets import load_contrastive_pairs

    cfg, m = ctx.config, ctx.model
    emotions = list(cfg.emotions)
    name = "+".join(emotions)
    if cfg.run:
        root = Path(cfg.run)
        name = Paper1Config.from_dict(json.loads((root / "run_config.json").read_text())["config"]).steer_name
        vecs = EmotionVectors.load(root / "vectors", model=m)
    elif cfg.vectors:
        pth = Path(cfg.vectors)
        vecs = (EmotionVectors.from_gguf(pth, emotion=name, model=m) if pth.suffix == ".gguf"
                else EmotionVectors.load(pth, model=m))
        if name not in vecs:
            if len(vecs.emotions) == 1:
                name = vecs.emotions[0]
            else:
                vecs.combine(emotions, name)
    else:
        pairs = load_contrastive_pairs(cfg.pairs_data, emotions=emotions, split="train")
        if not len(pairs):
            raise InputError(f"No training pairs for {emotions} in {cfg.pairs_data or 'the packaged pairs'}; add "
                             "pairs for these emotions or pick others with --emotion.")
        vecs = emotion_vectors(m, pairs, layers=[cfg.layer], progress=False)
        if len(emotions) > 1:
            vecs.combine(emotions, name)
        else:
            name = emotions[0]
    if cfg.mode == "norm" and not vecs.stats:
        raise InputError("These vectors carry no activation statistics (a GGUF file); use --mode absolute or rms.")
    return {"vectors": vecs, "steer_vector": {"name": name}}


def steer_unsteered_step(ctx: Context) -> dict:
    """The model's reply to ``prompt`` without intervention."""
    cfg = ctx.config
    return {"unsteered": {"text": generate(ctx.model, [cfg.prompt], [], max_new_tokens=cfg.max_new_tokens)[0]}}


def steer_steered_step(ctx: Context) -> dict:
    """The reply with the steering vector added at ``layer`` (``strength`` in ``mode`` units, ``position``)."""
    cfg = ctx.config
    vecs, name = ctx.load("vectors"), ctx.load("steer_vector")["name"]
    ivs = steering_interventions(vecs, name, layers=cfg.layer, strength=cfg.strength, strength_mode=cfg.mode,
                                 position=cfg.position, window=tuple(cfg.window), model=ctx.model)
    text = generate(ctx.model, [cfg.prompt], ivs, label=f"strength {cfg.strength:g} ({cfg.mode}) at layer {cfg.layer}",
                    max_new_tokens=cfg.max_new_tokens)[0]
    return {"steered": {"text": text}}


#: ``emolens steer`` as engine steps (its run folder's ``steer/``): a killed call resumes, a changed option
#: recomputes only what depends on it (e.g. --strength: the steered reply, not the vector or the unsteered reply).
STEER_STEPS: tuple[Step, ...] = (
    Step("vectors", steer_vectors_step, config=("emotions", "layer", "mode"), data=("vectors", "run", "pairs_data")),
    Step("unsteered", steer_unsteered_step, config=("prompt", "max_new_tokens")),
    Step("steered", steer_steered_step, inputs=("vectors",),
         config=("prompt", "max_new_tokens", "layer", "strength", "mode", "position", "window")),
)


def _steer_config(m, args) -> SteerConfig:
    """The resolved :class:`SteerConfig` of ``emolens steer``'s options (a --run's calibration fills defaults)."""
    emotions = tuple(e.strip() for e in args.emotion.split(",") if e.strip())
    if not emotions:
        raise InputError("--emotion is empty; name at least one emotion, e.g. --emotion joy,trust.")
    layer, strength, position, mode = args.layer, args.strength, args.position, args.mode
    try:
        window = tuple(int(x) for x in args.window.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--window {args.window!r}: pass comma-separated token offsets from the prompt end, "
                         "e.g. --window -3,-2,-1.") from None
    run = vectors = pairs = None
    if args.run:
        root = Path(args.run) / "paper1"
        if not (root / "calibration.json").exists():
            raise InputError(f"{args.run} holds no paper-1 calibration (expected {root / 'calibration.json'}); run "
                             "`emolens run --only paper1` first or drop --run.")
        calib = json.loads((root / "calibration.json").read_text())
        rcfg = Paper1Config.from_dict(json.loads((root / "run_config.json").read_text())["config"])
        c = calib["modes"][calib["main"]]
        layer = c["layer"] if layer is None else layer
        strength = c["strength"] if strength is None else strength
        position = position or calib["main"]
        mode = mode or rcfg.strength_mode
        window = tuple(json.loads((root / "locus.json").read_text())["window"])
        run = str(root.resolve())
    elif args.vectors:
        if not Path(args.vectors).is_file():
            raise InputError(f"--vectors {args.vectors}: no such file; pass a saved .safetensors or .gguf file.")
        if Path(args.vectors).suffix != ".gguf":
            saved_path(args.vectors, "emotion vectors")  # a file of another kind fails before a run folder exists
        vectors = str(Path(args.vectors).resolve())
    elif args.pairs_data:
        if not Path(args.pairs_data).exists():
            raise InputError(f"--pairs-data {args.pairs_data}: no such file or folder.")
        pairs = str(Path(args.pairs_data).resolve())
    mode = mode or "norm"
    if layer is None:
        layer = round(0.4 * (m.n_layers - 1))
    if strength is None:
        strength = 0.1 if mode == "norm" else 0.5 if mode == "rms" else 2.0
    return SteerConfig.from_dict({"prompt": args.prompt, "emotions": list(emotions), "vectors": vectors, "run": run,
                                  "pairs_data": pairs, "layer": layer, "strength": strength, "mode": mode,
                                  "position": position or "all", "window": list(window),
                                  "max_new_tokens": args.max_new_tokens})


def steer_cli(args) -> int:
    """``emolens steer``: the unsteered and the steered reply to one prompt, computed as engine steps in a run
    folder (``--resume DIR`` continues one; a folder of another model or other options is refused)."""
    import emolens
    from .. import report

    m = emolens.load_model(args.model, device=args.device)
    cfg = _steer_config(m, args)
    identity = {"command": "steer", "model": model_fingerprint(m), "config": cfg.to_dict()}
    with RunFolder.open(args.out, args.name, identity, resume=args.resume, overwrite=args.overwrite) as rf:
        ctx = run_steps(STEER_STEPS, m, cfg, rf.path / "steer", progress=not args.no_progress, label="steer",
                        on_step=lambda e: rf.step_done("steer", e))
        name = ctx.load("steer_vector")["name"]
        base, steered = ctx.load("unsteered")["text"], ctx.load("steered")["text"]
        print(f"model: {m.name}\nprompt: {cfg.prompt}\n\n[unsteered]\n{base}\n\n"
              f"[steered: +{cfg.strength:g} ({cfg.mode}) x '{name}' at resid_post.{cfg.layer}, positions: "
              f"{cfg.position}]\n{steered}")
        if args.save_gguf:
            vecs = ctx.load("vectors")
            single = EmotionVectors({name: vecs[name]}, meta=dict(vecs.meta))
            print(f"control vector: {single.to_gguf(args.save_gguf, name)}")
        sec = Section("Steering one reply")
        sec.add_text(f"prompt: {cfg.prompt!r}", f"unsteered: {base!r}",
                     f"steered (+{cfg.strength:g} ({cfg.mode}) x '{name}' at resid_post.{cfg.layer}, positions "
                     f"{cfg.position}): {steered!r}")
        sec.add_table("Steps in this call (computed or reused from the run folder, and why)", log_table(ctx))
        path = report.write_report([report.model_info_section(m), sec], rf.path, title=f"emolens steer: {m.name}",
                                   meta=report.run_metadata(m, cfg.to_dict(), command="emolens steer"),
                                   model_info=m.info())
        print(f"run folder: {rf.path}\nreport: {Path(path).resolve()}")
        return 0
