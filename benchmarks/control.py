"""Acceptance benchmark for emotion control (issue 10): prompting, steering, circuit modulation and
generalising variants, on a SEV-format test file, judged by an ensemble of independent judges,
each with a side-effect card.

    python benchmarks/control.py [--test PATH] [--judge-url http://127.0.0.1:8000/v1 --judge-model M]

Protocol (fixed before any run):
1. Analysis (``--analysis``, default the project's analysis split): streaming statistics over
   P_emo prompts of ``--stats-records`` records (all valences) -> directions, difference vectors,
   component scores, sublayer influence, circuits (paper 2 steps 2-7, library functions of
   emolens.circuits); story directions (Sofroniew-style, :mod:`emolens.circuits.control`).
2. Calibration on *other* analysis records (``--calib-records``, neutral valence): each method's
   strength is swept and chosen by :func:`emolens.evaluate.side_effects.select_operating_point`:
   highest majority-vote accuracy subject to the guards (perplexity ratio <= 4, restatement <= 20 %,
   emotion-name rate <= 30 %, retention drop <= 10 points on ``--calib-retention`` retention questions).
3. Test (``--test``, default the project's test split; neutral valence): every method once, at its
   chosen point; judges: NRC lexicon, NADE, MiniLM probe (+ an OpenAI-compatible LLM judge when
   ``--judge-url`` is given); majority vote; Wilson 95 % intervals; side-effect cards with all 50
   retention questions.
4. The RESULT line's ``variant`` is chosen on calibration too: the generalising variant with the highest
   calibration accuracy at a point that passes every guard there (never the test split's best row).
   ``judge_kappa`` is the best pair's Cohen's kappa on the test replies, ``judge_kappa_lo`` its 95 %
   bootstrap lower bound.

``circuit_mix`` has no grid of its own: for each emotion it takes the payload family (``--mix-families``, default
:data:`MIX_FAMILIES`: P_emo's payload, the blend, the story payload, and ``circuit_focus``) and
scale whose calibration row is most accurate on that emotion's replies
under that emotion's own card (retention: every calibration question asked under that emotion's intervention),
by the same guarded rule (:func:`emolens.circuits.control.per_emotion_mix`). Its in-sample calibration accuracy is a
maximum over candidates, so it is left out of the ``variant`` choice; the RESULT line adds ``mix_acc`` and
``mix_passes`` (1 when its test card passes every guard).

``circuit_focus`` is the story payload on each emotion's ``--focus-heads``
circuit heads of largest payload norm (:func:`emolens.circuits.control.focused_heads`), at t* and the reply, no
neurons; it can also be a ``circuit_mix`` family.

``--test-skip N`` tests on the records after the first N (a second, unseen part of the test file);
``--methods`` runs a subset of the swept methods (prompting and the unsteered model always run).

All prompts use one neutral system prompt (``--system``; default a conversational one: under the
paper's "Keep the reply to at most two sentences." SmolLM2-135M restates/edits the user's text in
~80 % of unsteered replies, which no control method can then fix). ``--paper-prompt`` uses the
paper's. The last line is the RESULT line. Intermediate results are cached under ``--out`` keyed by
the configuration, so a rerun with the same configuration resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (threads, offline env)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

EMOS = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")
CHAT_SYSTEM = ("You are talking with a friend who tells you what happened to them. "
               "Respond to them in at most two sentences.")
PAPER_SYSTEM = "Keep the reply to at most two sentences."
#: circuit_blend: P_emo's payload + BLEND_WEIGHT x the story payload (fixed before its calibration sweep; part of
#: the cache keys, so changing it recomputes the blend's rows)
BLEND_WEIGHT = 0.5
#: the generalising variants compared with the paper-faithful reference circuit (issue 10, item 3)
VARIANTS = ("circuit_reply", "circuit_noname", "circuit_story", "circuit_story_reply", "story_steer", "circuit_blend",
            "circuit_va", "circuit_mix", "circuit_focus")
#: ``--methods`` default: every variant
DEFAULT_METHODS = ("steering", "circuit") + VARIANTS
#: circuit_focus: the story payload on the FOCUS_HEADS circuit heads of largest payload norm, at t* and the reply
#: (``focused_heads``); 60 and the scale grid came from calibration-split fear exploration (analysis records only)
FOCUS_HEADS = 60
#: circuit_mix: each emotion's payload family and scale chosen on calibration among these rows (ties: this order).
#: Since 2026-12-04: circuit_focus replaces circuit_story_reply (which lost on sev_confirm3 and sev_confirm4), after the
#: focus mix passed its pre-registered test on sev_confirm5 + sev_confirm6 (benchmarks/RESULTS.md, section control)
MIX_FAMILIES = ("circuit", "circuit_blend", "circuit_story", "circuit_focus")


#: the methods with a strength sweep (``--methods``); circuit_mix has none of its own
SWEPT = ("steering", "circuit") + tuple(v for v in VARIANTS if v != "circuit_mix")


def check_methods(methods: str, mix_families: str) -> tuple[list[str], bool, tuple[str, ...]]:
    """``(swept methods, circuit_mix asked for, its families)`` from the two comma lists; SystemExit naming the fix."""
    wanted = [m.strip() for m in methods.split(",") if m.strip()]
    mix = "circuit_mix" in wanted  # no grid of its own: per emotion, one of the mix_families rows
    fams = tuple(m.strip() for m in mix_families.split(",") if m.strip())
    wanted = [m for m in wanted if m != "circuit_mix"]
    unknown = sorted(set(wanted) - set(SWEPT))
    if unknown or not {"steering", "circuit"} <= set(wanted):
        raise SystemExit(f"--methods: unknown {unknown} (valid: {sorted(SWEPT)} and circuit_mix); steering and "
                         "circuit are required")
    if mix and (not fams or not set(fams) <= set(wanted)):
        raise SystemExit(f"--mix-families {mix_families}: circuit_mix chooses among rows of --methods; list them "
                         f"there too (default families: {','.join(MIX_FAMILIES)})")
    return wanted, mix, fams


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def round_robin(records, n):
    by = {}
    for r in records:
        by.setdefault(r["theme"], []).append(r)
    out = []
    while any(by.values()) and len(out) < n:
        for t in list(by):
            if by[t] and len(out) < n:
                out.append(by[t].pop(0))
    return out


class Cache:
    def __init__(self, root: Path, cfg: dict):
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = root / h
        self.dir.mkdir(parents=True, exist_ok=True)
        from emolens.io import write_json
        write_json(self.dir / "config.json", cfg)

    def get(self, name):
        p = self.dir / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, name, obj):
        from emolens.io import write_json
        write_json(self.dir / f"{name}.json", obj)
        return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--test", default=None, help="SEV-format test JSONL (default: emolens/data/sev_test.jsonl)")
    ap.add_argument("--analysis", default=None, help="SEV-format analysis JSONL (default: sev_analysis.jsonl)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--test-records", type=int, default=8)
    ap.add_argument("--test-skip", type=int, default=0,
                    help="skip the first N test records (round-robin over themes): a second, unseen test set")
    ap.add_argument("--valence", default="neutral")
    ap.add_argument("--stats-records", type=int, default=12)
    ap.add_argument("--influence-samples", type=int, default=8)
    ap.add_argument("--calib-records", type=int, default=12,
                    help="analysis records for calibration (neutral valence: 12 records = 72 replies per value, 12 "
                         "per emotion for circuit_mix's per-emotion cards)")
    ap.add_argument("--calib-start", type=int, default=None,
                    help="first analysis record (round-robin order) of the calibration block (default: "
                         "--stats-records); the statistics use the first --stats-records records outside the block, "
                         "so a larger --stats-records with --calib-start 12 keeps the default calibration records")
    ap.add_argument("--calib-retention", type=int, default=50,
                    help="retention questions used in calibration (spread over the 50; at 50 one question is 2 "
                         "points)")
    ap.add_argument("--calib-only", action="store_true", help="stop after the calibration table (analysis data only)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--budget", type=float, default=10.0, help="circuit budget per sublayer (paper: 10)")
    ap.add_argument("--min-neurons", type=int, default=4)
    ap.add_argument("--min-heads", type=int, default=2)
    ap.add_argument("--gen-batch", type=int, default=48)
    ap.add_argument("--steer-alphas", default="1,2")
    ap.add_argument("--circuit-scales", default="2,4")
    ap.add_argument("--reply-scales", default="2,3,4")
    ap.add_argument("--noname-scales", default="2,4,6")
    ap.add_argument("--story-circuit-scales", default="2,3,4")
    ap.add_argument("--story-reply-scales", default="2,3,4")
    ap.add_argument("--story-alphas", default="1")
    ap.add_argument("--blend-scales", default="1.5,1.75,2,2.5",
                    help="circuit_blend scales (P_emo payload x s + story payload x s x BLEND_WEIGHT)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="swept methods to calibrate and test (prompting and the unsteered model always run; "
                         "steering and circuit are required)")
    ap.add_argument("--mix-families", default=",".join(MIX_FAMILIES),
                    help="rows circuit_mix chooses among, per emotion (ties: this order); each must be in --methods")
    ap.add_argument("--focus-scales", default="3,3.5,4",
                    help="circuit_focus scales (the story payload on --focus-heads circuit heads, t* and reply)")
    ap.add_argument("--focus-heads", type=int, default=FOCUS_HEADS,
                    help="circuit_focus: the circuit heads of largest story-payload norm kept per emotion")
    ap.add_argument("--va-scales", default="2,3,4",
                    help="circuit_va scales (the blend payload restricted to its valence-arousal plane)")
    ap.add_argument("--system", default=CHAT_SYSTEM)
    ap.add_argument("--paper-prompt", action="store_true", help="use the paper's neutral system prompt")
    ap.add_argument("--judge-url", default=None)
    ap.add_argument("--judge-model", default="gpt-4o-mini")
    ap.add_argument("--judge-eval", default=None, help="labelled held-out sentences (text, emotion; JSONL/CSV/parquet "
                    "or a datasets folder) the judges' accuracy is measured on (default: "
                    "emolens/data/judge_eval.jsonl)")
    ap.add_argument("--out", default=os.environ.get("EMOLENS_BENCH_OUT", "/tmp/emolens-bench-control"))
    args = ap.parse_args(argv)
    t_all = time.time()
    wanted, mix, mix_families = check_methods(args.methods, args.mix_families)  # bad lists fail in seconds
    if args.focus_heads < 1:
        raise SystemExit(f"--focus-heads {args.focus_heads}: pass a positive number of heads")

    import emolens
    from emolens.circuits.assembly import assemble_circuit
    from emolens.circuits.components import head_scores_from_stats, neuron_scores_from_stats
    from emolens.circuits.control import (MENTION_TEMPLATE, blend_payloads, focused_heads, generate_with, load_stories,
                                          VA_COORDS, name_confound_removed, per_emotion_choice, per_emotion_mix,
                                          reply_modulation_interventions, story_directions, text_difference_vectors,
                                          valence_arousal_axes, valence_arousal_payload)
    from emolens.circuits.directions import collect_sev_stats, difference_vectors, emotion_directions
    from emolens.circuits.influence import layers_from_fraction, sigma, sublayer_influence
    from emolens.circuits.modulation import modulation_interventions
    from emolens.circuits.prompts import emo_prompts, neu_prompts, sev_items
    from emolens.circuits.steer import steering_interventions
    from emolens.datasets import load_sev
    from emolens.evaluate import NADEJudge, NRCJudge, OpenAIJudge, ProbeJudge, corpus_perplexity, evaluate_judge
    from emolens.evaluate.agreement import JudgeEnsemble, accuracy_table, intervals_overlap, wilson_interval
    from emolens.evaluate.side_effects import (Guards, card_table, load_retention_qa, retention_accuracy,
                                               select_operating_point, side_effect_card)
    from emolens.results import Result, stack_results

    system = PAPER_SYSTEM if args.paper_prompt else args.system
    system_emo = "Always reply in {emotion}.\n" + system
    guards = Guards()
    gen_kw = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": 8, "repetition_penalty": 1.1,
              "no_repeat_ngram_size": 3}
    qa_kw = {"max_new_tokens": 12, "repetition_penalty": 1.1, "no_repeat_ngram_size": 3}
    # the test cache: its entries are keyed by method and strength, so an extended sweep reuses them
    sweep_args = ("steer_alphas", "circuit_scales", "reply_scales", "noname_scales", "story_circuit_scales",
                  "story_reply_scales", "story_alphas", "blend_scales", "va_scales", "focus_scales")
    cfg = {k: v for k, v in vars(args).items()
           if k not in ("out", "judge_url", "judge_model", "calib_only", "methods", "mix_families") + sweep_args}
    if not cfg["test_skip"]:
        cfg.pop("test_skip")  # keeps the cache keys of runs made before the option existed
    if cfg["calib_start"] is None:
        cfg.pop("calib_start")  # likewise
    if cfg["focus_heads"] == FOCUS_HEADS:
        cfg.pop("focus_heads")  # likewise
    cfg.update(system_used=system, gen_kw=gen_kw, guards=guards.to_dict(), blend_weight=BLEND_WEIGHT, v=3)
    cache = Cache(Path(args.out), cfg)
    # the analysis step depends only on these: reruns with other sweeps or test files reuse it
    akeys = ("analysis", "model", "stats_records", "influence_samples", "valence", "budget", "min_neurons",
             "min_heads")
    akeys += ("calib_start",) if "calib_start" in cfg else ()  # it moves the statistics records too
    acache = Cache(Path(args.out) / "analysis", {**{k: cfg[k] for k in akeys}, "system_used": system, "v": 2})
    # calibration rows are keyed by (method, value) inside: a changed sweep grid reuses the rows it shares
    ckeys = akeys + ("calib_records", "calib_retention", "max_new_tokens", "gen_batch")
    ckeys += ("focus_heads",) if "focus_heads" in cfg else ()  # circuit_focus's calibration rows depend on it
    ccache = Cache(Path(args.out) / "calibration", {**{k: cfg[k] for k in ckeys}, "system_used": system,
                                                    "gen_kw": gen_kw, "blend_weight": BLEND_WEIGHT, "v": 2})
    log("cache", cache.dir, "analysis cache", acache.dir, "calibration cache", ccache.dir)

    analysis_recs = list(load_sev(args.analysis) if args.analysis else load_sev(split="analysis"))
    test_recs = list(load_sev(args.test) if args.test else load_sev(split="test"))
    rr = round_robin(analysis_recs, len(analysis_recs))
    cs = args.stats_records if args.calib_start is None else args.calib_start
    calib_rr = rr[cs:cs + args.calib_records]
    stats_rr = (rr[:cs] + rr[cs + args.calib_records:])[:args.stats_records]
    if cs < 0 or len(calib_rr) < args.calib_records or len(stats_rr) < args.stats_records:
        raise SystemExit(f"--stats-records {args.stats_records} --calib-records {args.calib_records} --calib-start "
                         f"{cs}: the analysis file has only {len(analysis_recs)} records; pass smaller values or a "
                         "larger --analysis file")
    stats_items = sev_items(stats_rr)
    calib_items = sev_items(calib_rr, [args.valence])
    test_rr = round_robin(test_recs, args.test_skip + args.test_records)[args.test_skip:]
    if len(test_rr) < args.test_records:
        raise SystemExit(f"--test-skip {args.test_skip} --test-records {args.test_records}: the test file has only "
                         f"{len(test_recs)} records")
    test_items = sev_items(test_rr, [args.valence])
    test_keys = {(it.scenario, it.event) for it in test_items}
    assert not test_keys & {(it.scenario, it.event) for it in stats_items + calib_items}, "test overlaps analysis"

    model = emolens.load_model(args.model)  # after the data checks, so bad input fails in seconds
    L = model.n_layers

    # ---------------------------------------------------------------- judges
    judges = {"nrc": NRCJudge(), "nade": NADEJudge(), "probe": ProbeJudge()}
    if args.judge_url:
        judges["llm"] = OpenAIJudge(args.judge_url, args.judge_model)
    ens = JudgeEnsemble(judges)
    judge_rows = []
    for name, j in judges.items():
        acc, conf = evaluate_judge(j, args.judge_eval)  # default: the project's held-out set, disjoint from SEV
        judge_rows.append({"judge": name, "acc": acc, "n": conf.attrs["n"],
                           **{e: conf.attrs["per_emotion_accuracy"].get(e, float("nan")) for e in EMOS}})
    # the majority vote itself on the same labelled texts: the ceiling of the control accuracies below (a reply
    # that shows the emotion as clearly as a labelled sentence is matched this often)
    from emolens.datasets import load_judge_labelled
    ds = load_judge_labelled(args.judge_eval, split="eval", emotions=list(EMOS))
    mv = ens.judge(list(ds["text"]), list(ds["emotion"]))
    judge_rows.append({"judge": "majority", "acc": float(mv["majority"].mean()), "n": len(mv),
                       **{e: float(mv.loc[mv.target == e, "majority"].mean()) for e in EMOS}})
    judge_set = args.judge_eval or "judge_eval.jsonl"
    log(f"judge accuracy on {judge_set}:\n" + pd.DataFrame(judge_rows).round(3).to_string(index=False))

    # ---------------------------------------------------------------- analysis
    adir = acache.dir
    if (adir / "done").is_file():
        directions = Result.load(adir / "directions")
        dmu_mlp, dmu_attn = Result.load(adir / "dmu_mlp"), Result.load(adir / "dmu_attn")
        story = Result.load(adir / "story")
        nn_mlp, nn_attn = Result.load(adir / "nn_mlp"), Result.load(adir / "nn_attn")
        st_mlp, st_attn = Result.load(adir / "st_mlp"), Result.load(adir / "st_attn")
        from emolens.circuits.assembly import Circuit
        circuits = {e: Circuit.load(adir / f"circuit_{e}.json", model=model) for e in EMOS}
        log("analysis: cached")
    else:
        t0 = time.time()
        ps = emo_prompts(stats_items, EMOS, system_emo)
        stats = collect_sev_stats(model, ps, emotions=EMOS, batch_size=16, progress=False)
        directions = emotion_directions(stats)
        dmu_mlp, dmu_attn = difference_vectors(stats)
        sig = sigma(stats)
        log(f"stats: {len(ps)} P_emo prompts, {time.time() - t0:.0f}s")
        neurons = stack_results([neuron_scores_from_stats(model, stats, directions, e) for e in EMOS], "emotion",
                                list(EMOS))
        heads = stack_results([head_scores_from_stats(model, stats, directions, e) for e in EMOS], "emotion",
                              list(EMOS))
        inf_items = [it for it in stats_items if it.valence == args.valence][:args.influence_samples]
        inf = sublayer_influence(model, neu_prompts(inf_items, None, system).prompts, directions, sig, list(EMOS),
                                 alphas=(0.3, 0.7), ref_layers=layers_from_fraction(L, (0.75, 0.9)))
        circuits = {}
        for i, e in enumerate(EMOS):
            sl = lambda r: Result(r.kind, r.scores[i], r.axes[1:], {k: v for k, v in r.labels.items()  # noqa: E731
                                                                     if k != "emotion"}, {}, dict(r.meta))
            circuits[e] = assemble_circuit(model, e, inf[e], sl(neurons), sl(heads), budget_per_sublayer=args.budget,
                                           min_neurons=args.min_neurons, min_heads=args.min_heads)
        neutral = neu_prompts([it for it in stats_items if it.valence == args.valence], None, system).prompts
        story = story_directions(model, neutral, emotions=EMOS)
        # lexical control: the same prompts naming the emotion without asking for it
        t1 = time.time()
        mstats = collect_sev_stats(model, emo_prompts(stats_items, EMOS, MENTION_TEMPLATE + system), emotions=EMOS,
                                   batch_size=16, progress=False)
        m_mlp, m_attn = difference_vectors(mstats)
        nn_mlp, nn_attn = name_confound_removed(dmu_mlp, m_mlp), name_confound_removed(dmu_attn, m_attn)
        st = load_stories()
        st_mlp, st_attn = text_difference_vectors(model, [t for t, _ in st], [e for _, e in st], emotions=EMOS)
        log(f"mention stats + story payloads: {time.time() - t1:.0f}s")
        adir.mkdir(exist_ok=True)
        for name, r in (("directions", directions), ("dmu_mlp", dmu_mlp), ("dmu_attn", dmu_attn), ("story", story),
                        ("nn_mlp", nn_mlp), ("nn_attn", nn_attn), ("st_mlp", st_mlp), ("st_attn", st_attn)):
            r.save(adir / name)
        for e, c in circuits.items():
            c.save(adir / f"circuit_{e}.json")
        (adir / "done").write_text("ok")
        log(f"analysis done in {time.time() - t0:.0f}s; circuit sizes",
            {e: (c.n_neurons, c.n_heads) for e, c in circuits.items()},
            "confound PCs per layer", story.meta["n_confound"])

    steer_layers = layers_from_fraction(L, (0.39, 0.72))
    bl_mlp, bl_attn = blend_payloads(dmu_mlp, st_mlp, BLEND_WEIGHT), blend_payloads(dmu_attn, st_attn, BLEND_WEIGHT)
    # two-axis control: the blend payload fitted as b + v V + a A over the six emotions' coordinates, read back at each
    # emotion's (v, a) (what a valence-arousal control can express of each emotion)
    va = {e: VA_COORDS[e] for e in EMOS}
    va_mlp = valence_arousal_payload(valence_arousal_axes(bl_mlp, va), va)
    va_attn = valence_arousal_payload(valence_arousal_axes(bl_attn, va), va)
    focused = {e: focused_heads(circuits[e], st_attn, args.focus_heads) for e in EMOS}
    methods = {
        "steering": lambda a: (lambda e: steering_interventions(model, directions, e, steer_layers, a)),
        "circuit": lambda s: (lambda e: modulation_interventions(model, circuits[e], dmu_mlp, dmu_attn, s)),
        "circuit_reply": lambda s: (lambda e: reply_modulation_interventions(model, circuits[e], dmu_mlp, dmu_attn,
                                                                             s)),
        "circuit_noname": lambda s: (lambda e: modulation_interventions(model, circuits[e], nn_mlp, nn_attn, s)),
        "circuit_story": lambda s: (lambda e: modulation_interventions(model, circuits[e], st_mlp, st_attn, s)),
        "circuit_story_reply": lambda s: (lambda e: reply_modulation_interventions(model, circuits[e], st_mlp, st_attn,
                                                                                   s)),
        "story_steer": lambda a: (lambda e: steering_interventions(model, story, e, steer_layers, a)),
        "circuit_blend": lambda s: (lambda e: modulation_interventions(model, circuits[e], bl_mlp, bl_attn, s)),
        "circuit_va": lambda s: (lambda e: modulation_interventions(model, circuits[e], va_mlp, va_attn, s)),
        "circuit_focus": lambda s: (lambda e: reply_modulation_interventions(model, focused[e], st_mlp, st_attn, s)),
    }
    sweeps = {"steering": args.steer_alphas, "circuit": args.circuit_scales, "circuit_reply": args.reply_scales,
              "circuit_noname": args.noname_scales, "circuit_story": args.story_circuit_scales,
              "circuit_story_reply": args.story_reply_scales,
              "story_steer": args.story_alphas, "circuit_blend": args.blend_scales, "circuit_va": args.va_scales,
              "circuit_focus": args.focus_scales}
    assert set(sweeps) == set(SWEPT)
    sweeps = {k: [float(x) for x in v.split(",")] for k, v in sweeps.items() if k in wanted}
    qa = load_retention_qa()

    def run_method(ps, ivf, emo_prompt_ps=None):
        prompts = emo_prompt_ps.prompts if emo_prompt_ps is not None else ps.prompts
        return generate_with(model, prompts, ps.emotions, interventions_for=ivf, gen_kwargs=gen_kw,
                             batch_size=args.gen_batch)

    def retention(ivf, qs, emo_system=False, emotions=EMOS):
        def gen(questions, emos):
            if emo_system:
                prompts = [[{"role": "system", "content": system_emo.format(emotion=e)},
                            {"role": "user", "content": q}] for q, e in zip(questions, emos)]
            else:
                prompts = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
                           for q in questions]
            return generate_with(model, prompts, emos, interventions_for=ivf, gen_kwargs=qa_kw,
                                 batch_size=args.gen_batch)
        return retention_accuracy(gen, list(emotions), qs)  # question i under emotions[i % len(emotions)]

    def judged(ps, texts):
        df = ens.judge(texts, list(ps.emotions))
        df["user"] = [it.user for it in ps.items]
        return df

    # ---------------------------------------------------------------- calibration (analysis data only)
    cps = neu_prompts(calib_items, EMOS, system)
    users_c = [it.user for it in cps.items]
    step = max(1, len(qa) // max(1, args.calib_retention))
    qa_cal = qa[::step][:args.calib_retention]  # spread over the 50 questions (25: qa[::2])
    cal = ccache.get("calibration") or {}
    t0 = time.time()
    if "base" not in cal:
        base_c = run_method(cps, None)
        cal = {"base": {"texts": base_c, "ppl": corpus_perplexity(model, cps.prompts, base_c),
                        "retention": retention(None, qa_cal)[0]}, "rows": []}
        ccache.put("calibration", cal)  # after every setting: a killed run keeps what it computed
    have = {(r["method"], float(r["value"])) for r in cal["rows"]}
    for m, vals in sweeps.items():
        for v in vals:
            if (m, v) in have:
                continue
            ivf = methods[m](v)
            texts = run_method(cps, ivf)
            ret = retention(ivf, qa_cal)[0]
            cal["rows"].append({"method": m, "value": v, "texts": texts,
                                "ppl": corpus_perplexity(model, cps.prompts, texts), "retention": ret})
            ccache.put("calibration", cal)
            log(f"calib {m} {v:g}: done")
    order = {(m, v): i for i, (m, vals) in enumerate(sweeps.items()) for v in vals}  # table order = sweep order
    cal["rows"] = sorted((r for r in cal["rows"] if (r["method"], float(r["value"])) in order),
                         key=lambda r: order[(r["method"], float(r["value"]))])
    log(f"calibration generated in {time.time() - t0:.0f}s")
    base_ppl_c = cal["base"]["ppl"]
    per_emotion_methods = [m for m in ("circuit", "circuit_blend") if m in sweeps]
    calib_table, chosen, per_emotion_rows = [], {}, {m: {e: [] for e in EMOS} for m in per_emotion_methods}
    base_df = judged(cps, cal["base"]["texts"])
    calib_table.append({"method": "none", "value": 0, "accuracy": base_df["majority"].mean(),
                        **card_table([side_effect_card("none", users_c, cal["base"]["texts"], list(cps.emotions),
                                                       ppl=base_ppl_c, ppl_base=base_ppl_c)]).iloc[0].to_dict()})
    by_method, cal_dfs = {}, {}
    for r in cal["rows"]:
        df = cal_dfs[(r["method"], float(r["value"]))] = judged(cps, r["texts"])
        card = side_effect_card(r["method"], users_c, r["texts"], list(cps.emotions), ppl=r["ppl"],
                                ppl_base=base_ppl_c, retention=r["retention"], retention_base=cal["base"]["retention"])
        row = {"method": r["method"], "value": r["value"], "accuracy": float(df["majority"].mean()), "card": card}
        by_method.setdefault(r["method"], []).append(row)
        ct = card_table([card], guards).iloc[0].to_dict()
        ct.pop("method")
        calib_table.append({"method": r["method"], "value": r["value"], "accuracy": row["accuracy"], **ct})
        if r["method"] in per_emotion_rows:  # per-emotion cards for the per-emotion-scale variants (ppl and
            for e in EMOS:                     # retention: the row's pooled values, measured over all emotions)
                idx = [i for i, x in enumerate(cps.emotions) if x == e]
                ce = side_effect_card(r["method"], [users_c[i] for i in idx], [r["texts"][i] for i in idx],
                                      [e] * len(idx), ppl=r["ppl"], ppl_base=base_ppl_c, retention=r["retention"],
                                      retention_base=cal["base"]["retention"])
                per_emotion_rows[r["method"]][e].append(
                    {"value": r["value"], "accuracy": float(df["majority"].iloc[idx].mean()), "card": ce})
    for m, rows in by_method.items():
        best = select_operating_point(rows, guards)
        chosen[m] = float(best["value"]) if best is not None else None
    per_scales = {m: per_emotion_choice(per_emotion_rows[m], guards, default=chosen.get(m) or sweeps[m][0])
                  for m in per_emotion_methods}
    mix_choice = None
    if mix:
        # per-emotion cards of every mix_families row: that emotion's replies and their perplexity, and retention with
        # all calibration questions asked under that emotion's intervention (cached: one entry per row and emotion)
        er = ccache.get("emotion_retention") or {}
        t0 = time.time()
        idx_e = {e: [i for i, x in enumerate(cps.emotions) if x == e] for e in EMOS}
        sub = lambda xs, e: [xs[i] for i in idx_e[e]]  # noqa: E731
        for e in EMOS:
            if f"base@{e}" not in er:
                er[f"base@{e}"] = {"ppl": corpus_perplexity(model, sub(cps.prompts, e), sub(cal["base"]["texts"], e))}
        mix_rows = {e: [] for e in EMOS}
        for r in cal["rows"]:
            m, v = r["method"], float(r["value"])
            if m not in mix_families:
                continue
            for e in EMOS:
                key = f"{m}@{v:g}@{e}"
                if key not in er:
                    er[key] = {"ppl": corpus_perplexity(model, sub(cps.prompts, e), sub(r["texts"], e)),
                               "retention": retention(methods[m](v), qa_cal, emotions=[e])[0]}
                    ccache.put("emotion_retention", er)
                card = side_effect_card(m, sub(users_c, e), sub(r["texts"], e), [e] * len(idx_e[e]),
                                        ppl=er[key]["ppl"], ppl_base=er[f"base@{e}"]["ppl"],
                                        retention=er[key]["retention"], retention_base=cal["base"]["retention"])
                mix_rows[e].append({"method": m, "value": v, "card": card,
                                    "accuracy": float(cal_dfs[(m, v)]["majority"].iloc[idx_e[e]].mean())})
        ccache.put("emotion_retention", er)
        fam = {f: i for i, f in enumerate(mix_families)}
        for e in EMOS:  # candidate order = family order (the tie-break after the scale)
            mix_rows[e].sort(key=lambda x: fam[x["method"]])
        fb = "circuit_blend" if "circuit_blend" in mix_families else mix_families[0]  # nothing passes: fall back
        mix_choice = per_emotion_mix(mix_rows, guards, (fb, chosen.get(fb) or sweeps[fb][0]))
        pe_tab = pd.DataFrame([{"emotion": e, "method": x["method"], "value": x["value"],
                                "accuracy": round(100 * x["accuracy"], 1),
                                **{k: v for k, v in card_table([x["card"]], guards).iloc[0].to_dict().items()
                                   if k in ("ppl_ratio", "restate_%", "names_emotion_%", "retention_drop_pts",
                                            "fails")}} for e in EMOS for x in mix_rows[e]])
        log(f"circuit_mix per-emotion cards ({time.time() - t0:.0f}s; retention: {len(qa_cal)} questions under "
            "each emotion's intervention):\n" + pe_tab.to_string(index=False))
        in_sample = np.mean([{(x["method"], x["value"]): x["accuracy"] for x in mix_rows[e]}.get(mix_choice[e], np.nan)
                             for e in EMOS])
        log("circuit_mix choice:", mix_choice, f"in-sample calibration accuracy {100 * in_sample:.1f}% (optimistic: "
            "a maximum over candidates per emotion)")
    # the RESULT line's variant: the generalising variant with the highest calibration accuracy at a point that passes
    # every guard on calibration (chosen on analysis data, never on the test split); the per-emotion variant is left
    # out here because its calibration accuracy is per emotion. If no variant passes, the most accurate one (flagged).
    cal_acc = {m: max(r["accuracy"] for r in rows if float(r["value"]) == chosen[m])
               for m, rows in by_method.items() if chosen.get(m) is not None}
    variant_names = [v for v in VARIANTS if v in sweeps]
    passing_cal = [v for v in variant_names if v in cal_acc]
    calib_best = (max(passing_cal, key=lambda v: cal_acc[v]) if passing_cal else
                  max(variant_names, key=lambda v: max(r["accuracy"] for r in by_method[v])))
    log("variant chosen on calibration:", calib_best, {v: round(cal_acc[v], 3) for v in passing_cal})
    ct = pd.DataFrame(calib_table)
    ct["accuracy"] = (100 * ct["accuracy"]).round(1)
    log("calibration (analysis split, majority vote):\n" + ct.to_string(index=False))
    log("chosen:", chosen, "per-emotion scales:", per_scales, "circuit_mix:", mix_choice)
    if args.calib_only:
        return 0

    # ---------------------------------------------------------------- test
    tps = neu_prompts(test_items, EMOS, system)
    tps_emo = emo_prompts(test_items, EMOS, system_emo)
    users_t = [it.user for it in tps.items]

    def strength(m):  # no passing point: fall back to the weakest swept value, and say so
        return chosen[m] if chosen.get(m) is not None else sweeps[m][0]

    def per_emotion_ivf(m):
        return lambda e: methods[m](per_scales[m][e])(e)

    test_methods = {"unsteered": (None, None), "prompting": (None, "emo")}
    test_strength = {"unsteered": 0, "prompting": 0}
    for m in sweeps:
        test_methods[m] = (methods[m](strength(m)), None)
        test_strength[m] = strength(m)
        if m in per_scales:  # per-emotion scales chosen on calibration, right after the method's row
            test_methods[f"{m}_per_emotion"] = (per_emotion_ivf(m), None)
            same = len(set(per_scales[m].values())) == 1 and next(iter(per_scales[m].values())) == strength(m)
            # every emotion at the pooled value: the same interventions, so the pooled row's replies are reused
            test_strength[f"{m}_per_emotion"] = strength(m) if same else json.dumps(per_scales[m], sort_keys=True)
    if mix:  # each emotion at its own (family, scale)
        test_methods["circuit_mix"] = (lambda e: methods[mix_choice[e][0]](mix_choice[e][1])(e), None)
        test_strength["circuit_mix"] = json.dumps(mix_choice, sort_keys=True)
    stored = cache.get("test") or {}
    res = {}
    for name, (ivf, kind) in test_methods.items():
        pooled = name.removesuffix("_per_emotion")
        key = f"{pooled if test_strength[name] == test_strength[pooled] else name}@{test_strength[name]}"
        if key not in stored:
            t0 = time.time()
            texts = run_method(tps, ivf, tps_emo if kind == "emo" else None)
            ppl = corpus_perplexity(model, tps.prompts, texts)
            ret, ok, _ = retention(ivf, qa, emo_system=(kind == "emo"))
            stored[key] = {"texts": texts, "ppl": ppl, "retention": ret}
            cache.put("test", stored)
            log(f"test {name}: {time.time() - t0:.0f}s")
        res[name] = stored[key]

    frames, cards = {}, []
    base_ppl, base_ret = res["unsteered"]["ppl"], res["unsteered"]["retention"]
    for name in test_methods:
        df = judged(tps, res[name]["texts"])
        df["method"] = name
        frames[name] = df
        cards.append(side_effect_card(name, users_t, res[name]["texts"], list(tps.emotions), ppl=res[name]["ppl"],
                                      ppl_base=base_ppl, retention=res[name]["retention"], retention_base=base_ret))
    allf = pd.concat(frames.values(), ignore_index=True)
    ag = ens.agreement(allf)
    judge_cols = [f"{n}_match" for n in ens.names] + ["majority"]

    # ---------------------------------------------------------------- report
    print(f"\n## Judges on the labelled held-out set ({judge_set}, n = {judge_rows[0]['n']})")
    jt = pd.DataFrame(judge_rows)
    jt[["acc", *EMOS]] = (100 * jt[["acc", *EMOS]]).round(1)
    print(jt.to_string(index=False))
    print(f"\n## Test accuracy (%, {args.valence} valence, {len(test_items)} scenarios x 6 emotions; "
          "Wilson 95 % CI)")
    rows = []
    for name, df in frames.items():
        t = accuracy_table(df, judge_cols, by=None)
        r = {"method": name, "n": len(df)}
        for _, x in t.iterrows():
            r[x.judge] = f"{100 * x.acc:.1f} [{100 * x.lo:.0f}, {100 * x.hi:.0f}]"
        rows.append(r)
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"\n## Per-emotion majority-vote accuracy (%, n per cell = {len(test_items)})")
    pe = []
    for name, df in frames.items():
        t = accuracy_table(df, ["majority"], by="target")
        pe.append({"method": name, **{x.group: f"{100 * x.acc:.0f} [{100 * x.lo:.0f},{100 * x.hi:.0f}]"
                                      for _, x in t.iterrows()}})
    print(pd.DataFrame(pe).to_string(index=False))
    print("\n## Judge agreement on all test replies (n = %d)" % len(allf))
    print(ag["pairs"].round(3).to_string(index=False))
    print(f"Fleiss kappa (match): {ag['fleiss_match']:.3f}")
    print("\n## Side-effect cards (test; perplexity under the unsteered model; retention on 50 questions)")
    print(card_table(cards, guards).to_string(index=False))
    print("\n## Operating points (chosen on the analysis split by the guarded rule)")
    print(json.dumps({"chosen": chosen, "per_emotion_scales": per_scales, "circuit_mix": mix_choice}))
    print("\n## Example replies (first test scenario)")
    first = tps.items[0].user
    print("USER:", first.replace("\n", " / "))
    for name, df in frames.items():
        for e in EMOS:
            txt = df[(df.user == first) & (df.target == e)]["text"].iloc[0]
            print(f"  [{name} -> {e}] {txt.replace(chr(10), ' ')[:160]}")

    acc = {n: float(frames[n]["majority"].mean()) for n in frames}
    ci = {n: wilson_interval(int(frames[n]["majority"].sum()), len(frames[n])) for n in frames}
    card_by = {c.method: c for c in cards}
    best_v = calib_best
    sep = {m: not intervals_overlap(ci[best_v], ci[m]) for m in ("steering", "prompting")}
    print(f"\nvariant chosen on calibration: {best_v} ({'passes' if card_by[best_v].passes(guards) else 'FAILS'} "
          f"the guards on the test card); CI separated from steering: {sep['steering']}, "
          f"from prompting: {sep['prompting']}")
    print(f"total time {time.time() - t_all:.0f}s")
    c = card_by["circuit"]
    v = card_by[best_v]
    top = ag["pairs"].loc[ag["pairs"]["kappa"].idxmax()]  # the pair behind judge_kappa, with its bootstrap interval
    print(f"RESULT circuit_acc={acc['circuit']:.3f} steer_acc={acc['steering']:.3f} prompt_acc={acc['prompting']:.3f} "
          f"judge_kappa={ag['max_pair_kappa']:.3f} judge_kappa_lo={top['kappa_lo']:.3f} "
          f"judge_kappa_pair={top['judge_a']}-{top['judge_b']} ppl_ratio_circuit={c.ppl_ratio:.2f} "
          f"restate_rate_circuit={c.restate_rate:.3f} name_rate_circuit={c.name_rate:.3f} "
          f"variant={best_v} variant_acc={acc[best_v]:.3f} ppl_ratio_variant={v.ppl_ratio:.2f} "
          f"restate_rate_variant={v.restate_rate:.3f} name_rate_variant={v.name_rate:.3f} "
          f"retention_drop_variant={v.retention_drop:.3f} majority_on_labelled={judge_rows[-1]['acc']:.3f}"
          + (f" mix_acc={acc['circuit_mix']:.3f} mix_passes={int(card_by['circuit_mix'].passes(guards))}" if mix else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
