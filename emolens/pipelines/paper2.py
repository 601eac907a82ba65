"""Paper 2 end to end: "Do LLMs 'Feel'? Emotion Circuits Discovery and Control" (Wang et al., 2025).

Steps (each a function returning :class:`~emolens.results.Result` objects; :func:`run` chains them
with checkpoint/resume in ``OUT_DIR/paper2/``):

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

Every hyperparameter lives in :class:`Paper2Config` with the paper's value as default;
:meth:`Paper2Config.for_model` swaps in values calibrated for small models where the paper's values
break them (see ``CALIBRATED``), and the report states which values ran.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ._store import StepStore
from ..errors import InputError, JudgeError
from ..results import Result, stack_results
from ..sections import Section

log = logging.getLogger("emolens")

__all__ = ["Paper2Config", "CALIBRATED", "GenEval", "make_judge", "generate_replies", "step_elicit", "step_stats",
           "step_steer", "step_component_scores", "step_curves", "step_influence", "step_circuits", "step_modulate",
           "step_calibrate", "accuracy_tables", "curve_ratio_table", "run", "circuit_cli", "add_circuit_args"]


# =========================================================================================
# Configuration
# =========================================================================================
@dataclass
class Paper2Config:
    """Every hyperparameter of the paper-2 pipeline; defaults are the paper's values.

    Layer ranges are fractions of depth (``l / n_layers``, inclusive) so they transfer across
    models: steering 11-20 of 28 = (0.39, 0.72); reference layers 21-25 of 28 = (0.75, 0.9);
    PCA depths 1, 9, 12, 27 of 28.
    """

    # data and prompts
    emotions: tuple = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")
    valences: tuple = ("positive", "neutral", "negative")
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
    # step 1: elicitation
    accept_filter: bool = True  #: use only judge-accepted samples downstream (paper)
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
    steer_alpha: float = 8.0
    steer_layers_frac: tuple = (0.39, 0.72)
    steer_sublayer: str = "mlp"
    steer_max_new_tokens: int = 100
    steer_min_new_tokens: int = 10
    steer_repetition_penalty: float = 1.05
    steer_no_repeat_ngram: int = 3
    # step 4c: ablation / enhancement curves (best reading)
    curve_layers_frac: tuple = (0.5, 0.8)
    curve_ks: tuple = tuple(range(11))
    curve_n_random: int = 5
    curve_samples: int | None = None  #: P_emo samples per emotion (None = all)
    enhance_scale: float = 1.0
    # step 6: sublayer influence
    influence_alphas: tuple = (0.1, 0.3, 0.5, 0.7)
    ref_layers_frac: tuple = (0.75, 0.9)
    influence_samples: int | None = None  #: P_neu samples (None = all analysis items)
    # step 7: circuit assembly
    budget_per_sublayer: float = 10.0
    mlp_ratio: float = 0.7
    min_neurons: int = 4
    min_heads: int = 2
    cap_ratio: float = 0.4
    # step 8: circuit modulation
    circuit_scale: float = 1.0
    scale_overrides: dict = field(default_factory=dict)  #: per-emotion scale (the repo: {"anger": 0.8})
    circuit_max_new_tokens: int = 100
    circuit_min_new_tokens: int = 10
    circuit_repetition_penalty: float = 1.1
    circuit_no_repeat_ngram: int = 3
    # calibration (not in the paper: sweeps on the analysis split, chosen by judge accuracy + fluency guard)
    calibrate: bool = False
    calib_alphas: tuple = (1.0, 2.0, 4.0, 8.0)
    calib_scales: tuple = (1.0, 2.0, 4.0, 8.0)
    calib_records: int = 4
    calib_max_ppl_ratio: float = 4.0
    calib_min_distinct2: float = 0.3
    # report
    pca_layers_frac: tuple = (1 / 28, 9 / 28, 12 / 28, 27 / 28)
    example_record: int = 0
    example_valence: str = "negative"
    seed: int = 0
    notes: tuple = ()

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def paper(cls) -> "Paper2Config":
        """The paper's values (Llama-3.2-3B-Instruct)."""
        return cls()

    @classmethod
    def for_model(cls, model_or_name: Any = None) -> "Paper2Config":
        """Paper values, with the calibrated alternatives of ``CALIBRATED`` for known small models."""
        name = getattr(model_or_name, "name", model_or_name) or ""
        cfg = cls()
        over = CALIBRATED.get(str(name).lower())
        if over is None and str(name).lower().startswith("tiny-"):
            over = CALIBRATED["tiny"]
        return cfg.replace(**over) if over else cfg

    def replace(self, **kw) -> "Paper2Config":
        bad = [k for k in kw if k not in {f.name for f in dataclasses.fields(self)}]
        if bad:
            raise InputError(f"Unknown Paper2Config field(s) {bad}.")
        return dataclasses.replace(self, **kw)

    def quick(self) -> "Paper2Config":
        """A small, fast variant (same methods, fewer samples and tokens)."""
        return self.replace(analysis_per_theme=1, test_per_theme=1,
                            test_max_records=min(self.test_max_records or 4, 4), curve_samples=8,
                            curve_n_random=3, curve_layers_frac=self.curve_layers_frac[:1], influence_samples=8,
                            influence_alphas=(0.3, 0.7), calibrate=False,
                            prompt_max_new_tokens=min(self.prompt_max_new_tokens, 24),
                            steer_max_new_tokens=min(self.steer_max_new_tokens, 24),
                            circuit_max_new_tokens=min(self.circuit_max_new_tokens, 24),
                            steer_min_new_tokens=min(self.steer_min_new_tokens, 8),
                            circuit_min_new_tokens=min(self.circuit_min_new_tokens, 8))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Paper2Config":
        names = {f.name: f for f in dataclasses.fields(cls)}
        bad = [k for k in d if k not in names]
        if bad:
            raise InputError(f"Unknown Paper2Config field(s) {bad}; valid fields: {sorted(names)}.")
        kw = {}
        for k, v in d.items():
            default = names[k].default
            kw[k] = tuple(v) if isinstance(v, list) and (isinstance(default, tuple) or default is dataclasses.MISSING) \
                else v
        return cls(**kw)

    def layers(self, frac: Sequence[float], n_layers: int) -> list[int]:
        from ..circuits.influence import layers_from_fraction

        return layers_from_fraction(n_layers, (float(frac[0]), float(frac[1])))

    def scale_for(self, emotion: str) -> float:
        return float(self.scale_overrides.get(emotion, self.circuit_scale))


#: Per-model calibrated alternatives. Everything not listed keeps the paper's value.
#: smollm2-135m-instruct: ``step_calibrate`` on 12 analysis items x 6 emotions (ProbeJudge; fluency guard:
#: perplexity under the unsteered model <= 4 x that of unsteered replies, distinct-2 >= 0.3), see
#: benchmarks/RESULTS.md. Sweep (accuracy / perplexity; unsteered 6.9% / 2.97): steering alpha 1: 22.2% / 4.5,
#: 2: 29.2% / 13.3, 4: 11.1% / 70, 8 (paper): 37.5% / 304 (broken text); circuit scale 1: 13.9% / 3.1,
#: 2: 29.2% / 4.3, 4: 80.6% / 12.2, 8: 79.2% / 33.6. Chosen under the guard: alpha 1, scale 2.
CALIBRATED: dict[str, dict] = {
    "smollm2-135m-instruct": {
        # It ignores "Always reply in {emotion}" (README: 3/24 NRC matches), so the judge acceptance filter
        # would leave almost no complete context groups: directions use every sample instead.
        "accept_filter": False,
        # alpha = 8 x RMS at 39-72% depth destroys fluency in this 30-layer model (perplexity x100).
        "steer_alpha": 1.0,
        "circuit_scale": 2.0,
        # CPU budget: 2 shared cores.
        "test_per_theme": 2,
        "curve_samples": 16,
        "influence_samples": 16,
        "prompt_max_new_tokens": 40,
        "steer_max_new_tokens": 40,
        "circuit_max_new_tokens": 40,
        "notes": ("calibrated for smollm2-135m-instruct (fluency-guarded sweep on the analysis split): "
                  "accept_filter off, steer_alpha 1, circuit_scale 2; CPU-sized: 40 new tokens, test split 2 "
                  "records per theme, 16 samples for curves and influence",),
    },
    "tiny": {"accept_filter": False, "judge": "nrc", "analysis_per_theme": 1, "test_per_theme": 1,
             "test_max_records": 2, "curve_samples": 4, "curve_n_random": 2, "influence_samples": 4,
             "influence_alphas": (0.3,), "prompt_max_new_tokens": 6, "steer_max_new_tokens": 6,
             "circuit_max_new_tokens": 6, "steer_min_new_tokens": 2, "circuit_min_new_tokens": 2,
             "steer_alpha": 2.0, "circuit_scale": 2.0, "budget_per_sublayer": 2.0, "min_neurons": 1,
             "min_heads": 1, "notes": ("tiny random-weight test model: sizes shrunk for tests",)},
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
        return ProbeJudge()
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
    from ..progress import progress_bar
    from ..scale import active_backend, generate_replies as scaled_generate

    backend = active_backend() if backend is None else backend
    if backend not in (None, "local") and len(prompts) > batch_size:
        return scaled_generate(model, prompts, emotions, interventions_for=interventions_for, gen_kwargs=gen_kwargs,
                               batch_size=batch_size, backend=backend, progress=progress)

    gen_kwargs = dict(gen_kwargs or {})
    prompts = list(prompts)
    emotions = list(emotions)
    specs = {e: list(interventions_for(e)) for e in dict.fromkeys(emotions)} if interventions_for else {}
    out: list[str] = []
    for s in progress_bar(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        rows = list(range(s, min(s + batch_size, len(prompts))))
        ivs = []
        for e, sp in specs.items():
            mine = tuple(i - s for i in rows if emotions[i] == e)
            if mine:
                ivs += [dataclasses.replace(iv, rows=mine) for iv in sp]
        texts = model.generate([prompts[i] for i in rows], interventions=ivs or None, batch_size=len(rows),
                               **gen_kwargs)
        out += [t.strip() for t in texts]
    return out


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

    recs = list(records) if records is not None else list(load_sev(split=split))
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
# Checkpoints
# =========================================================================================
class _Store(StepStore):
    """Finished steps of one paper-2 run under ``root`` (see :class:`~emolens.pipelines._store.StepStore`)."""

    def __init__(self, root: Path, fingerprint: dict, resume: bool):
        super().__init__(root, fingerprint, resume, label="paper-2", stale=("*_texts.parquet",))


def _gen_step(store: _Store, name: str, method: str, fn_generate: Callable[[], GenEval],
              fn_judge: Callable[[list[str]], GenEval]) -> GenEval:
    """Generate (texts saved first), then judge; a judge failure keeps the texts for the resume."""
    if store.done(name):
        return GenEval(method, store.load_df(name))
    t0 = time.time()
    if store.has_df(f"{name}_texts"):
        texts = store.load_df(f"{name}_texts")["text"].tolist()
        ev = fn_judge(texts)
    else:
        ev = fn_generate()
    store.save_df(name, ev.samples)
    store.mark(name, time.time() - t0, accuracy=ev.accuracy)
    return ev


# =========================================================================================
# The run
# =========================================================================================
def run(model, out_dir, *, quick: bool = False, progress: bool = True, config: Paper2Config | None = None,
        resume: bool = True) -> list[Section]:
    """Run paper 2 end to end on ``model``; save raw results into ``out_dir/paper2``; return report sections.

    Args:
        model: an :class:`~emolens.model.EmoModel`.
        out_dir: run folder (raw results go to ``out_dir/paper2/``).
        quick: smaller data and fewer tokens (:meth:`Paper2Config.quick`).
        config: hyperparameters (default :meth:`Paper2Config.for_model`).
        resume: reuse finished steps of an earlier run with the same configuration and model.

    Raises:
        JudgeError: the judge failed (e.g. an unreachable endpoint); finished steps (and generated
            replies) stay on disk, and a rerun with the same ``out_dir`` resumes.
    """
    from ..circuits.prompts import check_emotions

    cfg = config if config is not None else Paper2Config.for_model(model)
    if quick:
        cfg = cfg.quick()
    check_emotions(cfg.emotions)
    the_judge = make_judge(cfg)  # bad judge settings fail here, before any work (it connects only when used)
    root = Path(out_dir) / "paper2"
    info = {k: v for k, v in model.info().items() if k not in ("device",)}
    store = _Store(root, {"config": cfg.to_dict(), "model": info, "quick": quick}, resume)
    t_run = time.time()

    def judge():
        return the_judge

    try:
        return _run_steps(model, cfg, store, judge, progress, quick, t_run)
    except JudgeError as e:
        done = sorted(p.stem for p in (root / "steps").glob("*.json"))
        raise JudgeError(f"{e}\nThe finished steps ({', '.join(done) or 'none'}) are kept in {root}; fix the judge "
                         "and rerun with the same output folder to resume.") from None


def _run_steps(model, cfg: Paper2Config, store: _Store, judge, progress: bool, quick: bool, t_run: float
               ) -> list[Section]:
    from ..circuits.assembly import Circuit
    from ..circuits.directions import SEVStats, difference_vectors, emotion_directions
    from ..circuits.influence import sigma as sigma_of
    from ..circuits.prompts import emo_prompts, neu_prompts

    analysis = _items(cfg, "analysis", cfg.analysis_per_theme, cfg.analysis_max_records)
    test = _items(cfg, "test", cfg.test_per_theme, cfg.test_max_records)
    L = model.n_layers

    # -- step 1: elicitation + acceptance (only needed for the filter) -------------------
    accepted = None
    elicit_ev = None
    if cfg.accept_filter:
        ps = emo_prompts(analysis, cfg.emotions, cfg.system_emo)

        def gen():
            texts = generate_replies(model, ps.prompts, ps.emotions, gen_kwargs=_gen_kwargs(cfg, "prompt"),
                                     batch_size=cfg.gen_batch_size, progress=progress, desc="elicitation: generate")
            store.save_df("elicit_texts", pd.DataFrame({"text": texts}))
            return step_elicit(model, analysis, cfg, judge(), texts=texts)

        elicit_ev = _gen_step(store, "elicit", "prompting (analysis)", gen,
                              lambda t: step_elicit(model, analysis, cfg, judge(), texts=t))
        s = elicit_ev.samples
        accepted = {(a, b, c): bool(m) for a, b, c, m in zip(s["skeleton_id"], s["valence"], s["emotion"], s["match"])}

    # -- step 2: streaming statistics -> directions, difference vectors, sigma -----------
    if store.done("stats"):
        stats = SEVStats.load(store.path("stats"))
    else:
        t0 = time.time()
        stats = step_stats(model, analysis, cfg, accepted, progress=progress)
        stats.save(store.path("stats"))
        store.mark("stats", time.time() - t0, n_groups=stats.n_groups)
    directions = emotion_directions(stats)
    dmu_mlp, dmu_attn = difference_vectors(stats)
    sig = sigma_of(stats)
    for name, r in (("directions", directions), ("dmu_mlp", dmu_mlp), ("dmu_attn", dmu_attn), ("sigma", sig)):
        r.save(store.path(name))  # derived from the statistics: cheap, always current

    # -- step 4a/4b: component scores ------------------------------------------------------
    if store.done("scores"):
        neurons = Result.load(store.path("neuron_scores"))
        heads = Result.load(store.path("head_scores"))
    else:
        t0 = time.time()
        neurons, heads = step_component_scores(model, stats, directions, cfg, analysis, progress=progress)
        neurons.save(store.path("neuron_scores"))
        heads.save(store.path("head_scores"))
        store.mark("scores", time.time() - t0)

    # -- step 4c: curves ----------------------------------------------------------------
    curves_dir = store.path("curves")
    if store.done("curves"):
        curves = {p.relative_to(curves_dir).with_suffix("").as_posix(): Result.load(p)
                  for p in sorted(curves_dir.rglob("*.safetensors"))}
    else:
        t0 = time.time()
        curves = step_curves(model, analysis, cfg, directions, neurons, heads, dmu_mlp, dmu_attn, progress=progress)
        for k, r in curves.items():
            r.save(curves_dir / k)
        store.mark("curves", time.time() - t0)

    # -- step 6: sublayer influence -----------------------------------------------------
    if store.done("influence"):
        influence = Result.load(store.path("influence"))
    else:
        t0 = time.time()
        influence = step_influence(model, analysis, cfg, directions, sig, accepted, progress=progress)
        influence.save(store.path("influence"))
        store.mark("influence", time.time() - t0)

    # -- step 7: circuits -----------------------------------------------------------------
    circ_dir = store.path("circuits")
    if store.done("circuits"):
        circuits = {e: Circuit.load(circ_dir / f"{e}.json", model=model) for e in cfg.emotions}
    else:
        t0 = time.time()
        circuits = step_circuits(model, cfg, influence, neurons, heads)
        for e, c in circuits.items():
            c.save(circ_dir / f"{e}.json")
        store.mark("circuits", time.time() - t0)

    # -- calibration (optional; analysis split) -----------------------------------------
    calib_table = None
    if cfg.calibrate:
        if store.done("calibrate"):
            calib_table = store.load_df("calibrate")
            chosen = json.loads(store.path("calibrate_chosen.json").read_text())
        else:
            t0 = time.time()
            cal_items = _items(cfg, "analysis", 1, cfg.calib_records)
            calib_table, chosen = step_calibrate(model, cal_items, cfg, judge(), directions=directions,
                                                 circuits=circuits, dmu_mlp=dmu_mlp, dmu_attn=dmu_attn,
                                                 progress=progress)
            store.save_df("calibrate", calib_table)
            store.path("calibrate_chosen.json").write_text(json.dumps(chosen))
            store.mark("calibrate", time.time() - t0, **chosen)
        cfg = cfg.replace(**chosen)

    # -- evaluation on the test split: prompting, steering, circuit -----------------------
    evals: dict[str, GenEval] = {}
    ps_emo = emo_prompts(test, cfg.emotions, cfg.system_emo)
    ps_neu = neu_prompts(test, cfg.emotions, cfg.system_neu)
    from ..circuits.modulation import modulation_interventions
    from ..circuits.steer import steering_interventions

    steer_layers = cfg.layers(cfg.steer_layers_frac, L)

    def two_phase(name, method, ps, ivs_for, kind):
        def gen():
            texts = generate_replies(model, ps.prompts, ps.emotions, interventions_for=ivs_for,
                                     gen_kwargs=_gen_kwargs(cfg, kind), batch_size=cfg.gen_batch_size,
                                     progress=progress, desc=f"{method}: generate")
            store.save_df(f"{name}_texts", pd.DataFrame({"text": texts}))
            return GenEval(method, _judge_frame(judge(), ps, texts))
        return _gen_step(store, name, method, gen, lambda t: GenEval(method, _judge_frame(judge(), ps, t)))

    evals["prompting"] = two_phase("eval_prompting", "prompting", ps_emo, None, "prompt")
    evals["steering"] = two_phase("eval_steering", "steering", ps_neu,
                                  lambda e: steering_interventions(model, directions, e, steer_layers, cfg.steer_alpha,
                                                                   sublayer=cfg.steer_sublayer), "steer")
    evals["circuit"] = two_phase("eval_circuit", "circuit", ps_neu,
                                 lambda e: modulation_interventions(model, circuits[e], dmu_mlp, dmu_attn,
                                                                    cfg.scale_for(e)), "circuit")

    # -- example replies: one input under all six emotions -------------------------------
    if store.done("examples"):
        examples = store.load_df("examples")
    else:
        t0 = time.time()
        recs = _items(cfg, "test", None)
        ex_items = [it for it in recs if it.valence == cfg.example_valence] or recs
        item = ex_items[min(cfg.example_record, len(ex_items) - 1)]
        rows = []
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
        for i, e in enumerate(cfg.emotions):
            rows.append({"emotion": e, "prompting": p[i], "steering": s[i], "circuit": c[i]})
        examples = pd.DataFrame(rows)
        examples.attrs["input"] = item.user
        store.save_df("examples", examples)
        store.path("examples_input.json").write_text(json.dumps({"input": item.user, "unsteered": base}))
        store.mark("examples", time.time() - t0)
    ex_info = json.loads(store.path("examples_input.json").read_text())

    total = time.time() - t_run
    return _sections(model, cfg, store, quick, analysis, test, stats, directions, sig, neurons, heads, curves,
                     influence, circuits, evals, elicit_ev, examples, ex_info, calib_table, total)


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


def _sections(model, cfg, store, quick, analysis, test, stats, directions, sig, neurons, heads, curves, influence,
              circuits, evals, elicit_ev, examples, ex_info, calib_table, total) -> list[Section]:
    from .. import viz
    from ..circuits.assembly import circuit_overlap
    from ..circuits.directions import direction_cosines

    L = model.n_layers
    secs: list[Section] = []
    # -- overview --------------------------------------------------------------------------
    s = Section("Paper 2: emotion circuits (overview and settings)")
    s.add_text(
        "Re-implementation of 'Do LLMs Feel? Emotion Circuits Discovery and Control' (Wang et al., 2025) on "
        f"{model.name}: SEV-format scenario-event prompts (project-written data), six emotions, reads and injections "
        "at t* (the last token of the templated prompt).",
        f"Analysis split: {len(analysis)} scenario-event items x {len(cfg.emotions)} emotions = "
        f"{len(analysis) * len(cfg.emotions)} P_emo prompts; test split: {len(test)} items x {len(cfg.emotions)} = "
        f"{len(test) * len(cfg.emotions)} generations per method." + (" Quick mode." if quick else ""),
        f"Judge: {cfg.judge} ({'the project-owned MiniLM linear probe' if cfg.judge == 'probe' else cfg.judge}); "
        "numbers are not comparable with the paper's GPT-4o-mini judge.",
        "Acceptance filter: " + ("on (paper)." if cfg.accept_filter else
                                 "off (calibrated: the model does not follow 'Always reply in {emotion}', so the "
                                 "filter would leave almost no complete context groups)."),
        *[str(n) for n in cfg.notes])
    paper = Paper2Config.paper().to_dict()
    rows = [{"setting": k, "value": json.dumps(v), "paper": json.dumps(paper.get(k))}
            for k, v in cfg.to_dict().items() if v != paper.get(k) and k != "notes"]
    if rows:
        s.add_table("Settings that differ from the paper's values (calibrated or CPU-sized)", pd.DataFrame(rows))
    times = {p.stem: json.loads(p.read_text()).get("seconds") for p in sorted((store.root / "steps").glob("*.json"))}
    s.add_table("Step runtimes (seconds; steps reused from an earlier run keep their original time)",
                pd.DataFrame([{"step": k, "seconds": v} for k, v in times.items()] +
                             [{"step": "total (this call)", "seconds": round(total, 1)}]))
    secs.append(s)
    # -- elicitation -----------------------------------------------------------------------
    if elicit_ev is not None:
        s = Section("Step 1: emotion elicitation (analysis split)")
        s.add_text(f"Judge acceptance of P_emo replies: {100 * elicit_ev.accuracy:.1f}% (paper on SEV: 98.85%). "
                   f"Complete context groups (all emotions accepted): {stats.n_groups}.")
        emo, val = accuracy_tables({"prompting (analysis)": elicit_ev})
        s.add_table("Acceptance per emotion (%)", emo).add_table("Acceptance per valence (%)", val)
        s.results["elicitation"] = elicit_ev.result(model.name)
        secs.append(s)
    # -- directions --------------------------------------------------------------------------
    s = Section("Step 2: context-agnostic emotion directions")
    s.add_text(f"Directions from {stats.n_groups} complete context groups (skeleton x valence): group mean over "
               "emotions subtracted, averaged per emotion, L2-normalised; attention state = resid_mid, MLP state = "
               "resid_post" + (" (last layer after the final norm)." if cfg.final_norm else "."))
    for l, pts in sorted(stats.pca.items()):
        s.add_figure(f"PCA of the last-token residual (resid_post) at layer {l} of {L}, coloured by the requested "
                     "emotion", viz.pca_scatter(pts, stats.pca_emotions, title=f"Layer {l}: t* representations"))
    cos = direction_cosines(directions, cfg.emotions[0])
    s.add_figure(f"{2 * L} x {2 * L} cosine similarity of the {cfg.emotions[0]} directions (A = attention, M = MLP "
                 "state, interleaved by layer)", viz.cosine_heatmap(cos, title=f"Direction similarity: "
                                                                       f"{cfg.emotions[0]}"))
    late = min(L - 2, int(round(0.79 * L)))
    v = directions.scores[:, late, 1]
    cm = Result("matrix", v @ v.T, ("row", "col"), {"row": list(cfg.emotions), "col": list(cfg.emotions)}, {},
                {"metric": "cosine", "model": model.name})
    s.add_figure(f"Cross-emotion cosine of the MLP-state directions at layer {late}", viz.cosine_heatmap(
        cm, title=f"Cross-emotion cosine, MLP state, layer {late}"))
    adj = []
    for i, e in enumerate(cfg.emotions):
        c = direction_cosines(directions, e).scores
        within = torch.tensor([float(c[2 * l, 2 * l + 1]) for l in range(L)])
        between = torch.tensor([float(c[2 * l + 1, 2 * l + 2]) for l in range(L - 1)])
        adj.append({"emotion": e, "within-layer attn->mlp": float(within.mean()),
                    "between-layer mlp->attn": float(between.mean()),
                    "off-diagonal mean": float((c.sum() - c.diag().sum()) / (c.numel() - c.shape[0]))})
    s.add_table("Mean adjacent cosines (paper, Llama-3.2-3B: within 0.76-0.78, between 0.80-0.82, off-diagonal "
                "0.23-0.25)", pd.DataFrame(adj).round(3))
    s.results.update(directions=directions, sigma=sig)
    secs.append(s)
    # -- components ----------------------------------------------------------------------------
    s = Section("Step 4: local components (neurons and heads) and their ablation / enhancement")
    s.add_text("Neurons are scored analytically (activation x projection of the neuron's output weights on the "
               "layer's MLP direction: C_mean); heads in closed form from one cached pass (the drop of resid_mid . "
               "v_attn when the head's z is zeroed; equal to the paper's masked passes, see tests and "
               "benchmarks/circuits.py).",
               "Curves (best reading of the paper's §6): zero (ablate) or add scale x dmu_e (enhance) into the top-k "
               "components of one layer, vs k random components of the same layer outside the top-k; the emotion "
               "score is the projection of that layer's state at t* on its direction, under P_emo prompts of the "
               "emotion. Head k stays <= n_heads/2 so random draws exist outside the top-k.")
    s.add_figure("Head scores per emotion (mean drop of resid_mid . v_attn)", viz.heads_heatmap(heads))
    e0 = cfg.emotions[0]
    s.add_figure(f"Top neurons per layer for {e0} (C_mean)",
                 viz.neurons_heatmap(_emotion_slice(neurons, e0), top_k=min(32, model.d_mlp)))
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
            s.add_figure(f"{'Ablation' if mode == 'ablate' else 'Enhancement'} of {kind}s at layer {layer[1:]}: "
                         "change of the emotion score vs k (95% bootstrap CIs)",
                         viz.curves(series, title=f"{mode} {kind}s, layer {layer[1:]}", x_title="k",
                                    y_title="change of projection on v_e"))
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
    secs.append(s)
    # -- influence -----------------------------------------------------------------------------
    s = Section("Step 6: sublayer causal influence")
    s.add_text(f"sigma-scaled pulses (alpha in {list(cfg.influence_alphas)}) along the sign-aligned local direction, "
               "injected into each sublayer's output at t* under P_neu; I = change of the final state's projection on "
               f"v_ref per unit dose (v_ref from layers {cfg.layers(cfg.ref_layers_frac, L)}).")
    s.add_figure("Sublayer influence per emotion", viz.sublayer_influence(influence))
    s.add_figure("sigma: mean RMS of each sublayer state at t*", viz.sublayer_influence(sig, title="sigma per layer"))
    s.results["influence"] = influence
    secs.append(s)
    # -- circuits ------------------------------------------------------------------------------
    s = Section("Step 7: global emotion circuits")
    c0 = next(iter(circuits.values()))
    s.add_text(f"Budget {c0.alloc.get('K_total')} components per emotion ({c0.alloc.get('K_mlp')} neurons + "
               f"{c0.alloc.get('K_attn')} heads; paper: 560 = 392 + 168 for 28 layers), minimum "
               f"{c0.alloc.get('min_mlp')} neurons / {c0.alloc.get('min_attn')} heads per layer, per-layer cap "
               f"{cfg.cap_ratio} of each kind's budget, allocated by positive sublayer influence.")
    alloc = stack_results([c.allocation() for c in circuits.values()], "emotion", list(circuits))
    s.add_figure("Circuit allocation per layer", viz.circuit_allocation(alloc))
    on, oh = circuit_overlap(list(circuits.values()))
    off = ~torch.eye(len(circuits), dtype=torch.bool)
    s.add_text(f"Mean pairwise Jaccard overlap: neurons {float(on.scores[off].mean()):.3f}, heads "
               f"{float(oh.scores[off].mean()):.3f} (paper: 0.056 and 0.454).")
    s.add_figure("Neuron overlap between emotion circuits (Jaccard)", viz.cosine_heatmap(on, title="Neuron overlap"))
    s.add_figure("Head overlap between emotion circuits (Jaccard)", viz.cosine_heatmap(oh, title="Head overlap"))
    s.results["circuit_allocation"] = alloc
    secs.append(s)
    # -- control ---------------------------------------------------------------------------
    s = Section("Step 8: emotion control - prompting vs steering vs circuit modulation")
    emo_t, val_t = accuracy_tables(evals)
    sl = cfg.layers(cfg.steer_layers_frac, L)
    s.add_text(f"Test split, judge = {cfg.judge}. Prompting: P_emo, no intervention. Steering: P_neu + "
               f"{cfg.steer_alpha:g} x RMS x v_mlp at resid_post of layers {sl[0]}-{sl[-1]} (t* and every generated "
               f"token). Circuit: P_neu + scale x dmu_e into the circuit's neurons (t* and generated tokens) and heads "
               f"(every position), scale {cfg.circuit_scale:g}" +
               (f" (overrides {cfg.scale_overrides})" if cfg.scale_overrides else "") + ".",
               "Paper (Llama-3.2-3B, GPT-4o-mini judge): prompting 98.96%, steering 91.22%, circuit 99.65%.")
    s.add_table("Accuracy per emotion (%)", emo_t).add_table("Accuracy per valence (%)", val_t)
    for name, ev in evals.items():
        s.results[f"accuracy_{name}"] = ev.result(model.name)
    if calib_table is not None:
        s.add_table("Calibration sweep on the analysis split (accuracy, perplexity under the unsteered model, "
                    "distinct-2)", calib_table.round(4))
    s.add_text(f"Example input: {ex_info['input']!r}", f"Unsteered reply (P_neu): {ex_info['unsteered']!r}")
    s.add_table("Example replies for one input under all six emotions", examples)
    secs.append(s)
    return secs


# =========================================================================================
# CLI
# =========================================================================================
def add_circuit_args(p) -> None:
    """Options of ``emolens circuit``."""
    p.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m-instruct; on a GPU e.g. "
                   "meta-llama/Llama-3.2-3B-Instruct or Qwen/Qwen2.5-7B-Instruct)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs", help="folder that holds run folders")
    p.add_argument("--name", default=None, help="run folder name (default: timestamp)")
    p.add_argument("--overwrite", action="store_true", help="reuse an existing run folder (finished steps resume)")
    p.add_argument("--quick", action="store_true", help="small data, few tokens (a few minutes on CPU)")
    p.add_argument("--paper", action="store_true", help="use the paper's hyperparameters (no calibration)")
    p.add_argument("--config", default=None, help="JSON file of Paper2Config fields to override")
    p.add_argument("--judge", choices=("probe", "nrc", "openai"), default=None)
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint for --judge openai")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--calibrate", action="store_true", help="sweep steering alpha and circuit scale first")
    p.add_argument("--no-progress", action="store_true")


def circuit_cli(args) -> int:
    """``emolens circuit``: run the paper-2 pipeline and write a report into a run folder."""
    import argparse

    import emolens
    from .. import report

    if hasattr(args, "rest"):  # delegated from emolens.cli with the options unparsed
        p = argparse.ArgumentParser(prog="emolens circuit", description="Emotion circuits (paper 2).")
        add_circuit_args(p)
        rest = [a for i, a in enumerate(args.rest or []) if not (i == 0 and a == "--")]
        if getattr(args, "model", None):
            rest = ["--model", args.model] + rest
        if getattr(args, "device", None):
            rest = ["--device", args.device] + rest
        args = p.parse_args(rest)
    m = emolens.load_model(args.model, device=args.device)
    cfg = Paper2Config.paper() if args.paper else Paper2Config.for_model(m)
    if args.config:
        try:
            over = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"Cannot read --config {args.config}: {e}") from None
        if not isinstance(over, dict):
            raise InputError(f"--config {args.config} must hold a JSON object of Paper2Config fields.")
        cfg = Paper2Config.from_dict({**cfg.to_dict(), **over})
    if args.judge:
        cfg = cfg.replace(judge=args.judge)
    if args.judge_url:
        cfg = cfg.replace(judge_url=args.judge_url)
    if args.judge_model:
        cfg = cfg.replace(judge_model=args.judge_model)
    if args.calibrate:
        cfg = cfg.replace(calibrate=True)
    run_dir = report.new_run_dir(args.out, args.name, overwrite=args.overwrite) if not (
        args.overwrite and args.name and (Path(args.out) / args.name).exists()) else Path(args.out) / args.name
    t0 = time.time()
    print(f"emolens circuit -> {run_dir}", flush=True)
    secs = run(m, run_dir, quick=args.quick, progress=not args.no_progress, config=cfg)
    meta = report.run_metadata(m, {"quick": args.quick, "config": cfg.to_dict()}, command="emolens circuit",
                               elapsed_s=round(time.time() - t0, 1))
    path = report.write_report([report.model_info_section(m)] + secs, run_dir, title=f"emolens: emotion circuits on "
                               f"{m.name}", meta=meta, model_info=m.info())
    print(f"report: {Path(path).resolve()}")
    return 0
