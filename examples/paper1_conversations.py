"""Paper 1 end to end: locus by attribution patching, joy/trust vectors, steering, evaluation.

Reimplements "Conversations: Love Them, Hate Them, Steer Them" (arXiv 2505.17413) with emolens
and writes a self-contained ``report.html`` (attribution heatmap over layer × position, vector
norms and cosines per layer, strength curves of joy, trust, first-person rate and perplexity,
the results table) plus the raw results (safetensors / JSON / parquet, a llama.cpp control
vector) into a run folder.

Usage::

    python examples/paper1_conversations.py                     # embedded SmolLM2-135M, CPU, ~15 min
    python examples/paper1_conversations.py --quick             # smoke run, ~2 min
    python examples/paper1_conversations.py --out runs --name p1 --resume   # continue an interrupted run
    # GPU users, the paper's model (needs access to the gated weights):
    python examples/paper1_conversations.py --model meta-llama/Llama-3.1-8B-Instruct --device cuda

Every hyperparameter is a field of ``emolens.pipelines.paper1.Paper1Config``; override any of them
with ``--config overrides.json`` (a JSON object of fields), e.g. ``{"n_heldout": 50}``.
On a busy shared CPU, ``--threads 1`` is often faster than two threads competing for cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name or HF id (default: the embedded smollm2-135m-instruct; "
                   "the paper used meta-llama/Llama-3.1-8B-Instruct)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--out", default="runs", help="folder holding run folders (default: ./runs)")
    p.add_argument("--name", default=None, help="run folder name (default: paper1-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="reuse --name's folder and its finished steps")
    p.add_argument("--quick", action="store_true", help="small smoke run (few tasks, openers and tokens)")
    p.add_argument("--config", default=None, help="JSON file of Paper1Config field overrides")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import torch

    import emolens
    from emolens.pipelines.paper1 import Paper1Config, run

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Paper1Config().quick() if args.quick else Paper1Config()  # the preset first: --config fields win
    if args.config:
        cfg = Paper1Config.from_dict({**cfg.to_dict(), **json.loads(Path(args.config).read_text())})
    try:
        from emolens import report
    except ImportError:  # report module not in this build: plain folder + figure HTML files
        report = None
    name = args.name or time.strftime("paper1-%Y%m%d-%H%M%S")
    run_dir = Path(args.out) / name
    if run_dir.exists() and not args.resume:
        print(f"{run_dir} exists; pass --resume to continue it or choose another --name", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    m = emolens.load_model(args.model, device=args.device)
    print(f"model: {m!r}\nrun folder: {run_dir}", flush=True)
    sections = run(m, run_dir, progress=not args.no_progress, config=cfg, resume=True)
    elapsed = time.time() - t0
    settings = {"quick": args.quick, "threads": torch.get_num_threads(), "config": cfg.to_dict()}
    if report is not None:
        meta = report.run_metadata(m, settings, command="examples/paper1_conversations.py", elapsed_s=round(elapsed, 1))
        path = report.write_report([report.model_info_section(m, settings)] + sections, run_dir,
                                   title=f"Paper 1 (conversations): {m.name}", meta=meta, model_info=m.info())
    else:
        for i, sec in enumerate(sections, 1):
            for j, (cap, fig) in enumerate(sec.figures, 1):
                html = fig if isinstance(fig, str) else fig.to_html(include_plotlyjs=True, full_html=True)
                (run_dir / f"section{i:02d}-figure{j:02d}.html").write_text(html, encoding="utf-8")
        path = run_dir
    acc = json.loads((run_dir / "paper1" / "acceptance.json").read_text())
    main_c = acc["conditions"].get(acc["main"], {})
    if not main_c:
        print(f"\nno steering point passed the fluency guard during calibration; see the report's calibration "
              f"section for the trade-off curves.\nruntime: {elapsed:.0f} s\nreport: {Path(path).resolve()}")
        return 0
    print(f"\nmain condition {acc['main']}: layer {main_c.get('layer')}, strength {main_c.get('strength')}")
    for t in ("joy_trust", "first_person_rate"):
        r = main_c.get(t, {})
        print(f"  {t}: {r.get('baseline', float('nan')):.4f} -> {r.get('mean', float('nan')):.4f} "
              f"(paired t p={r.get('p', float('nan')):.2g}, d_z={r.get('dz', float('nan')):.2f})")
    print(f"  perplexity ratio: {main_c.get('ppl_ratio', float('nan')):.3f}; acceptance "
          f"{'PASSED' if acc['passes'] else 'NOT passed'} (n={acc['n_heldout']} held-out openers)")
    print(f"runtime: {elapsed:.0f} s\nreport: {Path(path).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
