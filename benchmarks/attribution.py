"""Benchmark: attribution cost, exact head patching vs TransformerLens, attribution quality.

    python benchmarks/attribution.py [--model smollm2-135m-instruct] [--reps 3] [--skip-tl]

Prints a few lines of detail and ends with

    RESULT attribution_vs_forward=<a> exact_heads_speedup_vs_tl=<b> exact_heads_speedup_vs_tl_early=<b0>
           head_spearman=<c>

- a: wall time of all-node attribution (resid × position + all heads + all neurons, plain AtP)
  over a batch of emotion prompt pairs ÷ one plain Hugging Face forward (an un-bridged
  transformers model with the same weights and its default SDPA attention, no grad) of the same
  batch (target ≤ 4.5). Median of ``--reps`` interleaved runs; the ratio against the bridged
  model's own forward (eager attention, hook points idle) is printed too.
- b: TransformerLens ``patching.get_act_patch_attn_head_out_all_pos`` time ÷ emolens
  ``patch(nodes="heads")`` time on the same inputs, for a chat pair whose prompts differ late (the
  emotion word, position ~40 of 51) — target ≥ 4; b0: the same for a raw-text pair that differs at
  the FIRST token (emolens's shared-prefix skip cannot help) — target ≥ 2. The values must agree to
  1e-4. TransformerLens runs at its best: under ``torch.inference_mode()``, weights frozen
  (``requires_grad_(False)``), its tqdm bar off, same batch and thread count; TL and emolens run
  interleaved, ``--reps`` times each, medians compared. The emolens time includes its clean and
  corrupted passes; TL's excludes building its clean cache (done once, outside the timing).
- c: Spearman correlation between AtP* head scores and exact head patching on a realistic
  emotion prompt pair (≥ 0.8 expected); plain AtP and IG are printed alongside.

Raw timings go to benchmarks/results/attribution.json. Timings are wall-clock on whatever machine
runs it; on a shared CPU, concurrent load inflates them unevenly, so ratios are the meaningful
numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("EMOLENS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import emolens  # noqa: E402
from emolens.attribution import attribute  # noqa: E402
from emolens.metrics import logit_diff  # noqa: E402
from emolens.patching import patch  # noqa: E402
from _common import interleaved, machine, plain_hf, write_json  # noqa: E402

warnings.filterwarnings("ignore")

# Same-length clean/corrupted pairs: only the emotion word differs (one token each on SmolLM2).
TEMPLATES = [
    "I just heard the news about my sister and I feel so {}. What should I say to her?",
    "My exam results came back today and honestly I am {}. How do I tell my parents?",
    "We moved into the new apartment this weekend and I feel {}. Any advice?",
    "My best friend called me after months of silence and I was {}. What now?",
    "The project I worked on all year was announced today and I am {}. Thoughts?",
    "I saw my old teacher at the market and felt really {}. Is that normal?",
    "Our team finished the season today and everyone is {}. How do we celebrate or cope?",
    "I got a letter from my grandmother and it made me {}. Should I write back?",
]
POSITIVE = ["happy", "glad", "excited", "thrilled", "joyful", "proud"]
NEGATIVE = ["sad", "upset", "angry", "miserable", "scared", "hurt"]
GOOD_REPLY = [" That", " Congratulations", " What", " Wow", " How", " It"]
BAD_REPLY = [" I", " Oh", " Sorry", " It", " That", " Feeling"]


def single_tokens(m, words):
    return [w for w in words if len(m.tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]


def pairs_for(m, n):
    """n (clean, corrupted) chat prompts of equal token length (positive vs negative word)."""
    clean, corr = [], []
    for t in TEMPLATES:
        found = next(((t.format(a), t.format(b)) for a in POSITIVE for b in NEGATIVE
                      if len(m.encode([t.format(a)]).input_ids[0]) == len(m.encode([t.format(b)]).input_ids[0])), None)
        if found:
            clean.append(found[0]), corr.append(found[1])
        if len(clean) == n:
            break
    if len(clean) < n:
        raise SystemExit(f"only {len(clean)} equal-length pairs found for {m.name}")
    return clean, corr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8, help="prompt pairs for the attribution-cost ratio")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-tl", action="store_true", help="skip the (slow) TransformerLens patching sweep")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared CPU, OpenMP threads competing with other "
                         "processes made forwards ~20x slower and erratic; 0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = emolens.load_model(args.model)
    print(f"model: {m}\nmachine: {machine()}; load average: {os.getloadavg()}")
    good = single_tokens(m, GOOD_REPLY) or [0]
    bad = [t for t in single_tokens(m, BAD_REPLY) if t not in good] or [1]
    metric = logit_diff(m, good, bad)

    # ---- a: attribution cost vs one forward ------------------------------------------------------
    clean, corr = pairs_for(m, args.batch)
    xb, cb = m.encode(corr), m.encode(clean)
    print(f"a: batch of {len(xb)} pairs, {xb.input_ids.shape[1]} tokens")

    ref = plain_hf(args.model) if args.model in emolens.model.EMBEDDED_MODELS else None

    def plain_forward(model):
        def run():
            with torch.no_grad():
                return model(input_ids=xb.input_ids, attention_mask=xb.attention_mask,
                             position_ids=xb.position_ids, use_cache=False).logits
        return run

    res = {}

    def all_nodes():
        res.update(attribute(m, cb, xb, metric, nodes=("resid", "heads", "neurons"), batch_size=len(xb),
                             progress=False))

    fns = {"bridged": plain_forward(m.hf_model), "attribution": all_nodes}
    if ref is not None:
        fns["plain"] = plain_forward(ref)
    ts = interleaved(fns, repeat=args.reps, tag="attribution_")
    t_fwd = ts.get("plain", ts["bridged"])
    a = ts["attribution"] / t_fwd
    n_nodes = sum(r.scores.numel() for r in res.values())
    print(f"a: plain HF forward {t_fwd:.3f}s, bridged forward {ts['bridged']:.3f}s, attribution of {n_nodes} "
          f"nodes {ts['attribution']:.3f}s -> ratio {a:.2f} (vs bridged forward {ts['attribution'] / ts['bridged']:.2f})")

    # ---- b: exact head patching vs TransformerLens ---------------------------------------------
    frozen = [p for p in m.bridge.parameters() if p.requires_grad]
    for p in frozen:  # TL at its best; restored below (attribute() needs them for c)
        p.requires_grad_(False)
    pc, px = pairs_for(m, 1)
    pcb, pxb = m.encode(pc), m.encode(px)
    # b0: a raw-text pair that differs at the first token (no shared prefix to skip)
    early = None
    for w_pos in ("Happy", "Glad", "Proud"):
        for w_neg in ("Sad", "Angry", "Scared"):
            ca_, cz_ = (f"{w} is how I feel after hearing the news about my sister this morning. She called to say "
                        "that she is moving to another city next month with her whole family. What should I say "
                        "to her when we meet for dinner?" for w in (w_pos, w_neg))
            ea, ez = m.encode([ca_], chat=False), m.encode([cz_], chat=False)
            if ea.input_ids.shape == ez.input_ids.shape and bool((ea.input_ids[0, 0] != ez.input_ids[0, 0])):
                early = (ea, ez)
                break
        if early:
            break
    if early is None:
        raise SystemExit("no equal-length first-token pair found for this tokenizer")
    b_out = {}
    for label, (cb_, xb_) in {"late": (pcb, pxb), "early": early}.items():
        first_diff = int((cb_.input_ids != xb_.input_ids).any(0).nonzero()[0])
        print(f"b[{label}]: {xb_.input_ids.shape[1]} tokens, first differing position {first_diff}")
        exact = None

        def ours(cb_=cb_, xb_=xb_):
            nonlocal exact
            exact = patch(m, cb_, xb_, metric, nodes="heads", batch_size=64, progress=False)

        fns = {"emolens": ours}
        if not args.skip_tl:
            from transformer_lens import patching as tlp

            tlp.tqdm = lambda it, *a, **k: it  # no progress bar in the timed loop
            with torch.inference_mode():
                base = float(metric(m.forward(xb_), xb_, {}).mean())
                _, clean_cache = m.bridge.run_with_cache(cb_.input_ids)
            tl_out = {}

            def tl(xb_=xb_, clean_cache=clean_cache, tl_out=tl_out):
                with torch.inference_mode():
                    tl_out["v"] = tlp.get_act_patch_attn_head_out_all_pos(
                        m.bridge, xb_.input_ids, clean_cache, lambda lg: metric(lg, xb_, {}).mean())

            fns["tl"] = tl
        ts = interleaved(fns, repeat=args.reps, warmup=0, tag=f"exact_heads_{label}_")
        info = f"b[{label}]: emolens exact head patching {ts['emolens']:.2f}s ({exact.meta['n_forward_passes']} " \
               f"batched passes, {m.n_layers * m.n_heads} heads, prefix skipped {exact.meta['shared_prefix_skipped']})"
        b_out[label] = float("nan")
        if not args.skip_tl:
            diff = float((exact.scores - (tl_out["v"].cpu() - base)).abs().max())
            info += f"; TransformerLens {ts['tl']:.2f}s; max |emolens - TL| = {diff:.2e}"
            if diff > 1e-4:
                raise SystemExit(f"exact head patching disagrees with TransformerLens by {diff:.2e}")
            b_out[label] = ts["tl"] / ts["emolens"]
            del clean_cache
        print(info)
        if label == "late":
            exact_late = exact
    exact = exact_late
    b = b_out["late"]
    for p in frozen:
        p.requires_grad_(True)

    # ---- c: attribution quality on heads -----------------------------------------------------------
    from scipy.stats import spearmanr

    ex = exact.scores.flatten().numpy()
    out = {}
    for label, kw in (("atp", dict(method="atp")), ("atp*", dict(method="atp*")), ("ig8", dict(method="ig"))):
        t = time.perf_counter()
        h = attribute(m, pcb, pxb, metric, nodes="heads", progress=False, **kw)["heads"]
        out[label] = float(spearmanr(h.scores.flatten().numpy(), ex).statistic)
        extra = ""
        if label == "atp*":
            out["atp*|abs"] = float(spearmanr(h.extra["graddrop"].flatten().numpy(), abs(ex)).statistic)
            extra = f", |GradDrop| vs |exact| {out['atp*|abs']:.3f}"
        print(f"c: {label:5s} Spearman vs exact heads {out[label]:.3f} ({time.perf_counter() - t:.1f}s){extra}")
    c = out["atp*"]
    res = {"attribution_vs_forward": round(a, 2), "exact_heads_speedup_vs_tl": round(b, 2),
           "exact_heads_speedup_vs_tl_early": round(b_out["early"], 2), "head_spearman": round(c, 3)}
    write_json("attribution", res, spearman=out, reps=args.reps)
    print(f"RESULT attribution_vs_forward={a:.2f} exact_heads_speedup_vs_tl={b:.2f} "
          f"exact_heads_speedup_vs_tl_early={b_out['early']:.2f} head_spearman={c:.3f}")


if __name__ == "__main__":
    main()
