"""Kill -9 at random moments of `emolens run --quick` on the embedded model, resume, compare.

1. An uninterrupted run (`emolens run --quick --name ref`), timed.
2. The same command in another folder, SIGKILLed at ``--kills`` moments: two at fixed points inside file
   writes (``EMOLENS_CRASH_AT=step:publishing``: after the first of a step's files is renamed into place,
   before the rest and before its marker), the others after a random delay; after each kill the next
   process is ``emolens run --quick --resume DIR``. A last ``--resume`` finishes the run.
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
    # startup (imports + model load) before any step runs
    t0 = time.time()
    subprocess.run([sys.executable, "-c", f"import emolens; emolens.load_model({args.model!r}, device='cpu')"],
                   env=env, cwd=ROOT, capture_output=True)
    t_start = time.time() - t0
    print(f"startup: {t_start:.0f} s", flush=True)

    killed = out / "killed"
    killed_points, attempts = 0, []
    hooks = ["vectors:publishing", "stats:publishing"]
    n_random = max(0, args.kills - len(hooks))
    for i in range(args.kills):
        cmd = base + (["--name", "killed"] if i == 0 else ["--resume", str(killed)])
        e = dict(env)
        if i < len(hooks):
            e["EMOLENS_CRASH_AT"] = hooks[i]
            p = subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            what = f"at {hooks[i]}"
            p.wait()
        else:
            # spread the random kills over the run: each process gets its startup plus a random slice
            # (slices short enough that every process is killed before the run can finish, even if the
            # machine got faster than during the reference run)
            delay = t_start + rng.uniform(0.1, 0.9) * (t_ref - t_start) / (n_random + 2)
            p = subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
            what = f"after {delay:.0f} s"
        err = p.stderr.read() if p.stderr else ""
        if p.returncode == -signal.SIGKILL:
            killed_points += 1
        elif p.returncode != 0:
            print(err[-3000:])
            return 1
        else:
            what = f"not killed (finished before {what.split()[-2]} s)" if i >= len(hooks) else what
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


if __name__ == "__main__":
    sys.exit(main())
