"""Scaling curve: time and peak memory of capture, attribution, exact patching and steered
generation versus prompt count (1-2,880) and sequence length (16-1,024), on the embedded model.

    python benchmarks/scaling.py                       # the full ladders (~2 h on one thread of a busy 2-core CPU)
    python benchmarks/scaling.py --counts 1,8 --lengths 16,64 --out /tmp/s.json --png /tmp/s.png   # smoke
    python benchmarks/scaling.py --plot-only           # redraw the figure (and RESULT) from the JSON
    python benchmarks/scaling.py --ops attribution,patching --lengths "" --counts 90,720,2880 --out /tmp/m.json
                                                       # a subset: two operations, prompt axis only
    python benchmarks/scaling.py --merge /tmp/m.json   # put such a rerun's points into the full curve
    python benchmarks/scaling.py --table               # the markdown table of docs/performance.md
    python benchmarks/scaling.py --counts "" --ops capture,attribution,patching --attn eager,auto \
        --out benchmarks/results/scaling_seq.json --png docs/assets/scaling_seq.png   # length ladder, both attentions
    python benchmarks/scaling.py --compare-attn 256,1024   # eager vs SDPA side by side in one process

Workload (SmolLM2-135M-Instruct, fp32, raw text without chat template, one torch thread):

- prompt axis: ``--counts`` prompts (default 1, 12, 90, 720, 2880) of 16 tokens each (BOS included;
  pairs for attribution/patching differ only in their last token, " happy" / " sad");
- length axis: one prompt (one pair) of ``--lengths`` tokens (default 16, 64, 256, 1024);
- capture: streaming mean of ``resid_post`` at all 30 layers at t* (batch 32 prompts);
- attribution: AtP over residual x position and all 270 heads (batch 32 pairs);
- patching: exact patching of the 9 heads of layer 15 (a fixed candidate set, so the cost per pair
  is bounded), 32 pairs per chunk, one patched run of 32 rows per head, shared prefix reused;
- generate: greedy, ``--new-tokens`` (4) forced new tokens, ``Add`` at ``resid_post.7`` on every
  position, batch 32.

``--attn`` (``auto`` default, or ``eager``, or both ``eager,auto``) is passed to capture,
attribution and patching: ``auto`` runs them on the plain transformers modules with SDPA
attention, ``eager`` on the TransformerLens bridge (eager attention, ``[heads, T, T]`` patterns).
Series measured with ``eager`` are keyed ``axis/op@eager``; the RESULT maxima cover the default
(``auto``) series, and ``..._eager`` keys the eager ones. ``--compare-attn 256,1024`` instead times
eager and SDPA for the three operations on one pair of each length in one process (interleaved
repeats with alternating order, medians; writes benchmarks/results/scaling_attn.json), checks the
results agree, and ends with ``RESULT sdpa_speedup_<op>_<T>=<eager s / sdpa s> ...
seq_slope_<op>_<eager|sdpa>=<slope between the two lengths> ... capture_max_rel_diff=..
scores_max_abs_diff=..`` (metric units): the before/after slopes under one load. ``--qk-fix`` does
the same for the AtP* QK fix alone (``q``/``k`` nodes), which must run eager under ``auto`` too
(``RESULT ... qkfix_attn_auto=eager``; benchmarks/results/scaling_attn_qkfix.json).

Each (axis, size, operation) point runs in a **fresh child process**: it loads the model, reads
every weight once (they are memory-mapped from the safetensors cache, so the first forward would
otherwise page ~540 MB of weights in and count them as growth), notes the resident set size (RSS), runs the operation once on a 1-prompt (16-token) input as a warm-up
(first-call costs), then the timed call (repeated up to 5 times while the total stays under 3 s;
the median is kept). Memory = peak RSS from right after the load to the end of the timed calls,
minus the RSS after the load: growth over the loaded model, with nothing left over from earlier
points. The peak is sampled every 2 ms from /proc and, when the kernel's own high-water mark
(``ru_maxrss``) rose above what the load had reached, taken from that exact value instead.

Points run size-major (all operations at one size before the next size; length axis first, it is
cheap). After each point the JSON is rewritten atomically (temp file, fsync, rename); a rerun with
the same configuration resumes from it, a changed configuration starts over. The fitted slope of a
series is the least-squares slope of log(seconds) on log(size) over its three largest sizes
(at the smallest ones fixed per-call costs dominate); slope <= 1 means linear or better.

Writes benchmarks/results/scaling.json and docs/assets/scaling_curve.png and ends with
``RESULT scaling_time_slope_prompts_max=.. scaling_time_slope_seq_max=.. scaling_mem_slope_prompts_max=..``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPS = ("capture", "generate", "patching", "attribution")  # cheapest first at each size
AXES = ("seq_len", "prompts")
PROMPT_TOKENS = 16
BATCH = 32
PATCH_LAYER = 15
STEER_LAYER = 7
FILLER = ("The morning was quiet and the streets were still wet from the rain that had fallen during the night. "
          "People walked slowly to work, talking about the weather, the news and the plans they had for the weekend. "
          "A bus stopped at the corner, a dog barked twice, and somewhere a radio was playing an old song. ")
SUFFIX = " and then I felt so"
PAIR_WORDS = (" happy", " sad")


# ----------------------------------------------------------------------------- child: one point

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _PeakSampler:
    """Highest RSS seen by a thread polling /proc every 2 ms (torch ops release the GIL)."""

    def __init__(self):
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())
        return self.peak


def _texts(tok, bos: int, n_tokens: int, n: int, pair: bool) -> tuple[list[str], list[str] | None]:
    """``n`` raw texts of ``n_tokens`` tokens (BOS included); for pairs, clean/corrupted that differ
    only in the last word. Distinct texts: each starts at another offset of the filler."""
    filler = tok(FILLER * 40, add_special_tokens=False)["input_ids"]
    suf = SUFFIX + (PAIR_WORDS[0] if pair else "")
    k = n_tokens - bos - len(tok(suf, add_special_tokens=False)["input_ids"])
    if k < 1 or k > len(filler) - 200:
        raise SystemExit(f"cannot build {n_tokens}-token texts")
    # start each text at the beginning of a word so that decode -> encode keeps the token count
    starts = [i for i in range(200) if tok.decode(filler[i:i + 1]).startswith(" ")] or [0]
    bases = [tok.decode(filler[starts[i % len(starts)]:starts[i % len(starts)] + k]).strip() for i in range(n)]
    if not pair:
        return [b + SUFFIX for b in bases], None
    return [b + SUFFIX + PAIR_WORDS[0] for b in bases], [b + SUFFIX + PAIR_WORDS[1] for b in bases]


def _setup():
    """The embedded model on one thread, its tokenizer, the BOS offset, the happy-vs-sad logit
    difference, every layer's resid site and the patching candidates (shared by all measurements)."""
    import torch

    torch.set_num_threads(1)
    import emolens
    from emolens import resid
    from emolens.metrics import logit_diff

    m = emolens.load_model()
    tok = m.tokenizer
    bos = int(m.encode(["word"], chat=False).input_ids.shape[1]) - len(tok("word", add_special_tokens=False)["input_ids"])
    metric = logit_diff(m, [tok(" happy", add_special_tokens=False)["input_ids"][0]],
                        [tok(" sad", add_special_tokens=False)["input_ids"][0]])
    return m, tok, bos, metric, [resid(L) for L in range(m.n_layers)], [(PATCH_LAYER, h) for h in range(m.n_heads)]


def run_point(op: str, axis: str, size: int, new_tokens: int, attn: str = "auto") -> dict:
    import torch

    from emolens import Pos, capture, resid
    from emolens.attribution import attribute
    from emolens.interventions import Add
    from emolens.patching import patch

    m, tok, bos, metric, sites, cand = _setup()
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    steer = [Add(resid(STEER_LAYER), v / v.norm(), strength=4.0, pos=Pos.all())]

    def make(n_prompts: int, n_tokens: int):
        pair = op in ("attribution", "patching")
        a, b = _texts(tok, bos, n_tokens, n_prompts, pair)
        lens = [int(x) for x in m.encode(a, chat=False).attention_mask.sum(1)]
        if op == "capture":
            fn = lambda: capture(m, a, sites, pos="last", reduce="mean", batch_size=BATCH, chat=False,  # noqa: E731
                                 progress=False, attn=attn)
        elif op == "attribution":
            fn = lambda: attribute(m, a, b, metric, nodes=("resid", "heads"), batch_size=BATCH,  # noqa: E731
                                   chat=False, progress=False, attn=attn)
        elif op == "patching":
            fn = lambda: patch(m, a, b, metric, nodes="heads", candidates=cand, batch_size=BATCH,  # noqa: E731
                               chat=False, progress=False, attn=attn)
        else:
            fn = lambda: m.generate(a, interventions=steer, max_new_tokens=new_tokens,  # noqa: E731
                                    min_new_tokens=new_tokens, batch_size=BATCH, chat=False)
        return fn, lens

    n_prompts, n_tokens = (size, PROMPT_TOKENS) if axis == "prompts" else (1, size)
    fn, lens = make(n_prompts, n_tokens)
    warm, _ = make(1, PROMPT_TOKENS)
    with torch.no_grad():  # the weights are memory-mapped: page them all in before the baseline
        for t in list(m.bridge.parameters()) + list(m.bridge.buffers()):
            float(t.detach().float().sum())
    gc.collect()
    rss0, maxrss0 = _rss_mb(), _maxrss_mb()
    sampler = _PeakSampler()
    warm()
    times: list[float] = []
    while True:
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 5 or sum(times) + times[-1] > 3.0:
            break
    peak = sampler.stop()
    maxrss1 = _maxrss_mb()
    exact = maxrss1 > maxrss0 + 0.5  # the kernel's high-water mark was set during the op: use it
    if op == "generate":  # sanity: the forced new tokens were produced
        assert len(out) == n_prompts
    return {"op": op, "axis": axis, "size": size, "attn": attn if op != "generate" else "sdpa (generate backend)",
            "seconds": statistics.median(times), "seconds_all": times,
            "rss_loaded_mb": rss0, "mem_growth_mb": (max(maxrss1, peak) if exact else peak) - rss0,
            "mem_peak_source": "ru_maxrss" if exact and maxrss1 >= peak else "sampled",
            "tokens_per_prompt": statistics.mean(lens), "tokens_min": min(lens), "tokens_max": max(lens),
            "n_prompts": n_prompts, "load_average": os.getloadavg()}


# ----------------------------------------------------------------------------- parent: ladder

def slope(points: list[tuple[float, float]], k: int = 3) -> float:
    """Least-squares slope of log(y) on log(size) over the ``k`` largest sizes."""
    pts = sorted(points)[-k:]
    if len(pts) < 2:
        return float("nan")
    xs = [math.log(n) for n, _ in pts]
    ys = [math.log(max(t, 1e-9)) for _, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def _measure_sha() -> str:
    """Hash of the code that measures a point (constants and child section, not docs or plotting):
    a resume never mixes points measured by different code."""
    src = Path(__file__).read_text()
    start = src.index("\nROOT = ")
    end = src.index("# " + "-" * 77 + " parent")
    return hashlib.sha256(src[start:end].encode()).hexdigest()[:16]


def _atomic_write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"


def _series_key(p: dict) -> str:
    """``axis/op`` for the default (``auto``: SDPA) path, ``axis/op@eager`` for the bridge's eager attention."""
    return f"{p['axis']}/{p['op']}" + ("@eager" if p.get("attn", "auto") == "eager" else "")


def summarize(data: dict) -> dict:
    """Per-series slopes (time and memory) and the RESULT maxima (default series; ``_eager`` keys the others)."""
    series = {}
    for axis in AXES:
        for key in (f"{axis}/{op}{suf}" for op in OPS for suf in ("", "@eager")):
            pts = sorted((p for p in data["points"] if _series_key(p) == key), key=lambda p: p["size"])
            if not pts:
                continue
            t = [(p["size"], p["seconds"]) for p in pts]
            mem = [(p["size"], max(p["mem_growth_mb"], 1.0)) for p in pts]  # 1 MB floor: log of ~0
            series[key] = {
                "sizes": [p["size"] for p in pts], "seconds": [p["seconds"] for p in pts],
                "mem_growth_mb": [p["mem_growth_mb"] for p in pts],
                "time_slope": slope(t), "time_slope_last_segment": slope(t, 2),
                "mem_slope": slope(mem), "max_size": pts[-1]["size"]}
    res = {}
    for suf in ("", "@eager"):
        for axis, key in (("prompts", "prompts"), ("seq_len", "seq")):
            sel = [s for k, s in series.items() if k.startswith(axis + "/") and ("@" in k) == bool(suf)]
            ts = [s["time_slope"] for s in sel if not math.isnan(s["time_slope"])]
            ms = [s["mem_slope"] for s in sel if not math.isnan(s["mem_slope"])]
            tail = "_eager" if suf else ""
            if ts:
                res[f"scaling_time_slope_{key}_max{tail}"] = round(max(ts), 3)
            if ms:
                res[f"scaling_mem_slope_{key}_max{tail}"] = round(max(ms), 3)
    return {"series": series, "result": res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,12,90,720,2880")
    ap.add_argument("--lengths", default="16,64,256,1024")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--ops", default=",".join(OPS), help="comma list of operations to measure")
    ap.add_argument("--attn", default="auto", help="auto (SDPA where possible), eager, or both: eager,auto")
    ap.add_argument("--compare-attn", metavar="T[,T2..]", help="eager vs SDPA on one pair per length, one process")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repeats for --compare-attn")
    ap.add_argument("--qk-fix", action="store_true", help="--compare-attn on the AtP* QK fix (reads patterns: eager)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "assets" / "scaling_curve.png"))
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the docs' markdown table from the JSON")
    ap.add_argument("--merge", metavar="JSON", help="replace the points of --out by those of this run's JSON with the "
                    "same (axis, operation, size), recompute slopes, redraw the figure")
    ap.add_argument("--point", nargs=3, metavar=("OP", "AXIS", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        op, axis, size = args.point
        print("POINT " + json.dumps(run_point(op, axis, int(size), args.new_tokens, args.attn)), flush=True)
        return
    if args.compare_attn:
        lens = [int(x) for x in args.compare_attn.split(",")]
        compare_attn(lens, args.reps, Path(args.out) if args.out != ap.get_default("out") else
                     ROOT / "benchmarks" / "results" / ("scaling_attn_qkfix.json" if args.qk_fix else "scaling_attn.json"),
                     qk_fix=args.qk_fix)
        return
    ops = [o for o in OPS if o in args.ops.split(",")]
    attns = [a for a in ("eager", "auto") if a in args.attn.split(",")]
    if not ops or not attns or set(args.ops.split(",")) - set(OPS) or set(args.attn.split(",")) - {"eager", "auto"}:
        raise SystemExit(f"--ops takes {','.join(OPS)}; --attn takes eager, auto or eager,auto")

    out, png = Path(args.out), Path(args.png)
    counts = [int(x) for x in args.counts.split(",") if x]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    config = {"counts": counts, "lengths": lengths, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS,
              "ops": ops, "attn": attns,
              "batch": BATCH, "patch_candidates": f"9 heads of layer {PATCH_LAYER}",
              "steer": f"Add resid_post.{STEER_LAYER} all positions", "script_sha": _measure_sha()}
    data = json.loads(out.read_text()) if out.exists() else None
    if args.table:
        print(table(data))
        return
    if args.merge:  # e.g. a rerun of some operations after a fix, into the full curve
        new = json.loads(Path(args.merge).read_text())
        if new["config"]["script_sha"] != data["config"]["script_sha"]:
            print(f"note: {args.merge} was measured by other point code ({new['config']['script_sha']} vs "
                  f"{data['config']['script_sha']})")
        keys = {(p["axis"], p["op"], p["size"]) for p in new["points"]}
        data["points"] = [p for p in data["points"] if (p["axis"], p["op"], p["size"]) not in keys] + [
            dict(p, merged_from=Path(args.merge).name) for p in new["points"]]
        data.setdefault("merged", []).append({"from": Path(args.merge).name, "points": len(keys),
                                              "config": new["config"], "started_utc": new.get("started_utc")})
        data.update(summarize(data))
        _atomic_write(out, data)
        plot(data["series"], png)
        print(f"merged {len(keys)} points into {out}; figure {png}")
        print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in data["result"].items()))
        return
    if args.plot_only:  # also the RESULT line of whatever points the JSON holds (e.g. a stopped run)
        summ = summarize(data)
        plot(summ["series"], png)
        print(f"figure {png}; {len(data['points'])} points")
        print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in summ["result"].items()))
        return
    if not data or data.get("config") != config:
        data = {"benchmark": "scaling", "config": config, "machine": _machine(), "points": [],
                "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    done = {(p["axis"], p["op"], p["size"], p.get("attn", "auto")) for p in data["points"]}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EMOLENS_PROGRESS="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t_all = time.perf_counter()
    for axis, ladder in (("seq_len", lengths), ("prompts", counts)):
        for size in ladder:
            for op, attn in ((o, a) for o in ops for a in (attns if o != "generate" else attns[-1:])):
                if (axis, op, size, attn if op != "generate" else "sdpa (generate backend)") in done:
                    continue
                t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                r = subprocess.run([sys.executable, __file__, "--point", op, axis, str(size),
                                    "--new-tokens", str(args.new_tokens), "--attn", attn], env=env,
                                   capture_output=True, text=True)
                lines = [ln for ln in r.stdout.splitlines() if ln.startswith("POINT ")]
                if r.returncode or not lines:
                    sys.stderr.write(r.stderr[-3000:])
                    raise SystemExit(f"point {axis}/{op}/{size}/{attn} failed (exit {r.returncode})")
                p = json.loads(lines[-1][6:])
                p["wall_with_load_s"] = time.perf_counter() - t0
                cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child's own CPU time, load included:
                p["child_cpu_s"] = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime  # less load-sensitive
                p["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                data["points"].append(p)
                data.update(summarize(data))
                _atomic_write(out, data)
                print(f"{axis:8s} {op:12s} {attn:5s} {size:5d}: {p['seconds']:8.2f} s  +{p['mem_growth_mb']:7.1f} MB  "
                      f"({p['tokens_per_prompt']:.0f} tok/prompt, load {p['load_average'][0]:.1f})", flush=True)
    data.update(summarize(data))
    data["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data["session_seconds"] = time.perf_counter() - t_all
    loads = [p["load_average"][0] for p in data["points"]]
    data["load_average_1min"] = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
    _atomic_write(out, data)
    plot(data["series"], png)
    for k, s in data["series"].items():
        print(f"{k:22s} time slope {s['time_slope']:.2f} (last segment {s['time_slope_last_segment']:.2f}), "
              f"memory slope {s['mem_slope']:.2f}, up to {s['max_size']}")
    print(f"points {len(data['points'])}; this session {data['session_seconds']:.0f} s; machine {data['machine']}; "
          f"1-min load average {data['load_average_1min']}; figure {png}")
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in data["result"].items()))


def compare_attn(lengths: list[int], reps: int, out: Path, qk_fix: bool = False) -> None:
    """Eager (bridge) vs SDPA (plain modules) for capture, attribution and patching on one pair of
    each length in ``lengths``, in one process: interleaved repeats (order alternating), medians,
    results compared; the slope between the two largest lengths is measured under the same load.

    With ``qk_fix``, only the AtP* QK fix is timed instead (attribution of ``q``/``k`` nodes with
    ``qk_fix=True``), which reads the attention pattern: ``attn="auto"`` must run it eager, so
    "sdpa" there is the automatic fallback (``meta["attn"]`` is recorded)."""
    from emolens import capture
    from emolens.attribution import attribute
    from emolens.patching import patch

    m, tok, bos, metric, sites, cand = _setup()

    seen_attn: dict = {}

    def qk(a, b, attn):
        r = attribute(m, a, b, metric, nodes=("q", "k"), qk_fix=True, chat=False, progress=False, attn=attn)
        seen_attn[attn] = r["q"].meta["attn"]
        return {k: v.scores for k, v in r.items()}

    def fns(n_tokens: int) -> dict:
        a, b = _texts(tok, bos, n_tokens, 1, True)
        if qk_fix:
            return {"attribution_qkfix": lambda attn: qk(a, b, attn)}
        return {
            "capture": lambda attn: capture(m, a, sites, pos="last", reduce="mean", chat=False, progress=False,
                                            attn=attn).data,
            "attribution": lambda attn: {k: r.scores for k, r in attribute(
                m, a, b, metric, nodes=("resid", "heads"), chat=False, progress=False, attn=attn).items()},
            "patching": lambda attn: {"heads": patch(m, a, b, metric, nodes="heads", candidates=cand, chat=False,
                                                     progress=False, attn=attn).scores},
        }

    runs = {T: fns(T) for T in lengths}
    for f in fns(PROMPT_TOKENS).values():  # first-call costs
        for attn in ("eager", "auto"):
            f(attn)
    ops = list(runs[lengths[0]])
    times = {(T, op, a): [] for T in lengths for op in ops for a in ("eager", "auto")}
    first: dict = {}
    for r in range(reps):
        for T in lengths:
            for op in ops:
                for attn in (("eager", "auto") if r % 2 == 0 else ("auto", "eager")):
                    t0 = time.perf_counter()
                    res = runs[T][op](attn)
                    times[(T, op, attn)].append(time.perf_counter() - t0)
                    first.setdefault((T, op, attn), res)
                    print(f"rep {r} T={T:5d} {op:12s} {attn:5s} {times[(T, op, attn)][-1]:7.2f} s "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows: dict = {}
    Tmax = max(lengths)
    for T in lengths:
        for op in ops:
            e, s_ = first[(T, op, "eager")], first[(T, op, "auto")]
            absd = max(float((s_[k] - e[k]).nan_to_num().abs().max()) for k in e)
            rel = max(float((s_[k] - e[k]).nan_to_num().abs().max() / (e[k].nan_to_num().abs().max() + 1e-12))
                      for k in e)
            me, ms = med[(T, op, "eager")], med[(T, op, "auto")]
            rows[f"{op}/{T}"] = {"eager_s": times[(T, op, "eager")], "sdpa_s": times[(T, op, "auto")],
                                 "eager_median_s": me, "sdpa_median_s": ms, "speedup": me / ms,
                                 "max_abs_diff": absd, "max_rel_diff": rel,
                                 "max_abs_value": max(float(e[k].nan_to_num().abs().max()) for k in e)}
            print(f"T={T:5d} {op:12s} eager {me:7.2f} s  sdpa {ms:7.2f} s  speedup {me / ms:5.2f}  "
                  f"max abs diff {absd:.1e} (rel. to the largest value {rel:.1e})")
    slopes = {}
    if len(lengths) > 1:
        T0 = sorted(lengths)[-2]
        for op in ops:
            for a, name in (("eager", "eager"), ("auto", "sdpa")):
                slopes[f"{op}_{name}"] = math.log(med[(Tmax, op, a)] / med[(T0, op, a)]) / math.log(Tmax / T0)
        print("slopes " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items()) + f" ({T0} -> {Tmax} tokens)")
    data = {"benchmark": "scaling --compare-attn" + (" --qk-fix" if qk_fix else ""), "lengths": lengths, "reps": reps,
            "rows": rows, "attn_ran": seen_attn,
            "slopes_last_segment": slopes, "machine": _machine(), "load_average_end": os.getloadavg(),
            "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "workload": "one pair per length (capture: its clean text); capture = mean resid_post at all 30 "
                        "layers at t*; attribution = AtP resid x position + 270 heads; patching = 9 heads of "
                        "layer 15; timed calls interleaved eager/sdpa with alternating order, medians"}
    _atomic_write(out, data)
    print(f"raw timings: {out}")
    print("RESULT " + " ".join(f"sdpa_speedup_{op}_{Tmax}={rows[f'{op}/{Tmax}']['speedup']:.2f}" for op in ops)
          + "".join(f" seq_slope_{k}={v:.2f}" for k, v in slopes.items())
          + "".join(f" capture_max_rel_diff={max(r['max_rel_diff'] for k, r in rows.items() if k.startswith('capture')):.1e}"
                    for _ in [0] if not qk_fix)
          + f" scores_max_abs_diff={max(r['max_abs_diff'] for k, r in rows.items() if not k.startswith('capture')):.1e}"
          + (f" qkfix_attn_auto={seen_attn.get('auto')}" if qk_fix else ""))


def table(data: dict) -> str:
    """Markdown table of every series: sizes, seconds, tokens/s and memory growth (first -> last), slopes."""
    rows = ["| series | sizes | seconds (first → last) | prompt tokens/s at the largest | slope of log time (3 largest; "
            "last segment) | peak memory growth MB (first → last) | slope of log memory |",
            "|---|---|---|---|---|---|---|"]
    for key, s in summarize(data)["series"].items():
        axis, op = key.split("/")
        last = max((p for p in data["points"] if _series_key(p) == key), key=lambda p: p["size"])
        tps = last["n_prompts"] * last["tokens_per_prompt"] / last["seconds"]
        op = op.replace("@", " (") + ")" if "@" in op else op
        rows.append(f"| {'prompts' if axis == 'prompts' else 'tokens'} / {op} | {', '.join(map(str, s['sizes']))} | "
                    f"{s['seconds'][0]:.2f} → {s['seconds'][-1]:.1f} | {tps:.0f} | {s['time_slope']:.2f}; "
                    f"{s['time_slope_last_segment']:.2f} | {s['mem_growth_mb'][0]:.0f} → {s['mem_growth_mb'][-1]:.0f} | "
                    f"{s['mem_slope']:.2f} |")
    return "\n".join(rows)


def plot(series: dict, path: Path) -> None:
    """Four log-log panels (time / peak memory growth vs prompt count / sequence length), with Pillow."""
    from PIL import Image, ImageDraw

    W, H, pad = 1200, 820, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    colors = {"capture": (31, 119, 180), "attribution": (255, 127, 14), "patching": (44, 160, 44),
              "generate": (214, 39, 40)}
    panels = [("prompts", "seconds", "time (s) vs prompt count (16 tokens each)"),
              ("seq_len", "seconds", "time (s) vs sequence length (1 prompt)"),
              ("prompts", "mem_growth_mb", "peak memory growth over the loaded model (MB) vs prompt count"),
              ("seq_len", "mem_growth_mb", "peak memory growth over the loaded model (MB) vs sequence length")]
    pw, ph = W // 2, H // 2
    for k, (axis, key, title) in enumerate(panels):
        x0, y0 = (k % 2) * pw + pad, (k // 2) * ph + 40
        x1, y1 = (k % 2 + 1) * pw - 20, (k // 2 + 1) * ph - 50
        d.text((x0, y0 - 30), title, fill="black")
        d.rectangle([x0, y0, x1, y1], outline="black")
        names = [n for op in OPS for n in (op, op + "@eager") if f"{axis}/{n}" in series]
        pts = {op: list(zip(series[f"{axis}/{op}"]["sizes"], [max(y, 1.0 if key != "seconds" else 1e-3)
                                                              for y in series[f"{axis}/{op}"][key]]))
               for op in names}
        xs = [x for v in pts.values() for x, _ in v]
        ys = [y for v in pts.values() for _, y in v]
        if not xs:
            continue
        lx0, lx1 = math.log10(min(xs)), math.log10(max(xs)) + 1e-9
        ly0, ly1 = math.log10(min(ys)), math.log10(max(ys)) + 1e-9
        if ly1 - ly0 < 1:
            ly0 -= 0.5
            ly1 += 0.5
        if lx1 - lx0 < 0.5:
            lx1 += 0.5

        def X(x):
            return x0 + (math.log10(x) - lx0) / (lx1 - lx0) * (x1 - x0)

        def Y(y):
            return y1 - (math.log10(y) - ly0) / (ly1 - ly0) * (y1 - y0)

        for x in sorted(set(xs)):  # a tick at every measured size
            d.line([X(x), y1, X(x), y1 + 5], fill="black")
            d.text((X(x) - 3 * len(f"{x:g}"), y1 + 8), f"{x:g}", fill="black")
        for e in range(math.floor(ly0), math.ceil(ly1) + 1):
            for f in ((1, 2, 5) if ly1 - ly0 < 3 else (1,)):
                yv = f * 10 ** e
                if ly0 <= math.log10(yv) <= ly1:
                    d.line([x0 - 5, Y(yv), x0, Y(yv)], fill="black")
                    d.line([x0, Y(yv), x1, Y(yv)], fill=(235, 235, 235))
                    d.text((x0 - 50, Y(yv) - 6), f"{yv:g}", fill="black")
        if key == "seconds":  # slope-1 guides (dashed grey) ending at each series' largest point
            for v in pts.values():
                xb, yb = v[-1]
                xa = max(min(xs), xb / 10 ** (ly1 - ly0))
                for s in range(12):
                    fa, fb = s / 12, (s + 0.5) / 12
                    pa = xa * (xb / xa) ** fa
                    pb = xa * (xb / xa) ** fb
                    if yb * pa / xb >= 10 ** ly0:
                        d.line([X(pa), Y(yb * pa / xb), X(pb), Y(yb * pb / xb)], fill=(185, 185, 185), width=1)
            d.text((x0 + 8, y0 + 8), "dashed grey: slope 1 (linear) through each largest point", fill=(120, 120, 120))
        for j, (op, v) in enumerate(pts.items()):
            c = colors[op.split("@")[0]]
            if "@" in op:  # the eager-attention series: same hue, lighter
                c = tuple((x + 2 * 255) // 3 for x in c)
            xy = [(X(x), Y(y)) for x, y in v]
            if len(xy) > 1:
                d.line(xy, fill=c, width=2)
            for px, py in xy:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
            sk = "time_slope" if key == "seconds" else "mem_slope"
            lab = f"{op.replace('@', ', ')} (slope {series[f'{axis}/{op}'][sk]:.2f})"
            d.text((x1 - 200, y1 - 16 - 14 * (len(pts) - 1 - j)) if key == "seconds" else (x1 - 200, y0 + 8 + 14 * j),
                   lab, fill=c)
    d.text((pad, H - 22), "slopes: least squares of log y on log size over the 3 largest sizes; "
           "SmolLM2-135M-Instruct fp32, 1 CPU thread; each point in a fresh process; wall time on a shared CPU "
           "(see docs/performance.md for its noise)", fill=(90, 90, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    main()
