"""Paper 2 end to end: "Do LLMs 'Feel'? Emotion Circuits Discovery and Control" (Wang et al., 2025).

Steps (:data:`STEPS`, public steps on the engine :mod:`emolens.pipelines.engine`, raw results in
``OUT_DIR/paper2/``; a rerun reuses a step only when its configuration fields, model, data and
inputs are unchanged; the ``step_*`` functions are the same computations with explicit arguments):

1. :func:`step_elicit` - P_emo generation + judge acceptance (the paper's prompting; on the test
   split it is the *prompting baseline*).
2. :func:`step_stats` / directions - one streaming pass over the analysis prompts: context-agnostic
   emotion directions per layer and sublayer (attention state ``resid_mid``, MLP state
   ``resid_post``), difference vectors (step 5), sigma, neuron/head score moments.
3. :func:`step_steer` - validation by steering (RMS-scaled, layer range, ``Pos.from_last()``).
4. :func:`step_component_scores` (neurons: activation x beta; heads: closed form) and
   :func:`step_curves` (ablation/enhancement of top-k vs random-k with CIs).
5. :func:`step_influence` - sublayer causal influence over the alpha grid, in units of sigma.
6. :func:`step_circuits` - global circuit per emotion (budget, quotas, cap), saved as JSON.
7. :func:`step_modulate` - circuit modulation during generation (no emotion instruction).
8. Accuracy tables per emotion and per valence: prompting vs steering vs circuit.
9. :func:`ensemble_step` - every method (and the unsteered baseline) judged by the judge ensemble
   (``ensemble_judges``: NRC lexicon, NADE, the probe; majority vote): per-method x per-emotion accuracy
   with Wilson 95 % intervals for each judge and the majority, judge agreement (Cohen's / Fleiss' kappa),
   example replies of every method.
10. :func:`side_effects_step` - a side-effect card per method (perplexity under the unsteered model,
    distinct-2, restatement and emotion-name rates, task retention with vs without the intervention).
11. :func:`judge_step` - the judge's own accuracy on held-out labelled sentences (``judge_eval``,
    default the packaged ``judge_eval.jsonl``): how far its verdicts above can be trusted.
Report only: :func:`circuit_attention_step` - attention patterns of each circuit's top heads on a
circuit-modulated reply (circuitsvis, offline), shown next to the head and neuron heatmaps.

Every hyperparameter lives in :class:`Paper2Config` with the paper's value as default, except the
steering and circuit strengths, which are calibrated in every run on the analysis split (fluency
guarded; :func:`calibrate_steer_step`, :func:`calibrate_circuit_step`) unless you pass them, and the acceptance filter, which is decided
from the judge's acceptance rate; the report states what was chosen and why.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .. import io
from .engine import (Context, PipelineConfig, Step, log_table, model_fingerprint, register_kind, run_steps,
                     sections as engine_sections)
from ..errors import InputError, JudgeError
from ..results import Result, stack_results
from ..sections import Section

log = logging.getLogger("emolens")

__all__ = ["Paper2Config", "SIZES", "STEPS", "GenEval", "make_judge", "generate_replies", "step_elicit", "step_stats",
           "step_steer", "step_component_scores", "step_curves", "step_influence", "step_circuits", "step_modulate",
           "step_calibrate", "accuracy_tables", "curve_ratio_table", "analysis_items", "test_items", "check_data",
           "elicit_texts_step", "elicit_step", "stats_step", "scores_step", "curves_step", "influence_step",
           "circuits_step", "calibrate_steer_step", "calibrate_circuit_step", "eval_prompting_texts_step", "eval_steering_texts_step",
           "eval_circuit_texts_step", "eval_prompting_step", "eval_steering_step", "eval_circuit_step",
           "examples_step", "judge_step", "run", "circuit_cli", "add_circuit_args", "METHODS", "make_ensemble",
           "eval_unsteered_texts_step", "ensemble_step", "side_effects_step", "circuit_attention_step",
           "ensemble_tables"]



@dataclass
class Paper2Config(PipelineConfig):
    """Every hyperparameter of the paper-2 pipeline; defaults are the paper's values, except the two
    strengths (``steer_alpha``, ``circuit_scale``: ``None`` = calibrated in the run on the analysis
    split, see :func:`calibrate_steer_step`, :func:`calibrate_circuit_step`) and the acceptance filter (``None`` = decided from the judge's
    acceptance, see :func:`elicit_step`). :meth:`paper` gives the paper's values for all three.

    Layer ranges are fractions of depth (``l / n_layers``, inclusive) so they transfer across
    models: steering 11-20 of 28 = (0.39, 0.72); reference layers 21-25 of 28 = (0.75, 0.9);
    PCA depths 1, 9, 12, 27 of 28.

    Data fields (``None`` = the packaged SEV-format splits) take a JSONL/CSV/parquet path or a Hugging
    Face ``datasets`` folder; ``*_columns`` maps schema fields to your columns (CSV: nested fields as
    ``event.positive``); ``judge_train`` is a JSONL file of labelled sentences for the probe judge;
    ``judge_eval`` the labelled held-out sentences the judge's accuracy is measured on (step ``judge``;
    JSONL/CSV/parquet/``datasets`` folder, fields ``text`` and ``emotion``, ``judge_eval_columns`` maps them).
    """

    # data and prompts
    analysis_data: str | None = None  #: SEV-format records for the analysis split (None = packaged)
    analysis_columns: dict[str, str] = field(default_factory=dict)
    test_data: str | None = None  #: SEV-format records for the test split (None = packaged)
    test_columns: dict[str, str] = field(default_factory=dict)
    emotions: tuple[str, ...] = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")
    valences: tuple[str, ...] = ("positive", "neutral", "negative")
    analysis_per_theme: int | None = None  #: records per theme of the analysis split (None = all)
    analysis_max_records: int | None = None  #: cap on analysis records after per_theme (spread over themes)
    test_per_theme: int | None = None  #: records per theme of the test split (None = all)
    test_max_records: int | None = None  #: cap on test records after per_theme
    system_emo: str = "Always reply in {emotion}.\nKeep the reply to at most two sentences."
    system_neu: str = "Keep the reply to at most two sentences."
    # judge
    judge: str = "probe"  #: "probe" (project MiniLM classifier), "nrc", or "openai" (paper: GPT-4o-mini)
    judge_url: str | None = None
    judge_model: str = "gpt-4o-mini"
    judge_train: str | None = None  #: training sentences of the probe judge (None = packaged judge_train.jsonl)
    judge_eval: str | None = None  #: held-out labelled sentences for the judge's accuracy (None = packaged judge_eval)
    judge_eval_columns: dict[str, str] = field(default_factory=dict)
    # step 1: elicitation
    accept_filter: bool | None = None  #: True (paper): accepted samples only; None: on when it keeps enough groups
    accept_min_fraction: float = 0.5  #: auto filter: on when >= this fraction of context groups stay complete
    prompt_max_new_tokens: int = 100
    prompt_min_new_tokens: int = 0
    prompt_repetition_penalty: float = 1.0
    prompt_no_repeat_ngram: int = 0
    # step 2
    final_norm: bool = True  #: last layer's MLP state after the final norm (HF hidden_states[-1])
    head_moments: bool = True  #: per-head z second moments for the std of head scores
    batch_size: int = 16  #: prompts per analysis forward pass
    gen_batch_size: int = 32  #: prompts per generation batch
    # step 3: steering
    steer_alpha: float | None = None  #: None = calibrated in the run (paper: 8)
    steer_layers_frac: tuple[float, float] = (0.39, 0.72)
    steer_sublayer: str = "mlp"
    steer_max_new_tokens: int = 100
    steer_min_new_tokens: int = 10
    steer_repetition_penalty: float = 1.05
    steer_no_repeat_ngram: int = 3
    # step 4c: ablation / enhancement curves (best reading)
    curve_layers_frac: tuple[float, ...] = (0.5, 0.8)
    curve_ks: tuple[int, ...] = tuple(range(11))
    curve_n_random: int = 5
    curve_samples: int | None = None  #: P_emo samples per emotion (None = all)
    enhance_scale: float = 1.0
    # step 6: sublayer influence
    influence_alphas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
    ref_layers_frac: tuple[float, float] = (0.75, 0.9)
    influence_samples: int | None = None  #: P_neu samples (None = all analysis items)
    # step 7: circuit assembly
    budget_per_sublayer: float = 10.0
    mlp_ratio: float = 0.7
    min_neurons: int = 4
    min_heads: int = 2
    cap_ratio: float = 0.4
    # step 8: circuit modulation
    circuit_scale: float | None = None  #: None = calibrated in the run (paper: 1)
    scale_overrides: dict[str, float] = field(default_factory=dict)  #: per-emotion scale (the repo: {"anger": 0.8})
    circuit_max_new_tokens: int = 100
    circuit_min_new_tokens: int = 10
    circuit_repetition_penalty: float = 1.1
    circuit_no_repeat_ngram: int = 3
    # calibration (not in the paper): sweeps on the analysis split, chosen by judge accuracy + fluency guard
    calib_alphas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    calib_scales: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    calib_records: int = 4
    calib_max_ppl_ratio: float = 4.0
    calib_min_distinct2: float = 0.3
    # judge ensemble, side-effect card, attention widgets (issue 10; not in the paper)
    ensemble_judges: tuple[str, ...] = ("nrc", "nade", "probe")  #: judged by each + majority vote ("openai": judge_url)
    retention_questions: int | None = None  #: retention questions asked per method (None = all 50; quick: 12)
    retention_max_new_tokens: int = 12
    examples_per_emotion: int = 2  #: example replies per method and emotion in the report
    attention_top_heads: int = 4  #: circuit heads per emotion shown with circuitsvis
    attention_max_tokens: int = 96  #: last positions of prompt + reply shown in each widget
    # report
    pca_layers_frac: tuple[float, ...] = (1 / 28, 9 / 28, 12 / 28, 27 / 28)
    example_record: int = 0
    example_valence: str = "negative"
    seed: int = 0
    notes: tuple[str, ...] = ()

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def paper(cls) -> "Paper2Config":
        """The paper's values (Llama-3.2-3B-Instruct): alpha 8, scale 1, acceptance filter on."""
        return cls(steer_alpha=8.0, circuit_scale=1.0, accept_filter=True)

    @classmethod
    def for_model(cls, model_or_name: Any = None) -> "Paper2Config":
        """Defaults with strengths calibrated in the run, sized by :data:`SIZES` for known small models
        (run sizes for a CPU budget, never strengths)."""
        name = str(getattr(model_or_name, "name", model_or_name) or "").lower()
        over = SIZES.get(name)
        if over is None and name.startswith("tiny-"):
            over = SIZES["tiny"]
        return cls().replace(**over) if over else cls()

    def quick(self) -> "Paper2Config":
        """A small, fast variant: fewer samples and tokens, a small calibration grid on one record, and (unless
        set) no acceptance filter, which saves the elicitation pass over the analysis split."""
        return self.replace(analysis_per_theme=1, test_per_theme=1,
                            accept_filter=False if self.accept_filter is None else self.accept_filter,
                            test_max_records=min(self.test_max_records or 4, 4), curve_samples=8,
                            curve_n_random=3, curve_layers_frac=self.curve_layers_frac[:1], influence_samples=8,
                            influence_alphas=(0.3, 0.7), calib_records=1,
                            calib_alphas=tuple(a for a in self.calib_alphas if a <= 4.0)[:3] or self.calib_alphas[:1],
                            calib_scales=tuple(s for s in self.calib_scales if s <= 4.0)[:3] or self.calib_scales[:1],
                            prompt_max_new_tokens=min(self.prompt_max_new_tokens, 24),
                            steer_max_new_tokens=min(self.steer_max_new_tokens, 24),
                            circuit_max_new_tokens=min(self.circuit_max_new_tokens, 24),
                            steer_min_new_tokens=min(self.steer_min_new_tokens, 8),
                            circuit_min_new_tokens=min(self.circuit_min_new_tokens, 8),
                            retention_questions=min(self.retention_questions or 12, 12))

    def check(self) -> None:
        from ..circuits.prompts import check_emotions

        check_emotions(self.emotions)
        if self.judge not in ("probe", "nrc", "openai"):
            raise InputError(f"Unknown judge {self.judge!r}; use 'probe', 'nrc' or 'openai'.")
        bad = [j for j in self.ensemble_judges if j not in ("nrc", "nade", "probe", "openai")]
        if bad or not self.ensemble_judges or len(set(self.ensemble_judges)) != len(self.ensemble_judges):
            raise InputError(f"Paper2Config.ensemble_judges={list(self.ensemble_judges)}: give distinct judges out of "
                             "'nrc', 'nade', 'probe', 'openai' (e.g. ['nrc', 'nade', 'probe']).")
        if "openai" in self.ensemble_judges and not self.judge_url:
            raise InputError("ensemble_judges includes 'openai' but judge_url is not set; pass the server's URL "
                             "(e.g. 'http://127.0.0.1:8000/v1') or drop 'openai'.")
        if self.retention_questions is not None and self.retention_questions < 1:
            raise InputError(f"Paper2Config.retention_questions must be >= 1 or None (all), got "
                             f"{self.retention_questions}.")
        for k in ("batch_size", "gen_batch_size", "calib_records", "retention_max_new_tokens", "examples_per_emotion",
                  "attention_top_heads"):
            if getattr(self, k) < 1:
                raise InputError(f"Paper2Config.{k} must be >= 1, got {getattr(self, k)}.")
        for k in ("steer_alpha", "circuit_scale"):
            v = getattr(self, k)
            if v is not None and not v == v:
                raise InputError(f"Paper2Config.{k} is NaN; pass a number or None (calibrate).")
        if (self.steer_alpha is None and not self.calib_alphas) or (self.circuit_scale is None and not self.calib_scales):
            raise InputError("A strength is left to calibration (None) but its grid (calib_alphas / calib_scales) is "
                             "empty; pass the value or a grid.")

    def layers(self, frac: Sequence[float], n_layers: int) -> list[int]:
        from ..circuits.influence import layers_from_fraction

        return layers_from_fraction(n_layers, (float(frac[0]), float(frac[1])))

    def scale_for(self, emotion: str) -> float:
        return float(self.scale_overrides.get(emotion, self.circuit_scale))


#: Run sizes for known small models on a CPU budget (fewer records, samples and tokens). These are
#: sizes, not strengths: ``steer_alpha`` and ``circuit_scale`` are calibrated in every run unless passed.
SIZES: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "test_per_theme": 2, "curve_samples": 16, "influence_samples": 16, "prompt_max_new_tokens": 40,
        "steer_max_new_tokens": 40, "circuit_max_new_tokens": 40,
        "notes": ("CPU-sized for smollm2-135m-instruct: 40 new tokens, test split 2 records per theme, 16 samples "
                  "for curves and influence",)},
    "tiny": {"accept_filter": False, "judge": "nrc", "analysis_per_theme": 1, "test_per_theme": 1,
             "test_max_records": 2, "curve_samples": 4, "curve_n_random": 2, "influence_samples": 4,
             "influence_alphas": (0.3,), "prompt_max_new_tokens": 6, "steer_max_new_tokens": 6,
             "circuit_max_new_tokens": 6, "steer_min_new_tokens": 2, "circuit_min_new_tokens": 2,
             "calib_alphas": (2.0,), "calib_scales": (2.0,), "calib_records": 1, "calib_max_ppl_ratio": 1e9,
             "calib_min_distinct2": 0.0, "budget_per_sublayer": 2.0, "min_neurons": 1,
             "min_heads": 1, "retention_questions": 4, "retention_max_new_tokens": 4, "attention_top_heads": 2,
             "attention_max_tokens": 48, "notes": ("tiny random-weight test model: sizes shrunk for tests",)},
}


# =========================================================================================
# Generation + judging
# =========================================================================================
@dataclass
class GenEval:
    """Generated replies with judge verdicts for one method.

    ``samples`` columns: ``skeleton_id, theme, valence, emotion, text, match, label, score``.
    """

    method: str
    samples: pd.DataFrame

    @property
    def accuracy(self) -> float:
        return float(self.samples["match"].mean()) if len(self.samples) else float("nan")

    def by(self, col: str) -> pd.Series:
        return self.samples.groupby(col, sort=False)["match"].mean()

    def result(self, model_name: str | None = None) -> Result:
        """Accuracy per emotion x valence: Result kind ``"matrix"`` (emotion, valence), extra ``n``."""
        emos = list(dict.fromkeys(self.samples["emotion"]))
        vals = list(dict.fromkeys(self.samples["valence"]))
        acc = torch.full((len(emos), len(vals)), float("nan"))
        n = torch.zeros(len(emos), len(vals))
        for (e, v), g in self.samples.groupby(["emotion", "valence"]):
            acc[emos.index(e), vals.index(v)] = float(g["match"].mean())
            n[emos.index(e), vals.index(v)] = len(g)
        return Result("matrix", acc, ("emotion", "valence"), {"emotion": emos, "valence": vals}, {"n": n},
                      {"model": model_name, "metric": "judge accuracy", "method": self.method,
                       "overall": self.accuracy, "n_total": int(len(self.samples))})


def make_judge(cfg: Paper2Config):
    """The configured judge (``probe``: the project's MiniLM probe; ``nrc``; ``openai`` + ``judge_url``)."""
    from ..evaluate.judges import NRCJudge, OpenAIJudge, ProbeJudge

    if cfg.judge == "probe":
        return ProbeJudge(train_path=cfg.judge_train)
    if cfg.judge == "nrc":
        return NRCJudge()
    if cfg.judge == "openai":
        if not cfg.judge_url:
            raise InputError("judge='openai' needs judge_url (an OpenAI-compatible server, e.g. "
                             "'http://127.0.0.1:8000/v1').")
        return OpenAIJudge(cfg.judge_url, cfg.judge_model)
    raise InputError(f"Unknown judge {cfg.judge!r}; use 'probe', 'nrc' or 'openai'.")


def _gen_kwargs(cfg: Paper2Config, method: str) -> dict:
    p = {"prompt": "prompt", "steer": "steer", "circuit": "circuit"}[method]
    kw = {"max_new_tokens": getattr(cfg, f"{p}_max_new_tokens")}
    if getattr(cfg, f"{p}_min_new_tokens"):
        kw["min_new_tokens"] = getattr(cfg, f"{p}_min_new_tokens")
    if getattr(cfg, f"{p}_repetition_penalty") != 1.0:
        kw["repetition_penalty"] = getattr(cfg, f"{p}_repetition_penalty")
    if getattr(cfg, f"{p}_no_repeat_ngram"):
        kw["no_repeat_ngram_size"] = getattr(cfg, f"{p}_no_repeat_ngram")
    return kw


def generate_replies(model, prompts, emotions: Sequence[str | None], *,
                     interventions_for: Callable[[str], list] | None = None, gen_kwargs: dict | None = None,
                     batch_size: int = 32, progress: bool = False, desc: str = "generate", backend=None) -> list[str]:
    """Greedy replies. With ``interventions_for(emotion)``, rows of different emotions share a batch:
    each emotion's specs are restricted (``rows=``) to that emotion's rows of the batch.

    ``backend`` (default: the one set by :func:`emolens.scale.use_backend`, else local): ``"ray"`` or a
    :class:`~emolens.scale.ScaleConfig` shards the rows over Ray workers (bitwise the same replies)."""
    from ..circuits.control import generate_with
    from ..scale import active_backend, generate_replies as scaled_generate

    backend = active_backend() if backend is None else backend
    if backend not in (None, "local") and len(prompts) > batch_size:
        return scaled_generate(model, prompts, emotions, interventions_for=interventions_for, gen_kwargs=gen_kwargs,
                               batch_size=batch_size, backend=backend, progress=progress)

    return generate_with(model, prompts, emotions, interventions_for=interventions_for, gen_kwargs=gen_kwargs,
                         batch_size=batch_size, progress=progress, desc=desc)


def _judge_frame(judge, ps, texts: Sequence[str]) -> pd.DataFrame:
    verdicts = judge.judge(list(texts), list(ps.emotions))
    return pd.DataFrame({"skeleton_id": [it.skeleton_id for it in ps.items], "theme": [it.theme for it in ps.items],
                         "valence": [it.valence for it in ps.items], "emotion": list(ps.emotions),
                         "text": list(texts), "match": [bool(v.match) for v in verdicts],
                         "label": [v.label for v in verdicts], "score": [float(v.score) for v in verdicts]})


# =========================================================================================
# Steps
# =========================================================================================
def _items(cfg: Paper2Config, split: str, per_theme: int | None, max_records: int | None = None, records=None):
    from ..circuits.prompts import sev_items
    from ..datasets import load_sev

    if records is None:
        path = getattr(cfg, f"{split}_data", None)
        records = load_sev(path, split=split, columns=getattr(cfg, f"{split}_columns", None) or None)
    recs = list(records)
    if per_theme is not None:
        seen: dict = {}
        keep = []
        for r in recs:
            seen[r["theme"]] = seen.get(r["theme"], 0) + 1
            if seen[r["theme"]] <= per_theme:
                keep.append(r)
        recs = keep
    if max_records is not None:
        # spread the cap over themes: round-robin by theme
        by_theme: dict = {}
        for r in recs:
            by_theme.setdefault(r["theme"], []).append(r)
        order = []
        while any(by_theme.values()):
            for t in list(by_theme):
                if by_theme[t]:
                    order.append(by_theme[t].pop(0))
        recs = order[:max_records]
    return sev_items(recs, cfg.valences)


def step_elicit(model, items, cfg: Paper2Config, judge, *, progress: bool = True, method: str = "prompting",
                texts: Sequence[str] | None = None) -> GenEval:
    """Step 1 / prompting baseline: greedy replies to P_emo(e) for every item and emotion, judged.

    ``texts`` reuses already generated replies (resume after a judge failure).
    """
    from ..circuits.prompts import emo_prompts

    ps = emo_prompts(items, cfg.emotions, cfg.system_emo)
    if texts is None:
        texts = generate_replies(model, ps.prompts, ps.emotions, gen_kwargs=_gen_kwargs(cfg, "prompt"),
                                 batch_size=cfg.gen_batch_size, progress=progress, desc=f"{method}: generate")
    return GenEval(method, _judge_frame(judge, ps, texts))


def step_stats(model, items, cfg: Paper2Config, accepted: dict | None = None, *, progress: bool = True):
    """Step 2 (+ streaming parts of 4a, 4b, 5, 6): one pass over the P_emo analysis prompts."""
    from ..circuits.directions import collect_sev_stats
    from ..circuits.prompts import emo_prompts

    ps = emo_prompts(items, cfg.emotions, cfg.system_emo)
    pca_layers = sorted({min(model.n_layers - 1, int(round(f * model.n_layers))) for f in cfg.pca_layers_frac})
    return collect_sev_stats(model, ps, accepted=accepted if cfg.accept_filter else None, emotions=cfg.emotions,
                             final_norm=cfg.final_norm, head_moments=cfg.head_moments, pca_layers=pca_layers,
                             batch_size=cfg.batch_size, progress=progress)


def step_steer(model, items, cfg: Paper2Config, directions: Result, judge, *, alpha: float | None = None,
               progress: bool = True, texts: Sequence[str] | None = None) -> GenEval:
    """Step 3 / steering baseline: P_neu + RMS-scaled direction at resid_post of the steering layers."""
    from ..circuits.prompts import neu_prompts
    from ..circuits.steer import steering_interventions

    ps = neu_prompts(items, cfg.emotions, cfg.system_neu)
    layers = cfg.layers(cfg.steer_layers_frac, model.n_layers)
    a = cfg.steer_alpha if alpha is None else alpha
    if texts is None:
        texts = generate_replies(model, ps.prompts, ps.emotions,
                                 interventions_for=lambda e: steering_interventions(model, directions, e, layers, a,
                                                                                    sublayer=cfg.steer_sublayer),
                                 gen_kwargs=_gen_kwargs(cfg, "steer"), batch_size=cfg.gen_batch_size, progress=progress,
                                 desc=f"steering a={a:g}: generate")
    return GenEval("steering", _judge_frame(judge, ps, texts))


def step_component_scores(model, stats, directions: Result, cfg: Paper2Config, items=None, *,
                          progress: bool = True) -> tuple[Result, Result]:
    """Steps 4a/4b for every emotion: stacked neuron scores ``[emotion, layer, d_mlp]`` and head scores
    ``[emotion, layer, n_heads]``. Heads use the streaming z moments when the closed form is linear,
    else one extra cached pass per emotion (:func:`~emolens.circuits.components.head_scores`)."""
    from ..circuits import _model
    from ..circuits.components import (head_scores, head_scores_from_stats, layer_direction,
                                       neuron_scores_from_stats)
    from ..circuits.prompts import emo_prompts

    neurons = [neuron_scores_from_stats(model, stats, directions, e) for e in stats.emotions]
    linear = all(_model.post_attn_norm(model, l) is None for l in range(model.n_layers))
    heads = []
    for e in stats.emotions:
        if linear:
            heads.append(head_scores_from_stats(model, stats, directions, e))
        else:
            if items is None:
                raise InputError("This model needs the analysis items for head scores (post-attention norm).")
            ps = emo_prompts(items, [e], cfg.system_emo)
            heads.append(head_scores(model, ps.prompts, layer_direction(directions, e, "attn"),
                                     batch_size=cfg.batch_size, progress=progress))
    emos = list(stats.emotions)
    return stack_results(neurons, "emotion", emos), stack_results(heads, "emotion", emos)


def _emotion_slice(res: Result, e: str) -> Result:
    i = res.labels["emotion"].index(e)
    return Result(res.kind, res.scores[i], res.axes[1:], {k: v for k, v in res.labels.items() if k != "emotion"},
                  {k: v[i] for k, v in res.extra.items()}, dict(res.meta, emotion=e))


def _head_ks(cfg: Paper2Config, n_heads: int) -> list[int]:
    # random controls are drawn outside the top-k of the same layer: k <= n_heads - k
    return [k for k in cfg.curve_ks if k <= n_heads // 2]


def step_curves(model, items, cfg: Paper2Config, directions: Result, neurons: Result, heads: Result,
                dmu_mlp: Result, dmu_attn: Result, *, progress: bool = True) -> dict[str, Result]:
    """Step 4c: ablation and enhancement curves (top-k vs random-k) per emotion, kind and layer.

    Returns ``{"{mode}/{kind}/L{layer}/{emotion}/{top|random}": Result}``.
    """
    from ..circuits.components import component_curve, layer_direction, prefix_steppers
    from ..circuits.prompts import emo_prompts

    out: dict[str, Result] = {}
    layers = sorted({min(model.n_layers - 1, int(round(f * model.n_layers))) for f in cfg.curve_layers_frac})
    for e in cfg.emotions:
        ps = emo_prompts(items, [e], cfg.system_emo)
        rows = list(range(len(ps)))
        if cfg.curve_samples is not None and len(rows) > cfg.curve_samples:
            rng = np.random.default_rng(cfg.seed)
            rows = sorted(rng.choice(rows, cfg.curve_samples, replace=False).tolist())
        prompts = [ps.prompts[i] for i in rows]
        # one prefix cache per emotion, shared by every curve (layers <= the deepest curve layer)
        steppers = prefix_steppers(model, prompts, batch_size=max(len(prompts), 1), stop_layer=max(layers),
                                   repeats=1 + cfg.curve_n_random)
        for kind, scores, sub, dmu in (("neuron", neurons, "mlp", dmu_mlp), ("head", heads, "attn", dmu_attn)):
            ks = list(cfg.curve_ks) if kind == "neuron" else _head_ks(cfg, model.n_heads)
            sc = _emotion_slice(scores, e)
            v = layer_direction(directions, e, sub)
            for layer in layers:
                for mode in ("ablate", "enhance"):
                    payload = _emotion_slice(dmu, e).scores[layer] if mode == "enhance" else None
                    c = component_curve(model, prompts, sc, v, kind=kind, layer=layer, mode=mode, payload=payload,
                                        scale=cfg.enhance_scale, ks=ks, n_random=cfg.curve_n_random, seed=cfg.seed,
                                        final_norm=cfg.final_norm, steppers=steppers)
                    for sel, r in c.items():
                        r.meta["emotion"] = e
                        out[f"{mode}/{kind}/L{layer}/{e}/{sel}"] = r
    return out


def step_influence(model, items, cfg: Paper2Config, directions: Result, sig: Result, accepted: dict | None = None,
                   *, progress: bool = True) -> Result:
    """Step 6 for every emotion: stacked ``[emotion, layer, sublayer]`` influence."""
    from ..circuits.influence import sublayer_influence
    from ..circuits.prompts import neu_prompts

    ref_layers = cfg.layers(cfg.ref_layers_frac, model.n_layers)

    def pick(its):
        its = list(its)
        if cfg.influence_samples is not None and len(its) > cfg.influence_samples:
            rng = np.random.default_rng(cfg.seed)
            its = [its[i] for i in sorted(rng.choice(len(its), cfg.influence_samples, replace=False).tolist())]
        return its

    res = {}
    if not cfg.accept_filter or accepted is None:
        ps = neu_prompts(pick(items), None, cfg.system_neu)
        res = sublayer_influence(model, ps.prompts, directions, sig, list(cfg.emotions), alphas=cfg.influence_alphas,
                                 ref_layers=ref_layers, final_norm=cfg.final_norm, progress=progress)
    else:  # the paper: the samples accepted for emotion e, fed with P_neu
        for e in cfg.emotions:
            its = [it for it in items if accepted.get((it.skeleton_id, it.valence, e), False)]
            if not its:
                raise InputError(f"No accepted analysis samples for {e!r}; cannot measure its sublayer influence.")
            ps = neu_prompts(pick(its), None, cfg.system_neu)
            res.update(sublayer_influence(model, ps.prompts, directions, sig, [e], alphas=cfg.influence_alphas,
                                          ref_layers=ref_layers, final_norm=cfg.final_norm, progress=progress))
    return stack_results([res[e] for e in cfg.emotions], "emotion", list(cfg.emotions))


def step_circuits(model, cfg: Paper2Config, influence: Result, neurons: Result, heads: Result) -> dict:
    """Step 7: one :class:`~emolens.circuits.assembly.Circuit` per emotion."""
    from ..circuits.assembly import assemble_circuit

    return {e: assemble_circuit(model, e, _emotion_slice(influence, e), _emotion_slice(neurons, e),
                                _emotion_slice(heads, e), budget_per_sublayer=cfg.budget_per_sublayer,
                                mlp_ratio=cfg.mlp_ratio, min_neurons=cfg.min_neurons, min_heads=cfg.min_heads,
                                cap_ratio=cfg.cap_ratio) for e in cfg.emotions}


def step_modulate(model, items, cfg: Paper2Config, circuits: dict, dmu_mlp: Result, dmu_attn: Result, judge, *,
                  scale: float | None = None, progress: bool = True, texts: Sequence[str] | None = None,
                  method: str = "circuit") -> GenEval:
    """Step 8: P_neu + circuit modulation (neurons at ``Pos.from_last()``, heads at ``Pos.all()``)."""
    from ..circuits.modulation import modulation_interventions
    from ..circuits.prompts import neu_prompts

    ps = neu_prompts(items, cfg.emotions, cfg.system_neu)

    def ivs(e):
        s = cfg.scale_for(e) if scale is None else scale
        return modulation_interventions(model, circuits[e], dmu_mlp, dmu_attn, s)

    if texts is None:
        texts = generate_replies(model, ps.prompts, ps.emotions, interventions_for=ivs,
                                 gen_kwargs=_gen_kwargs(cfg, "circuit"), batch_size=cfg.gen_batch_size,
                                 progress=progress, desc="circuit modulation: generate")
    return GenEval(method, _judge_frame(judge, ps, texts))


def step_calibrate(model, items, cfg: Paper2Config, judge, *, directions: Result | None = None,
                   circuits: dict | None = None, dmu_mlp: Result | None = None, dmu_attn: Result | None = None,
                   progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Sweep steering alpha and/or circuit scale on analysis items; pick by accuracy under a fluency guard.

    Fluency guard: corpus perplexity of the replies under the unsteered model at most
    ``calib_max_ppl_ratio`` x that of unsteered replies, and distinct-2 >= ``calib_min_distinct2``.

    Returns:
        ``(sweep table, {"steer_alpha": ..., "circuit_scale": ...})`` for the swept methods.
    """
    from ..circuits.prompts import neu_prompts
    from ..evaluate.fluency import corpus_perplexity
    from ..evaluate.lexicon import distinct_n

    ps = neu_prompts(items, cfg.emotions, cfg.system_neu)
    base = generate_replies(model, ps.prompts, ps.emotions, gen_kwargs=_gen_kwargs(cfg, "circuit"),
                            batch_size=cfg.gen_batch_size, progress=progress, desc="calibration: unsteered")
    base_ppl = corpus_perplexity(model, ps.prompts, base)
    rows = [{"method": "none", "value": 0.0, "accuracy": float(_judge_frame(judge, ps, base)["match"].mean()),
             "ppl": base_ppl, "distinct2": float(distinct_n(base, 2))}]
    chosen = {}
    sweeps = []
    if directions is not None:
        sweeps.append(("steering", "steer_alpha", cfg.calib_alphas,
                       lambda a: step_steer(model, items, cfg, directions, judge, alpha=a, progress=progress)))
    if circuits is not None:
        sweeps.append(("circuit", "circuit_scale", cfg.calib_scales,
                       lambda s: step_modulate(model, items, cfg, circuits, dmu_mlp, dmu_attn, judge, scale=s,
                                               progress=progress)))
    for method, key, values, fn in sweeps:
        best = None
        for v in values:
            ev = fn(float(v))
            texts = ev.samples["text"].tolist()
            ppl = corpus_perplexity(model, ps.prompts, texts)
            d2 = float(distinct_n(texts, 2)) if any(t.strip() for t in texts) else 0.0
            # no bigrams at all (NaN) counts as no diversity; a non-finite perplexity fails the guard
            d2_ok = (d2 if d2 == d2 else 0.0) >= cfg.calib_min_distinct2
            ok = bool(ppl <= cfg.calib_max_ppl_ratio * base_ppl) and d2_ok
            rows.append({"method": method, "value": float(v), "accuracy": ev.accuracy, "ppl": ppl, "distinct2": d2,
                         "fluent": ok})
            if ok and (best is None or ev.accuracy > best[1]):
                best = (float(v), ev.accuracy)
        if best is not None:
            chosen[key] = best[0]
    return pd.DataFrame(rows), chosen


def accuracy_tables(evals: dict[str, GenEval]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-emotion and per-valence accuracy (%) of each method, with overall and n."""
    emo_rows, val_rows = [], []
    for name, ev in evals.items():
        s = ev.samples
        r = {"method": name, **{e: 100 * float(g["match"].mean()) for e, g in s.groupby("emotion", sort=False)},
             "overall": 100 * ev.accuracy, "n": len(s)}
        emo_rows.append(r)
        v = {"method": name, **{k: 100 * float(g["match"].mean()) for k, g in s.groupby("valence", sort=False)},
             "overall": 100 * ev.accuracy, "n": len(s)}
        val_rows.append(v)
    return pd.DataFrame(emo_rows).round(2), pd.DataFrame(val_rows).round(2)



# =========================================================================================
# Engine output kinds of paper 2
# =========================================================================================
def _register_kinds() -> None:
    from ..circuits.assembly import Circuit
    from ..circuits.directions import SEVStats

    register_kind("sevstats", lambda o: isinstance(o, SEVStats), lambda o, p: o.save(p), lambda p, m: SEVStats.load(p))

    def save_circuits(cs: dict, folder: Path) -> None:
        for e, c in cs.items():
            c.save(folder / f"{e}.json")

    register_kind("circuits", lambda o: isinstance(o, dict) and bool(o) and all(isinstance(v, Circuit)
                                                                               for v in o.values()),
                  save_circuits, lambda p, m: {q.stem: Circuit.load(q, model=m) for q in sorted(p.glob("*.json"))})


_register_kinds()


def analysis_items(cfg: Paper2Config):
    """The analysis split's scenario-event items (``analysis_data`` or the packaged split, sized by the config)."""
    return _items(cfg, "analysis", cfg.analysis_per_theme, cfg.analysis_max_records)


def test_items(cfg: Paper2Config, all_records: bool = False):
    """The test split's items (``test_data`` or the packaged split)."""
    if all_records:
        return _items(cfg, "test", None)
    return _items(cfg, "test", cfg.test_per_theme, cfg.test_max_records)


def check_data(cfg: Paper2Config) -> None:
    """Read and validate every data input before any work (errors name the file, line and field)."""
    from ..errors import DataError

    for split, items in (("analysis", analysis_items(cfg)), ("test", test_items(cfg))):
        if not items:
            raise DataError(f"The {split} split ({getattr(cfg, f'{split}_data') or 'packaged'}) has no records after "
                            f"{split}_per_theme / {split}_max_records; pass more records or larger limits.")
    if cfg.judge_train is not None and not Path(cfg.judge_train).is_file():
        raise DataError(f"{cfg.judge_train}: file not found (judge_train). Fix: pass a JSONL file of labelled "
                        "sentences ({\"text\": ..., \"emotion\": ...}) or leave it unset for the packaged one.")
    if cfg.judge_eval is not None:  # every record checked now (file, line and field named), not at the last step
        from ..datasets import EMOTIONS_SEV, load_judge_labelled

        load_judge_labelled(cfg.judge_eval, split="eval", columns=cfg.judge_eval_columns, emotions=EMOTIONS_SEV)


def _strengths(ctx: Context) -> Paper2Config:
    """The configuration with the calibrated (or passed) strengths filled in."""
    kw = {}
    if ctx.has("steer_calibration"):
        kw["steer_alpha"] = float(ctx.load("steer_calibration")["steer_alpha"])
    if ctx.has("circuit_calibration"):
        kw["circuit_scale"] = float(ctx.load("circuit_calibration")["circuit_scale"])
    return dataclasses.replace(ctx.config, **kw)


def _gen_texts(ctx: Context, ps, kind: str, ivs_for, desc: str) -> dict:
    cfg = ctx.config
    texts = generate_replies(ctx.model, ps.prompts, ps.emotions, interventions_for=ivs_for,
                             gen_kwargs=_gen_kwargs(cfg, kind), batch_size=cfg.gen_batch_size, progress=ctx.progress,
                             desc=desc)
    return pd.DataFrame({"text": texts})


def _judged(ctx: Context, ps, texts_output: str, method: str) -> pd.DataFrame:
    texts = ctx.load(texts_output)["text"].tolist()
    return _judge_frame(ctx.extras["judge"], ps, texts)


# -- the steps ----------------------------------------------------------------------------------
def elicit_texts_step(ctx: Context) -> dict:
    """1a. Greedy replies to P_emo on the analysis split (skipped when the acceptance filter is off)."""
    from ..circuits.prompts import emo_prompts

    cfg = ctx.config
    if cfg.accept_filter is False:
        return {"elicit_texts": pd.DataFrame({"text": pd.Series([], dtype=str)})}
    ps = emo_prompts(analysis_items(cfg), cfg.emotions, cfg.system_emo)
    return {"elicit_texts": _gen_texts(ctx, ps, "prompt", None, "elicitation: generate")}


def elicit_step(ctx: Context) -> dict:
    """1b. Judge the P_emo replies; decide the acceptance filter (``accept_filter=None``: on when at least
    ``accept_min_fraction`` of the context groups keep every emotion accepted)."""
    from ..circuits.prompts import emo_prompts

    cfg = ctx.config
    if cfg.accept_filter is False:
        return {"acceptance": {"use_filter": False, "reason": "accept_filter=False (quick mode's default, or set): "
                                                            "every sample is used."}}
    items = analysis_items(cfg)
    ps = emo_prompts(items, cfg.emotions, cfg.system_emo)
    samples = _judged(ctx, ps, "elicit_texts", "prompting (analysis)")
    groups = samples.groupby(["skeleton_id", "valence"])["match"].all()
    frac = float(groups.mean()) if len(groups) else 0.0
    if cfg.accept_filter is True:
        use, reason = True, "accept_filter=True (the paper's setting)."
    else:
        use = frac >= cfg.accept_min_fraction
        reason = (f"auto: {int(groups.sum())} of {len(groups)} context groups ({frac:.0%}) have every emotion accepted "
                  f"by the judge; the filter is {'on' if use else 'off'} (threshold {cfg.accept_min_fraction:.0%}"
                  + ("" if use else ": the model does not follow 'Always reply in {emotion}' well enough, so "
                     "directions use every sample") + ").")
    return {"elicit": samples, "acceptance": {"use_filter": bool(use), "reason": reason, "complete_fraction": frac,
                                              "n_groups": int(len(groups)), "n_complete": int(groups.sum())}}


def _accepted(ctx: Context) -> dict | None:
    if not ctx.load("acceptance")["use_filter"]:
        return None
    s = ctx.load("elicit")
    return {(a, b, c): bool(m) for a, b, c, m in zip(s["skeleton_id"], s["valence"], s["emotion"], s["match"])}


def stats_step(ctx: Context) -> dict:
    """2. One streaming pass over the analysis P_emo prompts: statistics, directions, difference vectors, sigma."""
    from ..circuits.directions import difference_vectors, emotion_directions
    from ..circuits.influence import sigma as sigma_of

    cfg = ctx.config
    acc = _accepted(ctx)
    stats = step_stats(ctx.model, analysis_items(cfg), dataclasses.replace(cfg, accept_filter=acc is not None), acc,
                       progress=ctx.progress)
    dmu_mlp, dmu_attn = difference_vectors(stats)
    return {"stats": stats, "directions": emotion_directions(stats), "dmu_mlp": dmu_mlp, "dmu_attn": dmu_attn,
            "sigma": sigma_of(stats)}


def scores_step(ctx: Context) -> dict:
    """4a/4b. Neuron and head scores per emotion."""
    neurons, heads = step_component_scores(ctx.model, ctx.load("stats"), ctx.load("directions"), ctx.config,
                                           analysis_items(ctx.config), progress=ctx.progress)
    return {"neuron_scores": neurons, "head_scores": heads}


def curves_step(ctx: Context) -> dict:
    """4c. Ablation / enhancement curves, top-k vs random-k."""
    return {"curves": step_curves(ctx.model, analysis_items(ctx.config), ctx.config, ctx.load("directions"),
                                  ctx.load("neuron_scores"), ctx.load("head_scores"), ctx.load("dmu_mlp"),
                                  ctx.load("dmu_attn"), progress=ctx.progress)}


def influence_step(ctx: Context) -> dict:
    """6. Sublayer causal influence."""
    acc = _accepted(ctx)
    cfg = dataclasses.replace(ctx.config, accept_filter=acc is not None)
    return {"influence": step_influence(ctx.model, analysis_items(cfg), cfg, ctx.load("directions"),
                                        ctx.load("sigma"), acc, progress=ctx.progress)}


def circuits_step(ctx: Context) -> dict:
    """7. One global circuit per emotion."""
    return {"circuits": step_circuits(ctx.model, ctx.config, ctx.load("influence"), ctx.load("neuron_scores"),
                                      ctx.load("head_scores"))}


def _calibrate(kind: str):
    key, method, grid_name = {"steer": ("steer_alpha", "steering", "calib_alphas"),
                              "circuit": ("circuit_scale", "circuit", "calib_scales")}[kind]

    def fn(ctx: Context) -> dict:
        cfg = ctx.config
        grid = tuple(getattr(cfg, grid_name))
        if getattr(cfg, key) is not None:
            v = float(getattr(cfg, key))
            return {f"{kind}_calibration": {key: v, "why": f"{key} = {v:g} was passed in the configuration (no "
                                                        "sweep)."}}
        items = _items(cfg, "analysis", 1, cfg.calib_records)
        table, chosen = step_calibrate(
            ctx.model, items, cfg, ctx.extras["judge"],
            directions=ctx.load("directions") if kind == "steer" else None,
            circuits=ctx.load("circuits") if kind == "circuit" else None,
            dmu_mlp=ctx.load("dmu_mlp"), dmu_attn=ctx.load("dmu_attn"), progress=ctx.progress)
        rows = table[table["method"] == method]
        base = table[table["method"] == "none"].iloc[0]
        if key in chosen:
            r = rows[rows["value"] == chosen[key]].iloc[0]
            v = float(chosen[key])
            why = (f"calibrated: {key} = {v:g} has the best judge accuracy ({100 * r['accuracy']:.1f}% vs "
                   f"{100 * base['accuracy']:.1f}% unsteered) among the grid values {list(grid)} whose replies stay "
                   f"fluent (perplexity under the unsteered model {r['ppl']:.2f} <= {cfg.calib_max_ppl_ratio:g} x "
                   f"{base['ppl']:.2f}, distinct-2 {r['distinct2']:.2f} >= {cfg.calib_min_distinct2:g}) on "
                   f"{len(items)} analysis items.")
        else:
            v = float(min(grid))
            why = (f"calibrated: no value of {list(grid)} kept the replies fluent (perplexity <= "
                   f"{cfg.calib_max_ppl_ratio:g} x unsteered, distinct-2 >= {cfg.calib_min_distinct2:g}); using the "
                   f"smallest, {v:g}.")
        return {f"{kind}_calibration": {key: v, "why": why}, f"{kind}_calibration_table": table}

    fn.__name__ = f"calibrate_{kind}_step"
    fn.__doc__ = (f"The {method} strength ({key}): the configured value when given, else a sweep over {grid_name} "
                  "on ``calib_records`` analysis records, picked by judge accuracy under the fluency guard "
                  "(:func:`step_calibrate`); records the value and why.")
    return fn


calibrate_steer_step = _calibrate("steer")
calibrate_circuit_step = _calibrate("circuit")


def eval_prompting_texts_step(ctx: Context) -> dict:
    """8a. Prompting baseline on the test split: P_emo, no intervention (replies only)."""
    from ..circuits.prompts import emo_prompts

    cfg = ctx.config
    ps = emo_prompts(test_items(cfg), cfg.emotions, cfg.system_emo)
    return {"eval_prompting_texts": _gen_texts(ctx, ps, "prompt", None, "prompting: generate")}


def eval_steering_texts_step(ctx: Context) -> dict:
    """8b. Steering on the test split: P_neu + alpha x RMS x v_mlp at the steering layers (replies only)."""
    from ..circuits.prompts import neu_prompts

    cfg = _strengths(ctx)
    ps = neu_prompts(test_items(cfg), cfg.emotions, cfg.system_neu)
    return {"eval_steering_texts": _gen_texts(ctx, ps, "steer", _steer_ivf(ctx, cfg), "steering: generate")}


def _steer_ivf(ctx: Context, cfg: Paper2Config):
    """``emotion -> interventions`` of the test-time steering (strength from :func:`_strengths`)."""
    from ..circuits.steer import steering_interventions

    layers = cfg.layers(cfg.steer_layers_frac, ctx.model.n_layers)
    d = ctx.load("directions")
    return lambda e: steering_interventions(ctx.model, d, e, layers, cfg.steer_alpha, sublayer=cfg.steer_sublayer)


def _circuit_ivf(ctx: Context, cfg: Paper2Config):
    """``emotion -> interventions`` of the test-time circuit modulation (scale from :func:`_strengths`)."""
    from ..circuits.modulation import modulation_interventions

    circuits, dm, da = ctx.load("circuits"), ctx.load("dmu_mlp"), ctx.load("dmu_attn")
    return lambda e: modulation_interventions(ctx.model, circuits[e], dm, da, cfg.scale_for(e))


def eval_circuit_texts_step(ctx: Context) -> dict:
    """8c. Circuit modulation on the test split (replies only)."""
    from ..circuits.prompts import neu_prompts

    cfg = _strengths(ctx)
    ps = neu_prompts(test_items(cfg), cfg.emotions, cfg.system_neu)
    return {"eval_circuit_texts": _gen_texts(ctx, ps, "circuit", _circuit_ivf(ctx, cfg), "circuit modulation: generate")}


def _judge_step(method: str, emo: bool):
    def fn(ctx: Context) -> dict:
        from ..circuits.prompts import emo_prompts, neu_prompts

        cfg = ctx.config
        ps = (emo_prompts(test_items(cfg), cfg.emotions, cfg.system_emo) if emo
              else neu_prompts(test_items(cfg), cfg.emotions, cfg.system_neu))
        return {f"eval_{method}": _judged(ctx, ps, f"eval_{method}_texts", method)}

    fn.__name__ = f"eval_{method}_step"
    fn.__doc__ = f"Judge the {method} replies (a judge failure keeps the replies: the resume only re-judges)."
    return fn


eval_prompting_step = _judge_step("prompting", True)
eval_steering_step = _judge_step("steering", False)
eval_circuit_step = _judge_step("circuit", False)


def examples_step(ctx: Context) -> dict:
    """One test input under every emotion with all three methods, and its unsteered reply."""
    from ..circuits.modulation import modulation_interventions
    from ..circuits.prompts import emo_prompts, neu_prompts
    from ..circuits.steer import steering_interventions

    model = ctx.model
    cfg = _strengths(ctx)
    directions, circuits = ctx.load("directions"), ctx.load("circuits")
    dmu_mlp, dmu_attn = ctx.load("dmu_mlp"), ctx.load("dmu_attn")
    steer_layers = cfg.layers(cfg.steer_layers_frac, model.n_layers)
    recs = test_items(cfg, all_records=True)
    ex_items = [it for it in recs if it.valence == cfg.example_valence] or recs
    item = ex_items[min(cfg.example_record, len(ex_items) - 1)]
    one_emo = emo_prompts([item], cfg.emotions, cfg.system_emo)
    one_neu = neu_prompts([item], cfg.emotions, cfg.system_neu)
    base = generate_replies(model, [one_neu.prompts[0]], [None], gen_kwargs=_gen_kwargs(cfg, "circuit"))[0]
    p = generate_replies(model, one_emo.prompts, one_emo.emotions, gen_kwargs=_gen_kwargs(cfg, "prompt"))
    s = generate_replies(model, one_neu.prompts, one_neu.emotions, gen_kwargs=_gen_kwargs(cfg, "steer"),
                         interventions_for=lambda e: steering_interventions(model, directions, e, steer_layers,
                                                                            cfg.steer_alpha,
                                                                            sublayer=cfg.steer_sublayer))
    c = generate_replies(model, one_neu.prompts, one_neu.emotions, gen_kwargs=_gen_kwargs(cfg, "circuit"),
                         interventions_for=lambda e: modulation_interventions(model, circuits[e], dmu_mlp,
                                                                              dmu_attn, cfg.scale_for(e)))
    rows = [{"emotion": e, "prompting": p[i], "steering": s[i], "circuit": c[i]} for i, e in enumerate(cfg.emotions)]
    return {"examples": pd.DataFrame(rows), "examples_input": {"input": item.user, "unsteered": base}}


def judge_step(ctx: Context) -> dict:
    """The judge's accuracy on held-out labelled sentences (``judge_eval``, default the packaged
    ``judge_eval.jsonl``): how far its verdicts on the replies can be trusted."""
    from ..evaluate.judges import evaluate_judge

    cfg = ctx.config
    acc, conf = evaluate_judge(ctx.extras["judge"], cfg.judge_eval, columns=cfg.judge_eval_columns)
    per = conf.attrs["per_emotion_accuracy"]
    counts = conf.sum(axis=1)
    rows = [{"emotion": e, "n": int(counts[e]), "accuracy": 100 * per[e]} for e in conf.index]
    rows.append({"emotion": "overall", "n": int(conf.attrs["n"]), "accuracy": 100 * acc})
    return {"judge_accuracy": pd.DataFrame(rows),
            "judge_confusion": conf.rename_axis(columns=None).reset_index().rename(
                columns={"emotion": "true emotion"})}


# -- issue 10: every method judged by an ensemble, side-effect cards, circuit-head attention -----------------
#: Methods judged by the ensemble and carded, in report order: (name, replies output).
METHODS: tuple[tuple[str, str], ...] = (("unsteered", "eval_unsteered_texts"), ("prompting", "eval_prompting_texts"),
                                        ("steering", "eval_steering_texts"), ("circuit", "eval_circuit_texts"))


def make_ensemble(cfg: Paper2Config, reuse=None):
    """The judge ensemble of ``cfg.ensemble_judges`` (:class:`~emolens.evaluate.agreement.JudgeEnsemble`,
    majority vote). ``reuse``: an already built judge of kind ``cfg.judge`` (the probe trains once per call)."""
    from ..evaluate.agreement import JudgeEnsemble
    from ..evaluate.judges import NADEJudge, NRCJudge, OpenAIJudge, ProbeJudge

    make = {"nrc": NRCJudge, "nade": NADEJudge, "probe": lambda: ProbeJudge(train_path=cfg.judge_train),
            "openai": lambda: OpenAIJudge(cfg.judge_url, cfg.judge_model)}
    return JudgeEnsemble({n: reuse if (reuse is not None and n == cfg.judge) else make[n]()
                          for n in cfg.ensemble_judges})


def eval_unsteered_texts_step(ctx: Context) -> dict:
    """8d. Unsteered baseline on the test split: P_neu, no intervention. One reply per item (its six target
    emotions share the prompt), repeated per emotion row so it lines up with the other methods' rows."""
    from ..circuits.prompts import neu_prompts

    cfg = ctx.config
    one = neu_prompts(test_items(cfg), None, cfg.system_neu)
    texts = _gen_texts(ctx, one, "circuit", None, "unsteered: generate")["text"].tolist()
    return {"eval_unsteered_texts": pd.DataFrame({"text": [t for t in texts for _ in cfg.emotions]})}


def ensemble_step(ctx: Context) -> dict:
    """9. Judge every method's test replies with each judge of the ensemble and their majority vote; accuracy
    with Wilson 95 % intervals per method, emotion and judge; judge agreement (Cohen's kappa per pair, Fleiss)."""
    from ..circuits.prompts import neu_prompts
    from ..evaluate.agreement import accuracy_table

    cfg = ctx.config
    ens = make_ensemble(cfg, ctx.extras.get("judge"))
    ps = neu_prompts(test_items(cfg), cfg.emotions, cfg.system_neu)  # same item/emotion order as P_emo rows
    frames = []
    for method, out in METHODS:
        df = ens.judge(ctx.load(out)["text"].tolist(), list(ps.emotions))
        keys = pd.DataFrame({"method": method, "skeleton_id": [it.skeleton_id for it in ps.items],
                             "theme": [it.theme for it in ps.items], "valence": [it.valence for it in ps.items],
                             "user": [it.user for it in ps.items]})
        frames.append(pd.concat([keys, df], axis=1))
    allf = pd.concat(frames, ignore_index=True)
    cols = [f"{n}_match" for n in ens.names] + ["majority"]
    acc = pd.concat([accuracy_table(allf[allf["method"] == m], cols, by="target").assign(method=m)
                     for m, _ in METHODS], ignore_index=True)
    ag = ens.agreement(allf)
    return {"ensemble": allf, "ensemble_accuracy": acc,
            "ensemble_agreement": {"judges": ens.names, "n": int(len(allf)), "fleiss_match": ag["fleiss_match"],
                                   "max_pair_kappa": ag["max_pair_kappa"],
                                   "pairs": ag["pairs"].to_dict("records")}}


def _retention_qa(cfg: Paper2Config) -> list[dict]:
    """``retention_questions`` of the project's 50 retention questions, spread over the file (None: all)."""
    from ..evaluate.side_effects import load_retention_qa

    qa = load_retention_qa()
    n = cfg.retention_questions
    if n is None or n >= len(qa):
        return qa
    return qa[::max(1, len(qa) // n)][:n]


def side_effects_step(ctx: Context) -> dict:
    """10. Side-effect card of every method on the test split: perplexity of its replies under the unsteered
    model (and the ratio to unsteered replies), distinct-2, restatement and emotion-name rates, and task retention
    on the project's retention questions asked under the same intervention (or emotion prompt) vs unsteered."""
    from ..circuits.prompts import neu_prompts
    from ..evaluate.fluency import corpus_perplexity
    from ..evaluate.side_effects import Guards, card_table, retention_accuracy, side_effect_card

    cfg = _strengths(ctx)
    model = ctx.model
    ps = neu_prompts(test_items(cfg), cfg.emotions, cfg.system_neu)
    users = [it.user for it in ps.items]
    qa = _retention_qa(cfg)
    qa_kw = {"max_new_tokens": cfg.retention_max_new_tokens, "repetition_penalty": 1.1, "no_repeat_ngram_size": 3}
    ivfs = {"unsteered": None, "prompting": None, "steering": _steer_ivf(ctx, cfg), "circuit": _circuit_ivf(ctx, cfg)}

    def asker(method: str):
        def gen(questions, emos):
            prompts = [[{"role": "system", "content": cfg.system_emo.format(emotion=e) if method == "prompting"
                         else cfg.system_neu}, {"role": "user", "content": q}] for q, e in zip(questions, emos)]
            return generate_replies(model, prompts, emos, interventions_for=ivfs[method], gen_kwargs=qa_kw,
                                    batch_size=cfg.gen_batch_size, progress=ctx.progress,
                                    desc=f"retention: {method}")
        return gen

    texts, ppl, ret, rows = {}, {}, {}, []
    emos = list(cfg.emotions)
    for method, out in METHODS:
        texts[method] = ctx.load(out)["text"].tolist()
        ppl[method] = corpus_perplexity(model, ps.prompts, texts[method])
        ret[method], ok, replies = retention_accuracy(asker(method), emos, qa)
        rows += [{"method": method, "question": q["question"], "emotion": emos[i % len(emos)], "reply": r,
                  "correct": bool(c)} for i, (q, r, c) in enumerate(zip(qa, replies, ok))]
    cards = [side_effect_card(m, users, texts[m], list(ps.emotions), ppl=ppl[m], ppl_base=ppl["unsteered"],
                              retention=ret[m], retention_base=ret["unsteered"]) for m, _ in METHODS]
    guards = Guards(max_ppl_ratio=cfg.calib_max_ppl_ratio)
    return {"side_effects": card_table(cards, guards),
            "side_effect_cards": {"guards": guards.to_dict(), "retention_questions": len(qa),
                                  "retention_max_new_tokens": cfg.retention_max_new_tokens,
                                  "cards": [c.to_dict() for c in cards]},
            "retention_replies": pd.DataFrame(rows)}


def circuit_attention_step(ctx: Context) -> dict:
    """Attention patterns of each circuit's top heads (by step-4b head score) on the prompt + circuit-modulated
    reply of the first test item, read under the same modulation (teacher-forced); one ``[head, query, key]``
    Result per emotion, drawn with circuitsvis next to the head and neuron heatmaps."""
    from ..circuits.prompts import neu_prompts
    from ..viz.circuit_attention import reply_head_patterns, top_circuit_heads

    cfg = _strengths(ctx)
    ps = neu_prompts(test_items(cfg), cfg.emotions, cfg.system_neu)
    texts = ctx.load("eval_circuit_texts")["text"].tolist()
    circuits, head_scores = ctx.load("circuits"), ctx.load("head_scores")
    ivf = _circuit_ivf(ctx, cfg)
    out = {}
    for e in cfg.emotions:
        i = ps.emotions.index(e)
        heads = top_circuit_heads(circuits[e], head_scores, cfg.attention_top_heads)
        if not heads:
            continue
        view = reply_head_patterns(ctx.model, ps.prompts[i], texts[i], heads, interventions=ivf(e),
                                   max_tokens=cfg.attention_max_tokens)
        out[e] = Result("attention", view.pattern, ("head", "query", "key"),
                        {"head": view.head_names, "query": view.tokens, "key": view.tokens}, {},
                        {"model": ctx.model.name, "emotion": e, "input": ps.items[i].user, "reply": texts[i],
                         "scale": cfg.scale_for(e), "metric": "attention probability"})
    return {"circuit_attention": out}


# =========================================================================================
# Report
# =========================================================================================
def _curve_summary(curves: dict[str, Result], n_heads: int) -> pd.DataFrame:
    """One row per (mode, kind, layer, emotion, k > 0): changes of the emotion score and their ratio."""
    from ..circuits.components import curve_ratio

    rows = []
    for key, r in curves.items():
        mode, kind, layer, emo, sel = key.split("/")
        if sel != "top":
            continue
        pair = {"top": r, "random": curves[f"{mode}/{kind}/{layer}/{emo}/random"]}
        for i, k in enumerate(r.labels["k"]):
            if k == 0:
                continue
            rows.append({"mode": mode, "kind": kind, "layer": int(layer[1:]), "emotion": emo, "k": k,
                         "delta_top": float(r.scores[i]), "delta_random": float(pair["random"].scores[i]),
                         "ratio": curve_ratio(pair, k)})
    return pd.DataFrame(rows)


def curve_ratio_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Median (over emotions and layers) of |change top-k| / |change random-k|, per mode, kind and k."""
    if not len(summary):
        return summary
    t = summary.groupby(["mode", "kind", "k"])["ratio"].median().unstack("k")
    t.columns = [f"k={k}" for k in t.columns]
    return t.reset_index()


def _mean_curve(results: list[Result], name: str) -> Result:
    s = torch.stack([r.scores for r in results]).mean(0)
    lo = torch.stack([r.extra["ci_low"] for r in results]).mean(0)
    hi = torch.stack([r.extra["ci_high"] for r in results]).mean(0)
    r0 = results[0]
    return Result("curve", s, r0.axes, r0.labels, {"ci_low": lo, "ci_high": hi}, dict(r0.meta, name=name))




# =========================================================================================
# Report sections (one per step)
# =========================================================================================
def _overview_section(ctx: Context) -> Section:
    cfg, model = ctx.config, ctx.model
    analysis, test = analysis_items(cfg), test_items(cfg)
    acc = ctx.load("acceptance")
    s = Section("Paper 2: emotion circuits (overview and settings)")
    s.add_text(
        "Re-implementation of 'Do LLMs Feel? Emotion Circuits Discovery and Control' (Wang et al., 2025) on "
        f"{model.name}: SEV-format scenario-event prompts, six emotions, reads and injections at t* (the last token "
        "of the templated prompt).",
        f"Data: analysis split {cfg.analysis_data or 'packaged (project-written)'}, test split "
        f"{cfg.test_data or 'packaged (project-written)'}.",
        f"Analysis split: {len(analysis)} scenario-event items x {len(cfg.emotions)} emotions = "
        f"{len(analysis) * len(cfg.emotions)} P_emo prompts; test split: {len(test)} items x {len(cfg.emotions)} = "
        f"{len(test) * len(cfg.emotions)} generations per method." + (" Quick mode." if ctx.extras.get("quick") else ""),
        f"Judge: {cfg.judge} ({'the project-owned MiniLM linear probe' if cfg.judge == 'probe' else cfg.judge}); "
        "numbers are not comparable with the paper's GPT-4o-mini judge.",
        f"Acceptance filter: {'on' if acc['use_filter'] else 'off'} — {acc['reason']}",
        *[str(n) for n in cfg.notes])
    paper = Paper2Config.paper().to_dict()
    rows = [{"setting": k, "value": json.dumps(v), "paper": json.dumps(paper.get(k))}
            for k, v in cfg.to_dict().items() if v != paper.get(k) and k != "notes"]
    if rows:
        s.add_table("Settings that differ from the paper's values (None = decided in the run; sizes for the budget)",
                    pd.DataFrame(rows))
    s.add_table("Steps in this call (computed or reused from the run folder, and why; reused steps show the time "
                "of the run that computed them)", log_table(ctx))
    return s


def _elicit_section(ctx: Context) -> Section | None:
    if not ctx.has("elicit"):
        return None
    ev = GenEval("prompting (analysis)", ctx.load("elicit"))
    acc = ctx.load("acceptance")
    s = Section("Step 1: emotion elicitation (analysis split)")
    s.add_text(f"Judge acceptance of P_emo replies: {100 * ev.accuracy:.1f}% (paper on SEV: 98.85%). Complete context "
               f"groups (all emotions accepted): {acc.get('n_complete')} of {acc.get('n_groups')}.", acc["reason"])
    emo, val = accuracy_tables({"prompting (analysis)": ev})
    s.add_table("Acceptance per emotion (%)", emo).add_table("Acceptance per valence (%)", val)
    s.results["elicitation"] = ev.result(ctx.model.name)
    return s


def _directions_section(ctx: Context) -> Section:
    from .. import viz
    from ..circuits.directions import direction_cosines

    cfg, model = ctx.config, ctx.model
    L = model.n_layers
    stats, directions, sig = ctx.load("stats"), ctx.load("directions"), ctx.load("sigma")
    s = Section("Step 2: context-agnostic emotion directions")
    s.add_text(f"Directions from {stats.n_groups} complete context groups (skeleton x valence): group mean over "
               "emotions subtracted, averaged per emotion, L2-normalised; attention state = resid_mid, MLP state = "
               "resid_post" + (" (last layer after the final norm)." if cfg.final_norm else "."))
    for l, pts in sorted(stats.pca.items()):
        s.figure(f"PCA of the last-token residual (resid_post) at layer {l} of {L}, coloured by the requested emotion",
                 viz.pca_scatter, pts, stats.pca_emotions, title=f"Layer {l}: t* representations")
    cos = direction_cosines(directions, cfg.emotions[0])
    s.figure(f"{2 * L} x {2 * L} cosine similarity of the {cfg.emotions[0]} directions (A = attention, M = MLP "
             "state, interleaved by layer)", viz.cosine_heatmap, cos, title=f"Direction similarity: {cfg.emotions[0]}")
    late = min(L - 2, int(round(0.79 * L)))
    v = directions.scores[:, late, 1]
    cm = Result("matrix", v @ v.T, ("row", "col"), {"row": list(cfg.emotions), "col": list(cfg.emotions)}, {},
                {"metric": "cosine", "model": model.name})
    s.figure(f"Cross-emotion cosine of the MLP-state directions at layer {late}", viz.cosine_heatmap, cm,
             title=f"Cross-emotion cosine, MLP state, layer {late}")
    adj = []
    for e in cfg.emotions:
        c = direction_cosines(directions, e).scores
        within = torch.tensor([float(c[2 * l, 2 * l + 1]) for l in range(L)])
        between = torch.tensor([float(c[2 * l + 1, 2 * l + 2]) for l in range(L - 1)])
        adj.append({"emotion": e, "within-layer attn->mlp": float(within.mean()),
                    "between-layer mlp->attn": float(between.mean()),
                    "off-diagonal mean": float((c.sum() - c.diag().sum()) / (c.numel() - c.shape[0]))})
    s.add_table("Mean adjacent cosines (paper, Llama-3.2-3B: within 0.76-0.78, between 0.80-0.82, off-diagonal "
                "0.23-0.25)", pd.DataFrame(adj).round(3))
    s.results.update(directions=directions, sigma=sig)
    return s


def _components_section(ctx: Context) -> Section:
    from .. import viz

    cfg, model = ctx.config, ctx.model
    neurons, heads, curves = ctx.load("neuron_scores"), ctx.load("head_scores"), ctx.load("curves")
    s = Section("Step 4: local components (neurons and heads) and their ablation / enhancement")
    s.add_text("Neurons are scored analytically (activation x projection of the neuron's output weights on the "
               "layer's MLP direction: C_mean); heads in closed form from one cached pass (the drop of resid_mid . "
               "v_attn when the head's z is zeroed; equal to the paper's masked passes, see tests and "
               "benchmarks/circuits.py).",
               "Curves (best reading of the paper's §6): zero (ablate) or add scale x dmu_e (enhance) into the top-k "
               "components of one layer, vs k random components of the same layer outside the top-k; the emotion "
               "score is the projection of that layer's state at t* on its direction, under P_emo prompts of the "
               "emotion. Head k stays <= n_heads/2 so random draws exist outside the top-k.")
    s.figure("Head scores per emotion (mean drop of resid_mid . v_attn)", viz.heads_heatmap, heads)
    e0 = cfg.emotions[0]
    s.figure(f"Top neurons per layer for {e0} (C_mean)", viz.neurons_heatmap, _emotion_slice(neurons, e0),
             top_k=min(32, model.d_mlp))
    summ = _curve_summary(curves, model.n_heads)
    for mode in ("ablate", "enhance"):
        for kind in ("neuron", "head"):
            keys = [k for k in curves if k.startswith(f"{mode}/{kind}/")]
            if not keys:
                continue
            layer = sorted({k.split("/")[2] for k in keys})[0]
            series = {f"top-k {e}": curves[f"{mode}/{kind}/{layer}/{e}/top"] for e in cfg.emotions
                      if f"{mode}/{kind}/{layer}/{e}/top" in curves}
            series["random-k (mean of emotions)"] = _mean_curve(
                [curves[f"{mode}/{kind}/{layer}/{e}/random"] for e in cfg.emotions
                 if f"{mode}/{kind}/{layer}/{e}/random" in curves], "random")
            s.figure(f"{'Ablation' if mode == 'ablate' else 'Enhancement'} of {kind}s at layer {layer[1:]}: "
                     "change of the emotion score vs k (95% bootstrap CIs)", viz.curves, series,
                     title=f"{mode} {kind}s, layer {layer[1:]}", x_title="k", y_title="change of projection on v_e")
    if len(summ):
        s.add_table("Median ratio |change top-k| / |change random-k| over emotions and layers (paper: random ~ "
                    "no effect; acceptance: >= 3 for some k <= 10)", curve_ratio_table(summ).round(2))
        kmax = summ.groupby(["mode", "kind"])["k"].transform("max")
        at_max = summ[summ["k"] == kmax]
        agg = at_max.groupby(["mode", "kind"]).agg(k=("k", "max"), delta_top=("delta_top", "mean"),
                                                   delta_random=("delta_random", "mean"),
                                                   ratio_median=("ratio", "median"),
                                                   ratio_min=("ratio", "min")).reset_index()
        s.add_table("Summary over emotions and layers at the largest k", agg.round(4))
        s.add_table("Top-k vs random-k per emotion and layer at the largest k", at_max.round(4))
    s.results.update(neuron_scores=neurons, head_scores=heads)
    att = _circuit_attention_section(ctx)  # next to the head and neuron heatmaps
    return [s, att] if att is not None else s


def _influence_section(ctx: Context) -> Section:
    from .. import viz

    cfg = ctx.config
    influence, sig = ctx.load("influence"), ctx.load("sigma")
    s = Section("Step 6: sublayer causal influence")
    s.add_text(f"sigma-scaled pulses (alpha in {list(cfg.influence_alphas)}) along the sign-aligned local direction, "
               "injected into each sublayer's output at t* under P_neu; I = change of the final state's projection on "
               f"v_ref per unit dose (v_ref from layers {cfg.layers(cfg.ref_layers_frac, ctx.model.n_layers)}).")
    s.figure("Sublayer influence per emotion", viz.sublayer_influence, influence)
    s.figure("sigma: mean RMS of each sublayer state at t*", viz.sublayer_influence, sig, title="sigma per layer")
    s.results["influence"] = influence
    return s


def _circuits_section(ctx: Context) -> Section:
    from .. import viz
    from ..circuits.assembly import circuit_overlap

    cfg = ctx.config
    circuits = ctx.load("circuits")
    circuits = {e: circuits[e] for e in cfg.emotions}
    s = Section("Step 7: global emotion circuits")
    c0 = next(iter(circuits.values()))
    s.add_text(f"Budget {c0.alloc.get('K_total')} components per emotion ({c0.alloc.get('K_mlp')} neurons + "
               f"{c0.alloc.get('K_attn')} heads; paper: 560 = 392 + 168 for 28 layers), minimum "
               f"{c0.alloc.get('min_mlp')} neurons / {c0.alloc.get('min_attn')} heads per layer, per-layer cap "
               f"{cfg.cap_ratio} of each kind's budget, allocated by positive sublayer influence.")
    alloc = stack_results([c.allocation() for c in circuits.values()], "emotion", list(circuits))
    s.figure("Circuit allocation per layer", viz.circuit_allocation, alloc)
    on, oh = circuit_overlap(list(circuits.values()))
    off = ~torch.eye(len(circuits), dtype=torch.bool)
    s.add_text(f"Mean pairwise Jaccard overlap: neurons {float(on.scores[off].mean()):.3f}, heads "
               f"{float(oh.scores[off].mean()):.3f} (paper: 0.056 and 0.454).")
    s.figure("Neuron overlap between emotion circuits (Jaccard)", viz.cosine_heatmap, on, title="Neuron overlap")
    s.figure("Head overlap between emotion circuits (Jaccard)", viz.cosine_heatmap, oh, title="Head overlap")
    s.results["circuit_allocation"] = alloc
    return s


def _calibration_section(ctx: Context) -> Section:
    cfg = _strengths(ctx)
    s = Section("Calibration: steering and circuit strengths for this model")
    s.add_text(f"Steering alpha = {cfg.steer_alpha:g} (paper: 8), circuit scale = {cfg.circuit_scale:g} (paper: 1). "
               "How each was chosen:", "steer_alpha: " + ctx.load("steer_calibration")["why"],
               "circuit_scale: " + ctx.load("circuit_calibration")["why"])
    for kind in ("steer", "circuit"):
        if ctx.has(f"{kind}_calibration_table"):
            s.add_table(f"{'Steering' if kind == 'steer' else 'Circuit'} calibration sweep on the analysis split "
                        "(judge accuracy, perplexity of the replies under the unsteered model, distinct-2; fluent = "
                        "passes the guard)", ctx.load(f"{kind}_calibration_table").round(4))
    return s


def _judge_section(ctx: Context) -> Section:
    cfg = ctx.config
    acc = ctx.load("judge_accuracy")
    s = Section("Judge accuracy on held-out labelled sentences")
    where = cfg.judge_eval or "the packaged emolens/data/judge_eval.jsonl"
    overall = acc[acc["emotion"] == "overall"].iloc[0]
    s.add_text(f"Judge {cfg.judge!r} on {where}: {overall['accuracy']:.1f}% of {int(overall['n'])} sentences judged "
               "as their labelled emotion (6-way chance 16.7%). The method accuracies above are only as reliable as "
               "this judge.")
    s.add_table("Judge accuracy per labelled emotion (%)", acc.round(1))
    s.add_table("Confusion (rows: labelled emotion, columns: the judge's label)", ctx.load("judge_confusion"))
    return s


def _control_section(ctx: Context) -> Section:
    cfg = _strengths(ctx)
    evals = {m: GenEval(m, ctx.load(f"eval_{m}")) for m in ("prompting", "steering", "circuit")}
    examples, ex_info = ctx.load("examples"), ctx.load("examples_input")
    s = Section("Step 8: emotion control - prompting vs steering vs circuit modulation")
    emo_t, val_t = accuracy_tables(evals)
    sl = cfg.layers(cfg.steer_layers_frac, ctx.model.n_layers)
    s.add_text(f"Test split, judge = {cfg.judge}. Prompting: P_emo, no intervention. Steering: P_neu + "
               f"{cfg.steer_alpha:g} x RMS x v_mlp at resid_post of layers {sl[0]}-{sl[-1]} (t* and every generated "
               f"token). Circuit: P_neu + scale x dmu_e into the circuit's neurons (t* and generated tokens) and heads "
               f"(every position), scale {cfg.circuit_scale:g}" +
               (f" (overrides {cfg.scale_overrides})" if cfg.scale_overrides else "") + " (strengths: see the "
               "calibration section).",
               "Paper (Llama-3.2-3B, GPT-4o-mini judge): prompting 98.96%, steering 91.22%, circuit 99.65%.",
               "The same replies judged by the judge ensemble, with Wilson 95 % intervals, judge agreement and the "
               "unsteered baseline: step 9; their side effects: step 10.")
    s.add_table("Accuracy per emotion (%)", emo_t).add_table("Accuracy per valence (%)", val_t)
    for name, ev in evals.items():
        s.results[f"accuracy_{name}"] = ev.result(ctx.model.name)
    s.add_text(f"Example input: {ex_info['input']!r}", f"Unsteered reply (P_neu): {ex_info['unsteered']!r}")
    s.add_table("Example replies for one input under all six emotions", examples)
    return s


def _ci_cell(acc: float, lo: float, hi: float) -> str:
    return "" if acc != acc else f"{100 * acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def ensemble_tables(acc: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per judge (and ``majority``), a method x emotion table of accuracy in % with its Wilson 95 % interval
    (cells ``"acc [lo, hi]"``), an ``overall`` column and the method's ``n``; ``acc`` is the
    ``ensemble_accuracy`` output (:func:`emolens.evaluate.agreement.accuracy_table` rows per method)."""
    out = {}
    for j in dict.fromkeys(acc["judge"]):
        rows = []
        for m in dict.fromkeys(acc["method"]):
            a = acc[(acc["judge"] == j) & (acc["method"] == m)]
            r = {"method": m, **{str(x.group): _ci_cell(x.acc, x.lo, x.hi) for x in a.itertuples()}}
            r["n"] = int(a.loc[a["group"] == "overall", "n"].iloc[0])
            rows.append(r)
        out[str(j)] = pd.DataFrame(rows)
    return out


def _ensemble_section(ctx: Context) -> Section:
    cfg = ctx.config
    allf, acc, ag = ctx.load("ensemble"), ctx.load("ensemble_accuracy"), ctx.load("ensemble_agreement")
    judges = list(ag["judges"])
    s = Section("Step 9: every method judged by the judge ensemble (accuracy with Wilson 95 % intervals)")
    per_cell = sorted({int(n) for n in acc.loc[acc["group"] != "overall", "n"]})
    s.add_text(f"Judges: {', '.join(judges)}; a reply counts as matching its target emotion under the majority "
               f"vote when strictly more than half of the {len(judges)} judges say so (a tie is no match). Methods: "
               "unsteered (P_neu, no intervention: the chance reference), prompting (P_emo), steering and circuit "
               "modulation at the calibrated strengths (see the calibration section).",
               f"Cells: accuracy in % [Wilson 95 % interval]; n per emotion cell = {', '.join(map(str, per_cell))}; "
               "the last column is the method's n over all emotions. Chance is 1/"
               f"{len(cfg.emotions)} = {100 / len(cfg.emotions):.1f} %.")
    tables = ensemble_tables(acc)
    for j, t in tables.items():
        name = "majority vote" if j == "majority" else f"judge {j}"
        s.add_table(f"Accuracy per method and emotion (%), {name}", t)
    pairs = pd.DataFrame(ag["pairs"])
    if len(pairs):
        s.add_table(f"Judge agreement on all {ag['n']} test replies: Cohen's kappa per pair on the binary match "
                    "(kappa) and on the judged label (kappa_label), raw agreement on the match",
                    pairs.round(3))
        s.add_text(f"Fleiss' kappa over all {len(judges)} judges (binary match): {ag['fleiss_match']:.3f}; largest "
                   f"pairwise Cohen's kappa {ag['max_pair_kappa']:.3f}.")
    # example replies: the same first inputs under every method, a few per emotion
    k = cfg.examples_per_emotion
    keys = list(dict.fromkeys(zip(allf["skeleton_id"], allf["valence"])))[:k]
    pick = allf[[(a, b) in keys for a, b in zip(allf["skeleton_id"], allf["valence"])]]
    cols = ["target", "user", "text", "majority"] + [f"{j}_label" for j in judges]
    for method, _ in METHODS:
        t = pick[pick["method"] == method][cols].rename(columns={"target": "emotion", "user": "input",
                                                                "text": "reply"})
        t = t.sort_values("emotion", key=lambda c: c.map({e: i for i, e in enumerate(cfg.emotions)}), kind="stable")
        s.add_table(f"Example replies: {method} ({k} input(s) x {len(cfg.emotions)} target emotions; judged labels)",
                    t.reset_index(drop=True))
    return s


def _side_effects_section(ctx: Context) -> Section:
    from ..evaluate.side_effects import load_retention_qa

    info, table = ctx.load("side_effect_cards"), ctx.load("side_effects")
    g = info["guards"]
    n_all = len(load_retention_qa())
    s = Section("Step 10: side-effect card of each control method (test split)")
    s.add_text("Perplexity of each method's replies under the unsteered model (P_neu prompt) and its ratio to the "
               "unsteered replies; distinct-2 (share of unique word bigrams); restate = replies that copy or edit the "
               "user's text (>= 30 % of their word bigrams occur in it, or an edit announcement); names emotion = "
               "replies that contain the target emotion's word or an inflection; retention = accuracy on "
               f"{info['retention_questions']} of the project's {n_all} factual/arithmetic questions "
               f"({'all of them' if info['retention_questions'] >= n_all else 'a subset spread over the file; quick mode asks 12, the full configuration all ' + str(n_all)}"
               f"), asked under the same intervention or emotion prompt ({info['retention_max_new_tokens']} new "
               "tokens), against the unsteered model's accuracy (drop in points).",
               f"Guards: perplexity ratio <= {g['max_ppl_ratio']:g}, restate <= {100 * g['max_restate']:.0f} %, names "
               f"emotion <= {100 * g['max_name']:.0f} %, retention drop <= {100 * g['max_retention_drop']:.0f} points. "
               "The unsteered row is the reference. These are reported, not used to choose the strengths (the "
               "calibration's fluency guard chose them on the analysis split).")
    s.add_table("Side-effect cards", table)
    rr = ctx.load("retention_replies")
    s.add_table("Retention answers (first 3 questions per method)",
                rr.groupby("method", sort=False).head(3).reset_index(drop=True))
    return s


def _circuit_attention_section(ctx: Context) -> Section | None:
    from ..viz.attention import AttentionView

    if not ctx.has("circuit_attention"):
        return None
    res = ctx.load("circuit_attention")
    if not res:
        return None
    cfg = ctx.config
    s = Section("Circuit heads: attention patterns on example replies (circuitsvis)")
    s.add_text(f"For each emotion, the circuit's {cfg.attention_top_heads} heads with the highest head score (step 4b), "
               "read on the first test prompt followed by its circuit-modulated reply (teacher-forced) under the same "
               f"modulation that produced it; the last {cfg.attention_max_tokens} tokens are shown. Rendered with "
               "circuitsvis from the page's embedded script (offline).")
    rows = []
    for e in cfg.emotions:
        r = res.get(e)
        if r is None:
            continue
        reply = str(r.meta.get("reply", ""))
        s.figure(f"{e}: heads {', '.join(r.labels['head'])} on the reply “{reply[:80]}”", AttentionView, r.scores,
                 r.labels["query"], r.labels["head"], title=f"{e}: top circuit heads")
        rows.append({"emotion": e, "heads": ", ".join(r.labels["head"]), "scale": r.meta.get("scale"),
                     "reply": reply[:120]})
    s.add_table("Heads shown per emotion", pd.DataFrame(rows))
    return s


_ANALYSIS = ("analysis_columns", "analysis_per_theme", "analysis_max_records", "emotions", "valences")
_TEST = ("test_columns", "test_per_theme", "test_max_records", "emotions", "valences")
_JUDGE = ("judge", "judge_model")  # judge_url is where, not what: a moved server keeps the verdicts
_GEN = {k: tuple(f"{k}_{x}" for x in ("max_new_tokens", "min_new_tokens", "repetition_penalty", "no_repeat_ngram"))
        + ("gen_batch_size",) for k in ("prompt", "steer", "circuit")}
_STEER = ("steer_layers_frac", "steer_sublayer")
_CIRCUIT = ("scale_overrides",)

#: The paper-2 pipeline: public steps on the engine (:mod:`emolens.pipelines.engine`).
STEPS: tuple[Step, ...] = (
    Step("elicit_texts", elicit_texts_step, config=_ANALYSIS + ("accept_filter", "system_emo") + _GEN["prompt"],
         data=("analysis_data",)),
    Step("elicit", elicit_step, inputs=("elicit_texts",),
         config=_ANALYSIS + ("accept_filter", "accept_min_fraction", "system_emo") + _JUDGE,
         data=("analysis_data", "judge_train"), section=_elicit_section),
    Step("stats", stats_step, inputs=("elicit",),
         config=_ANALYSIS + ("system_emo", "final_norm", "head_moments", "batch_size", "pca_layers_frac"),
         data=("analysis_data",), section=_directions_section),
    Step("scores", scores_step, inputs=("stats",), config=_ANALYSIS + ("system_emo", "batch_size"),
         data=("analysis_data",)),
    Step("curves", curves_step, inputs=("stats", "scores"),
         config=_ANALYSIS + ("system_emo", "curve_layers_frac", "curve_ks", "curve_n_random", "curve_samples",
                             "enhance_scale", "seed", "final_norm"),
         data=("analysis_data",), section=_components_section),
    Step("influence", influence_step, inputs=("elicit", "stats"),
         config=_ANALYSIS + ("system_neu", "influence_alphas", "ref_layers_frac", "influence_samples", "seed",
                             "final_norm"),
         data=("analysis_data",), section=_influence_section),
    Step("circuits", circuits_step, inputs=("influence", "scores"),
         config=("emotions", "budget_per_sublayer", "mlp_ratio", "min_neurons", "min_heads", "cap_ratio"),
         section=_circuits_section),
    Step("eval_prompting_texts", eval_prompting_texts_step, config=_TEST + ("system_emo",) + _GEN["prompt"],
         data=("test_data",)),
    Step("calibrate_steer", calibrate_steer_step, inputs=("stats",),
         config=_ANALYSIS + ("system_neu", "steer_alpha", "calib_alphas", "calib_records", "calib_max_ppl_ratio",
                             "calib_min_distinct2") + _STEER + _GEN["steer"] + _GEN["circuit"] + _JUDGE,
         data=("analysis_data", "judge_train")),
    Step("calibrate_circuit", calibrate_circuit_step, inputs=("stats", "circuits"),
         config=_ANALYSIS + ("system_neu", "circuit_scale", "calib_scales", "calib_records", "calib_max_ppl_ratio",
                             "calib_min_distinct2") + _CIRCUIT + _GEN["circuit"] + _JUDGE,
         data=("analysis_data", "judge_train"), section=_calibration_section),
    Step("eval_steering_texts", eval_steering_texts_step, inputs=("stats", "calibrate_steer"),
         config=_TEST + ("system_neu",) + _STEER + _GEN["steer"], data=("test_data",)),
    Step("eval_circuit_texts", eval_circuit_texts_step, inputs=("stats", "circuits", "calibrate_circuit"),
         config=_TEST + ("system_neu",) + _CIRCUIT + _GEN["circuit"], data=("test_data",)),
    Step("eval_prompting", eval_prompting_step, inputs=("eval_prompting_texts",),
         config=_TEST + ("system_emo",) + _JUDGE, data=("test_data", "judge_train")),
    Step("eval_steering", eval_steering_step, inputs=("eval_steering_texts",),
         config=_TEST + ("system_neu",) + _JUDGE, data=("test_data", "judge_train")),
    Step("eval_circuit", eval_circuit_step, inputs=("eval_circuit_texts",),
         config=_TEST + ("system_neu",) + _JUDGE, data=("test_data", "judge_train")),
    Step("examples", examples_step, inputs=("stats", "circuits", "calibrate_steer", "calibrate_circuit"),
         config=("emotions", "valences", "test_columns", "system_emo", "system_neu", "example_record",
                 "example_valence") + _STEER + _CIRCUIT + _GEN["prompt"] + _GEN["steer"] + _GEN["circuit"],
         data=("test_data",), section=_control_section),
    Step("eval_unsteered_texts", eval_unsteered_texts_step, config=_TEST + ("system_neu",) + _GEN["circuit"],
         data=("test_data",)),
    Step("ensemble", ensemble_step, inputs=tuple(out for _, out in METHODS),
         config=_TEST + ("system_emo", "system_neu", "ensemble_judges", "judge_model"),
         data=("test_data", "judge_train"), section=_ensemble_section),
    Step("side_effects", side_effects_step,
         inputs=("stats", "circuits", "calibrate_steer", "calibrate_circuit") + tuple(out for _, out in METHODS),
         config=_TEST + ("system_emo", "system_neu", "retention_questions", "retention_max_new_tokens",
                         "gen_batch_size", "calib_max_ppl_ratio") + _STEER + _CIRCUIT,
         data=("test_data",), section=_side_effects_section),
    Step("circuit_attention", circuit_attention_step,
         inputs=("stats", "scores", "circuits", "calibrate_circuit", "eval_circuit_texts"),
         config=_TEST + ("system_neu", "attention_top_heads", "attention_max_tokens") + _CIRCUIT,
         data=("test_data",)),
    Step("judge", judge_step, config=_JUDGE + ("judge_eval_columns",), data=("judge_train", "judge_eval"),
         section=_judge_section),
)


def run(model, out_dir, *, quick: bool = False, progress: bool = True, config: Paper2Config | None = None,
        resume: bool = True, on_step=None) -> list[Section]:
    """Run paper 2 end to end on ``model``; save raw results into ``out_dir/paper2``; return report sections.

    Args:
        model: an :class:`~emolens.model.EmoModel`.
        out_dir: run folder (raw results go to ``out_dir/paper2/``).
        quick: smaller data and fewer tokens (:meth:`Paper2Config.quick`).
        config: hyperparameters and data (default :meth:`Paper2Config.for_model`).
        resume: reuse steps of an earlier run whose fingerprint (config fields, model, data, inputs) still
            matches; the others, and everything downstream of them, recompute.
        on_step: called with each step's :class:`~emolens.pipelines.engine.StepLog`.

    Raises:
        JudgeError: the judge failed (e.g. an unreachable endpoint); finished steps (and generated
            replies) stay on disk, and a rerun with the same ``out_dir`` resumes (only re-judging).
    """
    cfg = config if config is not None else Paper2Config.for_model(model)
    if quick:
        cfg = cfg.quick()
    cfg.check()
    judge = make_judge(cfg)  # bad judge settings fail here, before any work (it connects only when used)
    if "nade" in cfg.ensemble_judges:  # a missing `nade` fails now, not after the generation steps
        from ..evaluate.judges import _nade

        _nade()
    check_data(cfg)
    root = Path(out_dir) / "paper2"
    try:
        ctx = run_steps(STEPS, model, cfg, root, progress=progress, resume=resume, on_step=on_step,
                        extras={"judge": judge, "quick": quick}, label="paper 2")
    except JudgeError as e:
        done = sorted(p.stem for p in (root / "steps").glob("*.json"))
        raise JudgeError(f"{e}\nThe finished steps ({', '.join(done) or 'none'}) are kept in {root}; fix the judge "
                         "and rerun with the same output folder to resume.") from None
    io.write_json(root / "run_config.json", {"config": cfg.to_dict(), "model": model_fingerprint(model)})
    return [_overview_section(ctx)] + engine_sections(STEPS, ctx)


# =========================================================================================
# CLI
# =========================================================================================
def add_circuit_args(p) -> None:
    """Options of ``emolens circuit``."""
    from .options import add_data_args, add_run_folder_args

    p.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m-instruct; on a GPU e.g. "
                   "meta-llama/Llama-3.2-3B-Instruct or Qwen/Qwen2.5-7B-Instruct)")
    p.add_argument("--device", default=None)
    add_run_folder_args(p, overwrite_with_resume="continue it under a changed configuration (changed steps recompute)")
    p.add_argument("--quick", action="store_true", help="small data, few tokens (a few minutes on CPU)")
    p.add_argument("--paper", action="store_true", help="the paper's hyperparameters (alpha 8, scale 1, acceptance "
                   "filter on; no calibration)")
    p.add_argument("--judge", choices=("probe", "nrc", "openai"), default=None)
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint for --judge openai")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--steer-alpha", type=float, default=None, help="steering strength (default: calibrated in the run)")
    p.add_argument("--circuit-scale", type=float, default=None, help="circuit modulation scale (default: calibrated "
                   "in the run)")
    p.add_argument("--calibrate", action="store_true", help="calibrate both strengths even with --paper")
    add_data_args(p, ("paper2",))
    p.add_argument("--no-progress", action="store_true")


def config_from_args(m, args) -> Paper2Config:
    """The configuration ``emolens circuit`` / ``emolens run`` builds from their options."""
    from . import options

    cfg = Paper2Config.paper() if getattr(args, "paper", False) else Paper2Config.for_model(m)
    cfg = cfg.quick() if args.quick else cfg  # first, so explicit --config fields and options win over the preset
    cfg = options.apply(cfg, "paper2", args, options.read_config_file(args.config, getattr(args, "_pipelines",
                                                                                          ("paper2",))))
    kw = {}
    for k in ("judge", "judge_url", "judge_model", "steer_alpha", "circuit_scale"):
        if getattr(args, k, None) is not None:
            kw[k] = getattr(args, k)
    if getattr(args, "calibrate", False):
        kw.update(steer_alpha=None, circuit_scale=None)
    return cfg.replace(**kw) if kw else cfg


def circuit_cli(args) -> int:
    """``emolens circuit``: run the paper-2 pipeline and write a report into a run folder (``--resume DIR``
    continues one)."""
    import time

    import emolens
    from .. import report
    from .engine import RunFolder

    m = emolens.load_model(args.model, device=args.device)
    cfg = config_from_args(m, args)
    make_judge(cfg)
    check_data(cfg)  # a bad data file fails before a run folder exists
    identity = {"command": "circuit", "model": model_fingerprint(m), "config": {"paper2": cfg.to_dict()}}
    with RunFolder.open(args.out, args.name, identity, resume=args.resume, overwrite=args.overwrite) as rf:
        t0 = time.time()
        print(f"emolens circuit -> {rf.path}", flush=True)
        secs = run(m, rf.path, progress=not args.no_progress, config=cfg, on_step=lambda e: rf.step_done("paper2", e))
        meta = report.run_metadata(m, {"quick": args.quick, "config": cfg.to_dict()}, command="emolens circuit",
                                   elapsed_s=round(time.time() - t0, 1))
        path = report.write_report([report.model_info_section(m)] + secs, rf.path,
                                   title=f"emolens: emotion circuits on {m.name}", meta=meta, model_info=m.info())
        print(f"report: {Path(path).resolve()}")
        return 0
