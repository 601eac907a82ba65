"""Scaling curve: time and peak memory of capture, attribution, exact patching and steered
generation versus prompt count and sequence length, on the embedded model.

    python benchmarks/scaling.py [--budget 60] [--threads 1]

Prompt-count axis: 1, 4, 16, 64, 256, 1024, 2880 chat prompts (~50 tokens each; pairs that differ
in one emotion word for attribution/patching). Sequence-length axis: 16 ... 1024 tokens of raw text
(2 prompts/pairs). Each (operation, axis) series climbs the ladder until the next point would take
its cumulative time past ``--budget`` seconds (predicted linearly from the last point), so the
whole run stays near 8 x budget; the JSON says which points were measured.

- capture: streaming mean of resid_post at every layer, t* (batch 16)
- attribution: AtP over resid x position and all heads (batch 16 pairs)
- patching: exact head patching of the 27 heads of the last 3 layers (batch_size 64 rows; all 270
  heads cost ~10x more per pair, with the same growth in prompts)
- generate: greedy, 8 new tokens, Add at resid_post.7 on every position (batch 16)

Memory = peak RSS during the call minus RSS right before it (growth over the loaded model and
whatever the process already held), sampled every 5 ms from /proc. The fitted slope is the
least-squares slope of log(time) on log(size) over the three largest measured sizes of a series
(at the smallest sizes fixed per-call costs dominate); slope <= 1 means linear or better.

Writes benchmarks/results/scaling.json and docs/assets/scaling_curve.png and ends with
``RESULT scaling_time_slope_prompts_max=<s> scaling_time_slope_seq_max=<t>``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PROMPTS, machine, rss_mb, write_json  # noqa: E402

COUNTS = [1, 4, 16, 64, 256, 1024, 2880]
LENGTHS = [16, 32, 64, 128, 256, 512, 1024]
OPS = ("capture", "attribution", "patching", "generate")
FILLER = ("The morning was quiet and the streets were still wet from the rain that had fallen during the night. "
          "People walked slowly to work, talking about the weather, the news and the plans they had for the weekend. ")


class PeakRSS:
    """Peak resident memory growth (MB) during a block, sampled from a thread."""

    def __enter__(self):
        self.base = rss_mb()
        self.peak = self.base
        self._stop = threading.Event()

        def run():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, rss_mb())

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())
        self.growth = self.peak - self.base


def slope(points):
    """Least-squares slope of log(seconds) on log(size) over the last 3 measured points (the largest
    sizes: at the smallest, fixed per-call costs dominate and flatten the curve)."""
    pts = points[-3:]
    if len(pts) < 2:
        return float("nan")
    xs = [math.log(n) for n, _ in pts]
    ys = [math.log(t) for _, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def main() -> None:
    import emolens
    from emolens import Pos, capture, resid
    from emolens.attribution import attribute
    from emolens.interventions import Add
    from emolens.metrics import logit_diff
    from emolens.patching import patch

    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per (operation, axis) series")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = emolens.load_model()  # weights keep requires_grad: attribute() differentiates through them
    tok = m.tokenizer
    metric = logit_diff(m, [tok(" That", add_special_tokens=False)["input_ids"][0]],
                        [tok(" I", add_special_tokens=False)["input_ids"][0]])
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    steer = [Add(resid(7), v / v.norm(), strength=1.0, pos=Pos.all())]
    sites = [resid(L) for L in range(m.n_layers)]
    cand = [(L, h) for L in range(m.n_layers - 3, m.n_layers) for h in range(m.n_heads)]  # 27 heads
    Nmax = max(COUNTS)
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (note {i})" for i in range(Nmax)]
    tmpl = ["I just heard the news about my sister and I feel so {}. What should I say? (case {})",
            "My exam results came back today and honestly I am {}. How do I tell them? (case {})"]
    clean = [tmpl[i % 2].format("happy", i) for i in range(Nmax)]
    corr = [tmpl[i % 2].format("sad", i) for i in range(Nmax)]
    filler_ids = tok((FILLER * 60), add_special_tokens=False)["input_ids"]

    def seq_inputs(T):
        base = tok.decode(filler_ids[:max(1, T - 4)])
        return ([base + f" {k}" for k in ("Yes", "No")], [base + " I feel happy", base + " I feel glad"],
                [base + " I feel sad", base + " I feel angry"])

    def make(op, axis, size):
        if axis == "prompts":
            ps, cl, co, chat = prompts[:size], clean[:size], corr[:size], None
        else:
            ps, cl, co = seq_inputs(size)
            chat = False
        if op == "capture":
            return lambda: capture(m, ps, sites, pos="last", reduce="mean", batch_size=16, chat=chat, progress=False)
        if op == "attribution":
            return lambda: attribute(m, cl, co, metric, nodes=("resid", "heads"), batch_size=16, chat=chat,
                                     progress=False)
        if op == "patching":
            return lambda: patch(m, cl, co, metric, nodes="heads", candidates=cand, batch_size=64, chat=chat,
                                 progress=False)
        return lambda: m.generate(ps, interventions=steer, max_new_tokens=8, min_new_tokens=8, batch_size=16,
                                  chat=chat)

    def tokens(axis, size):
        if axis == "prompts":
            return int(m.encode(prompts[:1]).input_ids.shape[1])
        return int(m.encode(seq_inputs(size)[1][:1], chat=False).input_ids.shape[1])

    make("capture", "prompts", 1)()  # warm-up (first-call costs)
    series = {}
    t_all = time.perf_counter()
    for axis, ladder in (("prompts", COUNTS), ("seq_len", LENGTHS)):
        for op in OPS:
            pts, spent, last = [], 0.0, None
            for size in ladder:
                if last is not None and spent + last[1] * size / last[0] > args.budget:
                    break
                fn = make(op, axis, size)
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                spent += dt
                last = (size, dt)
                pts.append({"size": size, "seconds": dt, "mem_growth_mb": mem.growth, "tokens": tokens(axis, size)})
                print(f"{axis:8s} {op:12s} {size:5d}: {dt:7.2f} s, +{mem.growth:6.1f} MB", flush=True)
            s = slope([(p["size"], p["seconds"]) for p in pts])
            series[f"{axis}/{op}"] = {"points": pts, "time_slope": s, "max_size": pts[-1]["size"]}
            print(f"{axis:8s} {op:12s} fitted time slope {s:.2f} (up to {pts[-1]['size']})", flush=True)
    total = time.perf_counter() - t_all
    sp = max(series[f"prompts/{op}"]["time_slope"] for op in OPS)
    sl = max(series[f"seq_len/{op}"]["time_slope"] for op in OPS)
    res = {"scaling_time_slope_prompts_max": round(sp, 3), "scaling_time_slope_seq_max": round(sl, 3)}
    write_json("scaling", res, series=series, total_seconds=total, budget_s=args.budget)
    png = Path(__file__).resolve().parents[1] / "docs" / "assets" / "scaling_curve.png"
    plot(series, png)
    print(f"total {total:.0f} s; figure {png}; machine: {machine()}; load average {os.getloadavg()}")
    print(f"RESULT scaling_time_slope_prompts_max={sp:.2f} scaling_time_slope_seq_max={sl:.2f}")


def plot(series: dict, path: Path) -> None:
    """Two log-log panels (time vs prompts, time vs tokens) and two linear-ish memory panels, with Pillow."""
    from PIL import Image, ImageDraw

    W, H, pad = 1200, 800, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    colors = {"capture": (31, 119, 180), "attribution": (255, 127, 14), "patching": (44, 160, 44),
              "generate": (214, 39, 40)}
    panels = [("prompts", "seconds", "time vs prompt count"), ("seq_len", "seconds", "time vs sequence length (tokens)"),
              ("prompts", "mem_growth_mb", "peak memory growth (MB) vs prompt count"),
              ("seq_len", "mem_growth_mb", "peak memory growth (MB) vs sequence length")]
    pw, ph = W // 2, H // 2
    for k, (axis, key, title) in enumerate(panels):
        x0, y0 = (k % 2) * pw + pad, (k // 2) * ph + 40
        x1, y1 = (k % 2 + 1) * pw - 20, (k // 2 + 1) * ph - 50
        d.text((x0, y0 - 30), title, fill="black")
        d.rectangle([x0, y0, x1, y1], outline="black")
        pts = {op: [(p["size"], max(p[key], 0.1)) for p in series[f"{axis}/{op}"]["points"]] for op in OPS}
        xs = [x for v in pts.values() for x, _ in v]
        ys = [y for v in pts.values() for _, y in v]
        lx0, lx1 = math.log10(min(xs)), math.log10(max(xs)) + 1e-9
        ly0, ly1 = math.log10(min(ys)), math.log10(max(ys)) + 1e-9
        if ly1 - ly0 < 1:
            ly0 -= 0.5
            ly1 += 0.5

        def X(x):
            return x0 + (math.log10(x) - lx0) / (lx1 - lx0) * (x1 - x0)

        def Y(y):
            return y1 - (math.log10(y) - ly0) / (ly1 - ly0) * (y1 - y0)

        for e in range(math.floor(lx0), math.ceil(lx1) + 1):
            if lx0 <= e <= lx1:
                d.line([X(10 ** e), y1, X(10 ** e), y1 + 5], fill="black")
                d.text((X(10 ** e) - 10, y1 + 8), f"{10 ** e:g}", fill="black")
        for e in range(math.floor(ly0), math.ceil(ly1) + 1):
            if ly0 <= e <= ly1:
                d.line([x0 - 5, Y(10 ** e), x0, Y(10 ** e)], fill="black")
                d.text((x0 - 45, Y(10 ** e) - 6), f"{10 ** e:g}", fill="black")
        if key == "seconds":  # slope-1 guide through the lowest first point
            xa, ya = min(xs), min(y for x, y in zip(xs, ys) if x == min(xs))
            xb = max(xs)
            yb = ya * xb / xa
            d.line([X(xa), Y(ya), X(xb), Y(min(yb, 10 ** ly1))], fill=(170, 170, 170), width=1)
            d.text((x0 + 8, y0 + 8), "grey: linear (slope 1)", fill=(120, 120, 120))
        for j, (op, v) in enumerate(pts.items()):
            c = colors[op]
            xy = [(X(x), Y(y)) for x, y in v]
            if len(xy) > 1:
                d.line(xy, fill=c, width=2)
            for px, py in xy:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
            lab = op + (f" (slope {series[f'{axis}/{op}']['time_slope']:.2f})" if key == "seconds" else "")
            d.text((x1 - 190, y0 + 8 + 14 * j), lab, fill=c)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    main()
