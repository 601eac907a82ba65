"""Paper 2 circuit methods on the embedded model: closed-form head scores and streaming directions.

RESULT head_score_speedup = time(head_scores_masked: the paper's 1 + L*H masked passes)
                            / time(head_scores: closed form, one cached pass)         target >= 100
       head_score_maxdiff = max |closed form - masked| over (layer, head)            target <= 1e-4
       directions_rss_2880_vs_100 = peak RSS of the streaming statistics pass
                            (collect_sev_stats: directions, difference vectors, sigma, neuron and
                            head moments) over 2,880 P_emo prompts / the same over 100 prompts,
                            each in a fresh process                                   target <= 1.10

2,880 = the paper's 160 scenarios x 3 valences x 6 emotions; the project's SEV files hold 144
records, so the benchmark adds 16 renamed copies of analysis records (distinct skeleton ids).

Usage: python benchmarks/circuits.py [--head-prompts 2] [--n-large 2880] [--threads N]
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
from _common import machine, peak_rss_mb  # noqa: E402


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
    head_scores(m, prompts, v)  # warm-up
    t0 = time.perf_counter()
    fast = [head_scores(m, prompts, v) for _ in range(3)][-1]
    t_fast = (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    slow = head_scores_masked(m, prompts, v)
    t_slow = time.perf_counter() - t0
    speed = t_slow / t_fast
    diff = float((fast.scores - slow.scores).abs().max())
    print(f"head scores on {len(prompts)} prompts ({m.n_layers} layers x {m.n_heads} heads): closed form "
          f"{t_fast:.2f} s, masked passes ({1 + m.n_layers * m.n_heads} per batch) {t_slow:.1f} s; "
          f"max |diff| {diff:.2e} (scores up to {float(fast.scores.abs().max()):.3f})")

    def child(n):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, large = child(100), child(args.n_large)
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"streaming statistics pass: 100 prompts peak RSS {small['peak_rss_mb']:.0f} MB ({small['seconds']:.0f} s), "
          f"{large['n']} prompts {large['peak_rss_mb']:.0f} MB ({large['seconds']:.0f} s, {large['groups']} complete "
          f"groups); after model load {small['after_load_mb']:.0f} MB")
    print(f"RESULT head_score_speedup={speed:.1f} head_score_maxdiff={diff:.2e} "
          f"directions_rss_{large['n']}_vs_100={ratio:.3f}")


if __name__ == "__main__":
    main()
