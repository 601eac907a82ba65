"""Scale-out on Ray: the same sweep locally and over 2 Ray workers, faults, and scaling curves.

RESULT ray_vs_local_equal = Ray results == local results on the same inputs (greedy replies of the
                            evaluation-generation sweep and float64 capture means, bitwise)
       resume_equal       = a driver killed (SIGKILL) part-way, then a rerun with resume: finished
                            shards are loaded, not recomputed, and the replies equal the local ones
       worker_kill_equal  = one Ray worker killed (SIGKILL, by pid) mid-sweep; the sweep finishes
                            with replies equal to the local ones
       ray_speedup_2_workers = time(local, 1 thread) / time(Ray, 2 workers x 1 thread), the
                            evaluation-generation sweep on the embedded model (method x emotion x
                            scenario rows, greedy), median of interleaved runs   target >= 1.5

Then prints the scaling curves (time vs prompts, vs workers; tiny and embedded models) as a
markdown table for benchmarks/RESULTS.md. Worker start-up (cluster + model load) is timed apart.

    python benchmarks/sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EMOTIONS = ("joy", "sadness", "anger", "fear")
SCENARIOS = ("My sister called me after two years of silence.", "I got the results of my exam today.",
             "Our neighbour's dog barked all night again.")


def rows(n_rows: int):
    """Evaluation rows: (method, emotion, scenario) -> prompt, emotion label (steering rows carry specs)."""
    out = []
    for method in ("prompting", "steering"):
        for e in EMOTIONS:
            for sc in SCENARIOS:
                if method == "prompting":
                    out.append(([{"role": "system", "content": f"Always reply with {e}."},
                                 {"role": "user", "content": sc}], None))
                else:
                    out.append((sc, e))
    while len(out) < n_rows:
        out = out + out
    return [p for p, _ in out[:n_rows]], [e for _, e in out[:n_rows]]


def specs_for(m, layer: int):
    from emolens import Pos, resid
    from emolens.interventions import Add

    g = torch.Generator().manual_seed(0)
    out = {None: []}
    for e in EMOTIONS:
        v = torch.randn(m.d_model, generator=g)
        out[e] = [Add(resid(layer), v / v.norm(), strength=4.0, pos=Pos.all())]
    return out


def _markers(d) -> list[Path]:
    """The finished shards' markers under the run folder ``d`` (``d/shards/steps/<job>/<index>.json``)."""
    return list((Path(d) / "shards" / "steps").rglob("*.json"))


_DRIVER = """
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
import emolens
from emolens import scale
from emolens.pipelines import paper2
from sweep import rows, specs_for
m = emolens.load_model({model!r}, device="cpu")
prompts, emos = rows({n})
cfg = scale.ScaleConfig(backend="local", shard_size={bs}, run_dir=sys.argv[1])
scale.generate_replies(m, prompts, emos, specs=specs_for(m, {layer}), gen_kwargs={gk!r}, batch_size={bs}, backend=cfg)
print("driver finished")
"""


_CHILD = """
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
import emolens
from emolens.pipelines.paper2 import generate_replies
from sweep import rows, specs_for
m = emolens.load_model({model!r}, device="cpu")
prompts, emos = rows({n})
part, parts, start = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
p, e = prompts[part::parts], emos[part::parts]  # interleaved: both halves mix long and short prompts
specs = specs_for(m, {layer})
while time.time() < start:  # a common start, after every process has loaded the model
    time.sleep(0.01)
t = time.perf_counter()
generate_replies(m, p, e, interventions_for=specs.__getitem__, gen_kwargs={gk!r}, batch_size={bs})
print("SECONDS", time.perf_counter() - t)
"""


def ceiling(model: str, n: int, layer: int, gk: dict, bs: int) -> tuple[float, float]:
    """The machine's own parallel ceiling, without Ray: seconds of 1 plain process doing all rows vs 2 plain
    processes doing half each, started together (each process loads the model before the common start)."""
    code = _CHILD.format(bench=str(Path(__file__).parent), model=model, n=n, layer=layer, gk=gk, bs=bs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", EMOLENS_PROGRESS="0")
    out = []
    for parts in (1, 2):
        start = time.time() + 40
        procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(parts), str(start)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(parts)]
        secs = [float(pr.communicate()[0].split("SECONDS")[-1]) for pr in procs]
        out.append(max(secs))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sweep (smoke run)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import emolens
    from emolens import capture, resid, scale
    from emolens.pipelines.paper2 import generate_replies

    torch.set_grad_enabled(False)
    n_rows = 12 if args.quick else 24
    new_tokens = 8 if args.quick else 12
    bs = 2
    gk = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    m = emolens.load_model(args.model, device="cpu")
    layer = m.n_layers // 3
    specs = specs_for(m, layer)
    prompts, emos = rows(n_rows)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"sweep: {n_rows} rows (method x emotion x scenario) x {new_tokens} new tokens, batch {bs}, {m.name}",
          flush=True)

    def local(p=prompts, e=emos):
        return generate_replies(m, p, e, interventions_for=specs.__getitem__, gen_kwargs=gk, batch_size=bs)

    cfg2 = scale.ScaleConfig(backend="ray", workers=2, shard_size=bs)

    def on_ray(cfg=cfg2, p=prompts, e=emos):
        return scale.generate_replies(m, p, e, specs=specs, gen_kwargs=gk, batch_size=bs, backend=cfg)

    t = time.perf_counter()
    scale.worker_pids(m, cfg2)
    t_start = time.perf_counter() - t
    print(f"Ray start-up (local cluster, 2 actors loading {m.name}): {t_start:.1f} s", flush=True)

    # -- equality and speed, interleaved ---------------------------------------------------------
    ref = local()
    equal = on_ray() == ref
    times: dict[str, list[float]] = {"local": [], "ray2": []}
    for _ in range(args.repeat):
        for k, f in (("local", local), ("ray2", on_ray)):
            t = time.perf_counter()
            out = f()
            times[k].append(time.perf_counter() - t)
            equal &= out == ref
        st = scale.LAST_RUN
        print(f"  local {times['local'][-1]:.2f} s, ray x2 {times['ray2'][-1]:.2f} s (shard compute summed over "
              f"workers {st['worker_seconds']:.2f} s; load {os.getloadavg()[0]:.1f})", flush=True)
    t_local, t_ray = statistics.median(times["local"]), statistics.median(times["ray2"])
    speedup = t_local / t_ray
    cap_prompts = [f"{sc} ({e})" for sc in SCENARIOS for e in EMOTIONS]
    a = capture(m, cap_prompts, [resid(layer), resid(m.n_layers - 1)], batch_size=3, progress=False)
    b = capture(m, cap_prompts, [resid(layer), resid(m.n_layers - 1)], batch_size=3, backend=cfg2)
    cap_equal = all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    print(f"replies equal: {equal}; capture means bitwise equal: {cap_equal}", flush=True)

    # -- a worker killed by its pid mid-sweep ------------------------------------------------------
    with tempfile.TemporaryDirectory() as d:
        cfg_k = scale.ScaleConfig(backend="ray", workers=2, shard_size=bs, run_dir=d)
        pids = scale.worker_pids(m, cfg_k)
        res: dict = {}
        th = threading.Thread(target=lambda: res.update(texts=on_ray(cfg_k)))
        th.start()
        while len(list(_markers(d))) < 1 and th.is_alive():
            time.sleep(0.02)
        n_before = len(list(_markers(d)))
        os.kill(pids[0], signal.SIGKILL)
        th.join()
        kill_equal = res.get("texts") == ref and n_before < len(prompts) // bs - 2
        new_pids = scale.worker_pids(m, cfg_k)
        print(f"worker {pids[0]} killed after {n_before} of {len(prompts) // bs} shards; restarted as "
              f"{[p for p in new_pids if p not in pids]}; replies equal: {kill_equal}", flush=True)

    # -- a driver killed part-way, then resumed on Ray --------------------------------------------
    with tempfile.TemporaryDirectory() as d:
        code = _DRIVER.format(bench=str(Path(__file__).parent), model=args.model, n=n_rows, bs=bs, layer=layer, gk=gk)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", EMOLENS_PROGRESS="0")
        proc = subprocess.Popen([sys.executable, "-c", code, d], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while len(list(_markers(d))) < 2 and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = {p: p.stat().st_mtime_ns for p in _markers(d)}
        cfg_r = scale.ScaleConfig(backend="ray", workers=2, shard_size=bs, run_dir=d)
        t = time.perf_counter()
        out = on_ray(cfg_r)
        t_resume = time.perf_counter() - t
        after = {p: p.stat().st_mtime_ns for p in _markers(d)}
        skipped = all(after.get(p) == v for p, v in before.items())
        resume_equal = out == ref and skipped and 0 < len(before) < len(after)
        print(f"driver killed after {len(before)} of {len(after)} shards; resumed on Ray in {t_resume:.2f} s "
              f"(finished shards reused: {skipped}); replies equal: {out == ref}", flush=True)

    # -- scaling curves ------------------------------------------------------------------------------
    curve = [("embedded", m.name, n_rows, "local", 1, t_local), ("embedded", m.name, n_rows, "ray", 2, t_ray)]
    small_n = n_rows // 2
    p2, e2 = prompts[:small_n], emos[:small_n]
    tl = _time(lambda: local(p2, e2))
    tr = _time(lambda: on_ray(cfg2, p2, e2))
    curve += [("embedded", m.name, small_n, "local", 1, tl), ("embedded", m.name, small_n, "ray", 2, tr)]
    cfg1 = scale.ScaleConfig(backend="ray", workers=1, shard_size=bs)
    scale.worker_pids(m, cfg1)
    curve.append(("embedded", m.name, n_rows, "ray", 1, _time(lambda: on_ray(cfg1))))
    tiny = emolens.load_model("tiny-llama", device="cpu")
    tspecs = specs_for(tiny, 1)
    tgk = {"max_new_tokens": 32, "min_new_tokens": 32}
    for n in ((16, 64) if not args.quick else (16,)):
        tp, te = rows(n)
        f_loc = lambda: generate_replies(tiny, tp, te, interventions_for=tspecs.__getitem__, gen_kwargs=tgk,  # noqa
                                         batch_size=bs)
        curve.append(("tiny", tiny.name, n, "local", 1, _time(f_loc)))
        for w in (2, 1):
            c = scale.ScaleConfig(backend="ray", workers=w, shard_size=bs)
            scale.worker_pids(tiny, c)
            f = lambda c=c: scale.generate_replies(tiny, tp, te, specs=tspecs, gen_kwargs=tgk, batch_size=bs,  # noqa
                                                   backend=c)
            curve.append(("tiny", tiny.name, n, "ray", w, _time(f)))
    scale.shutdown()

    c1, c2 = ceiling(args.model, n_rows, layer, gk, bs)
    print(f"machine ceiling without Ray: 1 process {c1:.2f} s, 2 processes (half the rows each) {c2:.2f} s: "
          f"x{c1 / c2:.2f}; Ray 2 workers reach x{speedup:.2f}", flush=True)
    print("\n| model | rows | backend | workers | seconds | rows/s |\n|---|---|---|---|---|---|")
    for kind, name, n, be, w, sec in curve:
        print(f"| {kind} ({name}) | {n} | {be} | {w} | {sec:.2f} | {n / sec:.2f} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print(f"RESULT ray_vs_local_equal={str(equal and cap_equal).lower()} resume_equal={str(resume_equal).lower()} "
          f"worker_kill_equal={str(kill_equal).lower()} ray_speedup_2_workers={speedup:.2f}")


def _time(f, repeat: int = 1) -> float:
    from _common import timeit  # benchmarks/ is the script's folder, so on sys.path

    return timeit(f, repeat=repeat, warmup=0)


if __name__ == "__main__":
    main()
