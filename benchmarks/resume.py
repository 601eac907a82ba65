"""Kill -9 at random moments of `emolens run --quick` on the embedded model, resume, compare.

1. An uninterrupted run (`emolens run --quick --name ref`), timed.
2. The same command in another folder, SIGKILLed ``--kills`` times: two at fixed points inside file
   writes (``EMOLENS_CRASH_AT=step:publishing``: after the first of a step's files is renamed into place,
   before the rest and before its marker), the others each at a random moment inside a randomly drawn
   unfinished step that is not the last one left (a random fraction of that step's duration in the
   uninterrupted run after its staging folder appears, or at once when its marker appears first), so
   every process dies mid-run whatever the machine's load; after each kill the next process is
   ``emolens run --quick --resume DIR``. A last ``--resume`` finishes the run.
3. Every output file is compared with the uninterrupted run's (tables as data, everything else byte for
   byte), and every step marker's fingerprint and output hashes with the reference's.

Ends with ``RESULT resume_equal=<true|false> stale_reused=<count> killed_points=<n>``: ``stale_reused``
counts steps of the resumed run whose fingerprint or output hashes differ from the uninterrupted run's
(a reused stale output would show here); ``killed_points`` the processes that died by SIGKILL.

Usage: ``python benchmarks/resume.py [--kills 10] [--model smollm2-135m-instruct] [--config FILE] [--ref DIR]``
(``--config``: a JSON file of ``{"paper1": {...}, "paper2": {...}}`` overrides to shrink the run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--config", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="keep the run folders here")
    ap.add_argument("--ref", default=None, help="an uninterrupted run of the same command to compare with (e.g. the "
                    "folder `make run` wrote); default: run one first")
    args = ap.parse_args(argv)
    from emolens.pipelines.engine import diff_outputs

    rng = random.Random(args.seed)
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="emolens-resume-"))
    out.mkdir(parents=True, exist_ok=True)
    for n in ("killed",) if args.ref else ("ref", "killed"):
        shutil.rmtree(out / n, ignore_errors=True)
    base = [sys.executable, "-m", "emolens.cli", "run", "--quick", "--model", args.model, "--device", "cpu",
            "--out", str(out), "--no-progress"] + (["--config", args.config] if args.config else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EMOLENS_PROGRESS="0")
    env.pop("EMOLENS_CRASH_AT", None)

    if args.ref:
        ref = Path(args.ref)
        state = json.loads((ref / "run.json").read_text())
        t_ref = float(state["meta"]["elapsed_s"])
        print(f"uninterrupted run: {ref} ({t_ref:.0f} s)", flush=True)
    else:
        ref = out / "ref"
        t0 = time.time()
        r = subprocess.run(base + ["--name", "ref"], env=env, cwd=ROOT, capture_output=True, text=True)
        t_ref = time.time() - t0
        if r.returncode != 0:
            print(r.stderr[-3000:])
            return 1
        print(f"uninterrupted run: {t_ref:.0f} s", flush=True)
    # the step order and each step's duration, from the uninterrupted run
    order = [(paper, step) for paper in ("paper1", "paper2")
             for step in json.loads((ref / "run.json").read_text()).get("steps", {}).get(paper, {})]
    ref_s = {(paper, step): _marker_seconds(ref, paper, step) for paper, step in order}
    print(f"steps: {len(order)} ({', '.join(f'{p}/{s} {ref_s[p, s]:.0f}s' for p, s in order)})", flush=True)

    killed = out / "killed"
    killed_points, attempts = 0, []
    hooks = ["vectors:publishing", "stats:publishing"]
    for i in range(args.kills):
        cmd = base + (["--name", "killed"] if i == 0 else ["--resume", str(killed)])
        e = dict(env)
        if i < len(hooks):
            e["EMOLENS_CRASH_AT"] = hooks[i]
            p = subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            what = f"at {hooks[i]}"
            p.wait()
        else:
            # a random moment inside a step that is not the last one left: the target is drawn among the first
            # (left - 1) // (kills to go) unfinished steps (so later processes still find steps to kill in);
            # the kill comes a random fraction of the step's reference duration after its staging folder
            # appears, or at once when its marker appears first (the machine ran faster than the reference)
            left = [ps for ps in order if not _done(killed, *ps)]
            span = max(1, (len(left) - 1) // (args.kills - i))
            target = left[rng.randrange(min(span, len(left)))]
            frac = rng.random()
            p = subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            what = _kill_inside(p, killed, target, frac * ref_s[target], frac, left[-1] == target)
        err = p.stderr.read() if p.stderr else ""
        if p.returncode == -signal.SIGKILL:
            killed_points += 1
        elif p.returncode != 0:
            print(err[-3000:])
            return 1
        else:
            what = f"not killed: finished before the kill {what}"
        state = json.loads((killed / "run.json").read_text())
        done = sum(v["status"] in ("computed", "reused") for s in state.get("steps", {}).values() for v in s.values())
        attempts.append((what, p.returncode, done))
        label = what if what.startswith("not killed") else f"killed {what}"
        print(f"process {i + 1}: {label}: rc={p.returncode}, steps recorded so far {done}", flush=True)
    t0 = time.time()
    r = subprocess.run(base + ["--resume", str(killed)], env=env, cwd=ROOT, capture_output=True, text=True)
    print(f"final resume: {time.time() - t0:.0f} s, rc={r.returncode}", flush=True)
    if r.returncode != 0:
        print(r.stderr[-3000:])
        return 1
    if args.ref:  # the same command must have made the reference
        a = json.loads((ref / "run.json").read_text())["identity"]
        b = json.loads((killed / "run.json").read_text())["identity"]
        if a != b:
            print("--ref holds a run of another model or configuration")
            return 1
    diff = diff_outputs(ref, killed)
    stale = 0
    for paper in ("paper1", "paper2"):
        for m in sorted((ref / paper / "steps").glob("*.json")):
            a = json.loads(m.read_text())
            try:
                b = json.loads((killed / paper / "steps" / m.name).read_text())
            except (OSError, ValueError):
                stale += 1
                continue
            if (a["fingerprint"], a["files"]) != (b["fingerprint"], b["files"]):
                stale += 1
                print(f"differs: {paper}/{m.stem}")
    leftovers = list(killed.rglob(".staging")) + list(killed.rglob("*.tmp"))
    print(f"files differing from the uninterrupted run: {diff or 'none'}; leftovers: {leftovers or 'none'}")
    print(f"RESULT resume_equal={'true' if not diff and not leftovers else 'false'} stale_reused={stale} "
          f"killed_points={killed_points}")
    return 0


def _marker_seconds(root: Path, paper: str, step: str) -> float:
    try:
        return float(json.loads((root / paper / "steps" / f"{step}.json").read_text()).get("seconds", 0.0))
    except (OSError, ValueError):
        return 0.0


def _done(root: Path, paper: str, step: str) -> bool:
    """The step has a valid marker (the engine writes markers atomically and last)."""
    try:
        return "fingerprint" in json.loads((root / paper / "steps" / f"{step}.json").read_text())
    except (OSError, ValueError):
        return False


def _kill_inside(p: subprocess.Popen, root: Path, target: tuple[str, str], delay: float, frac: float,
                 last: bool) -> str:
    """SIGKILL ``p`` ``delay`` s after step ``target`` starts (its staging folder appears), or as soon as its
    marker appears, whichever is first; returns where the kill landed."""
    paper, step = target
    staging, began = root / paper / ".staging" / step, None
    while p.poll() is None:
        now = time.time()
        if began is None and (staging.exists() or _done(root, paper, step)):
            began = now
        if _done(root, paper, step):
            p.send_signal(signal.SIGKILL)
            p.wait()
            return f"just after {paper}/{step} finished (its marker appeared before {delay:.1f} s)"
        if began is not None and now - began >= delay:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return f"inside {paper}/{step}, {now - began:.1f} s in ({frac:.2f} of its reference time)"
        time.sleep(0.02)
    return f"inside {paper}/{step}" + (" (the last step)" if last else "")


if __name__ == "__main__":
    sys.exit(main())
