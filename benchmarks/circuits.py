"""Paper 2 circuit methods on the embedded model: closed-form head scores and streaming directions.

RESULT head_score_speedup = time(head_scores_masked: the paper's 1 + L*H masked passes)
                            / time(head_scores: closed form, one cached pass)         target >= 100
       head_score_maxdiff = max |closed form - masked| over (layer, head)            target <= 1e-4
       head_score_speedup_best_effort = time(best-effort masked baseline: per layer l one pass of
                            H+1 stacked copies of the batch (copy h+1 has head h zeroed), stopped
                            right after layer l's resid_mid is read at t*, no unembedding)
                            / time(head_scores)                                      target >= 10
       head_score_maxdiff_best_effort = max |closed form - best effort|              target <= 1e-4
       directions_rss_2880_vs_100 = peak RSS of the streaming statistics pass
                            (collect_sev_stats: directions, difference vectors, sigma, neuron and
                            head moments) over 2,880 P_emo prompts / the same over 100 prompts,
                            each in a fresh process                                   target <= 1.10
       directions_growth_mb_100 / directions_growth_mb_2880 = the same peaks minus the RSS right
                            after loading the model (growth over the loaded model, MB)

All three head-score methods run under torch.inference_mode() with frozen weights, interleaved
(each repeat runs every method once), medians of --reps (--literal-reps for the slow paper-literal
one). 2,880 = the paper's 160 scenarios x 3 valences x 6 emotions; the project's SEV files hold 144
records, so the benchmark adds 16 renamed copies of analysis records (distinct skeleton ids).
Raw timings go to benchmarks/results/circuits.json.

Usage: python benchmarks/circuits.py [--head-prompts 2] [--n-large 2880] [--threads N] [--skip-rss]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved, machine, peak_rss_mb, write_json  # noqa: E402


def sev_prompts(n: int):
    """``n`` P_emo prompts (item-major: each context group's six emotions together)."""
    from emolens.circuits import emo_prompts, sev_items
    from emolens.datasets import load_sev

    recs = list(load_sev(split="analysis")) + list(load_sev(split="test"))
    extra = [dict(r, skeleton_id=f"{r['skeleton_id']}-copy") for r in load_sev(split="analysis")]
    recs = recs + extra
    ps = emo_prompts(sev_items(recs))
    if n > len(ps):
        raise SystemExit(f"only {len(ps)} prompts available")
    return ps.subset(range(n))


def head_scores_best_effort(m, prompts, direction):
    """Best-effort masked baseline (same definition as ``head_scores_masked``): for each layer l, ONE
    pass of H+1 stacked copies of the batch (copy 0 plain, copy h+1 with head h of layer l zeroed at
    every position), stopped as soon as layer l's resid_mid at t* is read (no later layers, no
    unembedding). Returns the ``[L, H]`` mean drops."""
    from emolens import Pos, head
    from emolens.attribution import tile_batch
    from emolens.circuits import _model
    from emolens.circuits.components import _as_layer_dirs
    from emolens.interventions import HookPlan, Reader, Zero
    from emolens.sites import Site

    v = _as_layer_dirs(direction, m).double()
    L, H = m.n_layers, m.n_heads
    batch = m.encode(list(prompts), chat=True)
    r = len(batch)
    tb = tile_batch(batch, H + 1)
    out = torch.zeros(L, H, dtype=torch.float64)
    for l in range(L):
        got = {}

        def fn(values, sel, tracker, got=got):
            got["x"] = values[sel]
            raise _model.StopForward

        ivs = [Zero(head(l, h), rows=tuple(range((h + 1) * r, (h + 2) * r))) for h in range(H)]
        plan = HookPlan(m, ivs, [Reader(Site("resid_mid", l), fn, Pos.last())])
        with plan.hooks():
            _model.forward_reads(m, plan, tb)
        proj = (got["x"].double() @ v[l]).view(H + 1, r)
        out[l] = (proj[0][None] - proj[1:]).mean(1)
    return out


def rss_child(n: int, threads: int) -> None:
    import emolens
    from emolens.circuits import collect_sev_stats

    torch.set_num_threads(threads)
    m = emolens.load_model()
    ps = sev_prompts(n)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    stats = collect_sev_stats(m, ps, batch_size=32, progress=False)
    print(json.dumps({"n": n, "peak_rss_mb": peak_rss_mb(), "after_load_mb": base, "seconds": time.perf_counter() - t0,
                      "groups": stats.n_groups}))


def main() -> None:
    import emolens
    from emolens.circuits import (collect_sev_stats, emotion_directions, head_scores, head_scores_masked,
                                  layer_direction)

    ap = argparse.ArgumentParser()
    ap.add_argument("--head-prompts", type=int, default=2, help="prompts for the head-score timing")
    ap.add_argument("--n-large", type=int, default=2880)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=3, help="interleaved repeats (closed form, best effort)")
    ap.add_argument("--literal-reps", type=int, default=3, help="interleaved repeats of the paper-literal baseline "
                    "(minutes each on a 2-core CPU; 0 skips it)")
    ap.add_argument("--skip-rss", action="store_true", help="skip the two fresh-process memory runs")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child is not None:
        rss_child(args.rss_child, args.threads)
        return
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    m = emolens.load_model()
    print(machine())
    # directions from a small set (any unit vectors would do for timing; these are the real ones)
    ps = sev_prompts(36)
    dirs = emotion_directions(collect_sev_stats(m, ps, progress=False))
    v = layer_direction(dirs, "anger", "attn")
    prompts = sev_prompts(6 * args.head_prompts).where("anger").prompts[:args.head_prompts]
    for p in m.hf_model.parameters():
        p.requires_grad_(False)
    res = {}

    def fast():
        res["fast"] = head_scores(m, prompts, v)

    def best():
        res["best"] = head_scores_best_effort(m, prompts, v)

    def literal():
        res["slow"] = head_scores_masked(m, prompts, v)

    with torch.inference_mode():
        t = interleaved({"closed_form": fast, "best_effort": best}, repeat=args.reps, tag="head_scores_")
        if args.literal_reps:
            t |= interleaved({"closed_form_b": fast, "paper_literal": literal}, repeat=args.literal_reps, warmup=0,
                             tag="head_scores_")
    t_fast = t["closed_form"]
    fast_s = res["fast"].scores
    diff_best = float((fast_s - res["best"]).abs().max())
    speed_best = t["best_effort"] / t_fast
    print(f"head scores on {len(prompts)} prompts ({m.n_layers} layers x {m.n_heads} heads), medians: closed form "
          f"{t_fast:.2f} s; best-effort masked (per layer one pass of {m.n_heads + 1} stacked copies, early stop) "
          f"{t['best_effort']:.2f} s, max |diff| {diff_best:.2e}")
    speed = diff = float("nan")
    if args.literal_reps:
        speed = t["paper_literal"] / t["closed_form_b"]
        diff = float((fast_s - res["slow"].scores).abs().max())
        print(f"paper-literal masked passes ({1 + m.n_layers * m.n_heads} full forwards per batch) "
              f"{t['paper_literal']:.1f} s vs closed form {t['closed_form_b']:.2f} s in the same interleaved loop; "
              f"max |diff| {diff:.2e} (scores up to {float(fast_s.abs().max()):.3f})")
    if diff_best > 1e-4:
        raise SystemExit(f"best-effort masked scores differ from the closed form by {diff_best:.2e}")
    result = {"head_score_speedup": round(speed, 1), "head_score_maxdiff": diff,
              "head_score_speedup_best_effort": round(speed_best, 1), "head_score_maxdiff_best_effort": diff_best}
    if args.skip_rss:
        write_json("circuits", result, median_seconds=t)
        print(f"RESULT head_score_speedup={speed:.1f} head_score_maxdiff={diff:.2e} "
              f"head_score_speedup_best_effort={speed_best:.1f} head_score_maxdiff_best_effort={diff_best:.2e}")
        return

    def child(n):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, large = child(100), child(args.n_large)
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    g_small = small["peak_rss_mb"] - small["after_load_mb"]
    g_large = large["peak_rss_mb"] - large["after_load_mb"]
    print(f"streaming statistics pass: 100 prompts peak RSS {small['peak_rss_mb']:.0f} MB ({small['seconds']:.0f} s), "
          f"{large['n']} prompts {large['peak_rss_mb']:.0f} MB ({large['seconds']:.0f} s, {large['groups']} complete "
          f"groups); growth over the loaded model {g_small:.0f} MB vs {g_large:.0f} MB "
          f"(after load {small['after_load_mb']:.0f} / {large['after_load_mb']:.0f} MB)")
    result |= {f"directions_rss_{large['n']}_vs_100": round(ratio, 3), "directions_growth_mb_100": round(g_small, 1),
               f"directions_growth_mb_{large['n']}": round(g_large, 1)}
    write_json("circuits", result, median_seconds=t, rss_children=[small, large])
    print(f"RESULT head_score_speedup={speed:.1f} head_score_maxdiff={diff:.2e} "
          f"head_score_speedup_best_effort={speed_best:.1f} head_score_maxdiff_best_effort={diff_best:.2e} "
          f"directions_rss_{large['n']}_vs_100={ratio:.3f} directions_growth_mb_100={g_small:.0f} "
          f"directions_growth_mb_{large['n']}={g_large:.0f}")

if __name__ == "__main__":
    main()
