"""Shared helpers for benchmarks: timing, peak RSS, a plain HF reference model, raw-timing JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

os.environ.setdefault("EMOLENS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread by default: on a shared CPU, OpenMP threads fighting other processes made forwards
# 5-20x slower and ratios erratic. Both sides of every ratio run under the same setting.
torch.set_num_threads(int(os.environ.get("EMOLENS_BENCH_THREADS", "1")))


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


RAW: dict[str, list[float]] = {}  # every timing taken by interleaved(), for the JSON record


def interleaved(fns: dict[str, Callable[[], object]], repeat: int = 5, warmup: int = 1,
                tag: str = "") -> dict[str, float]:
    """Median times of several functions run alternately (fair under background load).

    The raw times are kept in ``RAW`` under ``tag + name`` (see :func:`write_json`).
    """
    for f in fns.values():
        for _ in range(warmup):
            f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    for k, v in ts.items():
        RAW[tag + k] = v
    return {k: statistics.median(v) for k, v in ts.items()}


def paired_ratios(ref: Callable[[], object], fns: dict[str, Callable[[], object]], repeat: int = 5,
                  tag: str = "") -> tuple[dict[str, float], dict[str, float]]:
    """Median of per-pair time ratios ``fn / ref``, each pair run back to back (order alternating).

    On a shared CPU the load drifts over minutes; pairing each run with a reference run next to it
    cancels the drift that separate medians would keep. Returns ``(median ratios, median seconds)``;
    raw times go to ``RAW``.
    """
    ref()  # warm-up
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    refs: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeat):
        for k, f in fns.items():
            order = ((refs[k], ref), (ts[k], f)) if r % 2 == 0 else ((ts[k], f), (refs[k], ref))
            for store, g in order:
                t = time.perf_counter()
                g()
                store.append(time.perf_counter() - t)
    for k in fns:
        RAW[tag + k] = ts[k]
        RAW[tag + k + "__ref"] = refs[k]
    ratios = {k: statistics.median([a / b for a, b in zip(ts[k], refs[k])]) for k in fns}
    secs = {k: statistics.median(ts[k]) for k in fns} | {"ref": statistics.median(sum(refs.values(), []))}
    return ratios, secs


def write_json(name: str, result: dict, **extra) -> Path:
    """Write ``benchmarks/results/<name>.json``: the RESULT values, every raw timing, machine, date."""
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    data = {"benchmark": name, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "load_average": os.getloadavg(), "result": result, "raw_seconds": RAW, **extra}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, out)
    return out


def rss_mb() -> float:
    """Current resident set size (MB), from /proc (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def plain_hf(name: str = "smollm2-135m-instruct"):
    """An un-bridged transformers model with the same weights (default attention implementation)."""
    from transformers import AutoModelForCausalLM

    import emolens
    from emolens.model import cache_dir

    emolens.load_model(name)  # make sure the safetensors cache exists
    # plain modules, as emolens loads them (transformers >= 5.25 would otherwise default to Hub kernels)
    return AutoModelForCausalLM.from_pretrained(cache_dir() / "models" / name, dtype=torch.float32,
                                                use_kernels=False).eval()


PROMPTS = [
    "I just got back from a long trip and the house feels quiet.",
    "My sister called to say she is moving to another city next month.",
    "The train was delayed again, so I missed the first half of the meeting.",
    "We finally finished painting the kitchen after three weekends of work.",
    "A friend I hadn't heard from in years sent me a letter yesterday.",
    "The doctor wants to run a few more tests before the results come in.",
    "Our team presented the project to the whole company this morning.",
    "I found an old photo album while cleaning out the attic.",
]
