"""The ``emolens`` command line.

Subcommands register themselves in :data:`COMMANDS`; each gets ``--help`` text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}
# Example command lines per subcommand, shown in its --help epilog; tests/test_cli.py runs every one of them.
EXAMPLES: dict[str, list[str]] = {}


def command(name: str, help: str, examples: list[str] | tuple[str, ...] = ()):
    """Register ``fn(args) -> exit code`` with an ``add_args(parser)`` companion and --help examples."""
    def deco(add_args):
        def wrap(run):
            COMMANDS[name] = (help, add_args, run)
            EXAMPLES.setdefault(name, []).extend(examples)
            return run
        return wrap
    return deco


def _epilog(name: str) -> str | None:
    ex = EXAMPLES.get(name)
    return "examples:\n" + "\n".join(f"  {e}" for e in ex) if ex else None


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one subcommand: its own options, its description and its examples."""
    help_, add_args, _ = COMMANDS[name]
    p = argparse.ArgumentParser(prog=f"emolens {name}", description=help_, epilog=_epilog(name),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return p


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name (default: smollm2-135m-instruct; tiny-llama, "
                   "tiny-qwen2, tiny-gemma3, or any Hugging Face id / local directory)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the error names the option and the fix)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass a whole number >= 1, e.g. 10") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive count; pass a whole number >= 1, e.g. 10")
    return v


def _info_args(p):
    _model_arg(p)


@command("info", "print the model's dimensions and hook names", examples=[
    "emolens info",
    "emolens info --model Qwen/Qwen2.5-7B-Instruct --device cuda",
])(_info_args)
def _info(args) -> int:
    import emolens

    m = emolens.load_model(args.model, device=args.device)
    for k, v in m.info().items():
        print(f"{k:12s} {v}")
    print("sites        resid_pre/mid/post.L, attn_out.L, mlp_out.L, head.L.H, neuron.L.N "
          f"(L < {m.n_layers}, H < {m.n_heads}, N < {m.d_mlp})")
    return 0


def _demo_args(p):
    _model_arg(p)
    p.add_argument("--prompt", default="Tell me how you feel about the weekend.")
    p.add_argument("--max-new-tokens", type=int, default=40)


@command("demo", "chat once unsteered and once with a steering intervention", examples=[
    'emolens demo --prompt "Tell me about your day." --max-new-tokens 20',
])(_demo_args)
def _demo(args) -> int:
    import emolens
    from emolens import Pos, capture, resid
    from emolens.interventions import Add

    m = emolens.load_model(args.model, device=args.device)
    layer = m.n_layers // 4
    joy = ["I'm so happy and grateful, this is wonderful!", "What a delightful, joyful day with friends!"]
    flat = ["I'm here and this is a statement.", "What a regular, ordinary day with people."]
    site = resid(layer)
    v = (capture(m, joy, site, chat=False)[site] - capture(m, flat, site, chat=False)[site])
    base = m.generate([args.prompt], max_new_tokens=args.max_new_tokens)[0]
    steered = m.generate([args.prompt], max_new_tokens=args.max_new_tokens,
                         interventions=[Add(site, v, strength=1.0, pos=Pos.all())])[0]
    print(f"model: {m!r}\nprompt: {args.prompt}\n\n[unsteered]\n{base}\n\n"
          f"[steered: +1 x (joy - neutral) at {site}, every position]\n{steered}")
    return 0


def _pipeline(name: str):
    """Import ``emolens.pipelines.<name>``; None when that pipeline is not part of this build."""
    import importlib

    mod_name = f"emolens.pipelines.{name}"
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name in (mod_name, "emolens.pipelines"):
            return None
        raise


def _run_args(p):
    _model_arg(p)
    from emolens.pipelines.options import add_run_folder_args

    add_run_folder_args(p, overwrite_with_resume="continue it under changed options (changed steps recompute)")
    p.add_argument("--quick", action="store_true", help="small data and few tokens: a fast smoke run")
    p.add_argument("--only", choices=("paper1", "paper2", "overview"), default=None,
                   help="run only one pipeline (overview = the built-in model overview)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from emolens.pipelines.options import add_data_args

    from .scale import add_backend_args

    add_data_args(p, ("paper1", "paper2"))
    add_backend_args(p)


def _pipeline_config(name: str, mod, m, args, overrides: dict):
    """The pipeline's configuration: defaults, then ``--quick``, then ``--config`` and the data options, so
    a field the user sets explicitly wins over the quick preset (``None`` for a pipeline without one)."""
    from emolens.pipelines import options

    if name == "paper1" and hasattr(mod, "Paper1Config"):
        base = mod.Paper1Config()
    elif name == "paper2" and hasattr(mod, "Paper2Config"):
        base = mod.Paper2Config.for_model(m)
    else:
        return None
    return options.apply(base.quick() if args.quick else base, name, args, overrides)


@command("run", "run the pipelines on a model and write a self-contained report.html into a new run folder",
         examples=[
             "emolens run --quick --out runs --name first",
             "emolens run --quick --only paper2 --out runs --name circuits --no-progress",
             "emolens run --model meta-llama/Llama-3.1-8B-Instruct --device cuda --out runs --name llama8b",
         ])(_run_args)
def _run(args) -> int:
    import time

    import emolens
    from emolens import report
    from emolens.pipelines import options
    from emolens.pipelines.engine import RunFolder, model_fingerprint

    progress = not args.no_progress
    t0 = time.time()
    m = emolens.load_model(args.model, device=args.device)
    wanted = [args.only] if args.only else ["paper1", "paper2"]
    overrides = options.read_config_file(args.config, ("paper1", "paper2"))
    configs, mods, missing = {}, {}, []
    for name in wanted:
        if name == "overview":
            continue
        mod = _pipeline(name)
        if mod is None or not hasattr(mod, "run"):
            missing.append(name)
            continue
        mods[name] = mod
        cfg = _pipeline_config(name, mod, m, args, overrides)
        if cfg is not None:
            configs[name] = cfg
    for name, cfg in configs.items():  # bad data files fail before a run folder exists
        if hasattr(mods[name], "check_data"):
            mods[name].check_data(cfg)
    settings = {"quick": args.quick, "only": args.only or "all", "device": str(m.device), "dtype": str(m.dtype)}
    identity = {"command": "run", "model": model_fingerprint(m), "quick": args.quick, "only": args.only or "all",
                "config": {k: v.to_dict() for k, v in configs.items()}}
    with RunFolder.open(args.out, args.name, identity, resume=args.resume, overwrite=args.overwrite) as rf:
        run_dir = rf.path
        print(f"emolens run -> {run_dir}", flush=True)
        sections, failure = [], None
        from .scale import config_from_args, use_backend

        # None = local; a pipeline step records its finished shards in RUN/paperN/.shards/STEP (RUN/scale: others)
        backend = config_from_args(args, run_dir / "scale")
        if backend is not None:
            settings["backend"] = f"{backend.backend} ({backend.address or 'local cluster'})"
        for name, mod in mods.items():
            print(f"[{name}] running", flush=True)
            try:
                kw = {"config": configs[name]} if name in configs else {"quick": args.quick}
                if name in configs:
                    kw["on_step"] = (lambda n: (lambda e: rf.step_done(n, e)))(name)
                with use_backend(backend):  # evaluation generations shard over Ray workers
                    sections += list(mod.run(m, run_dir, progress=progress, **kw))
            except Exception as e:  # noqa: BLE001 - report what finished, then fail loudly
                import traceback

                from emolens.sections import Section

                failure = e
                sections.append(Section(f"{name} failed", text=[f"{type(e).__name__}: {e}",
                                                                "".join(traceback.format_exc(limit=6))]))
                break
        if missing:
            settings["not in this build"] = ", ".join(missing)
        if args.only == "overview" or (missing and not sections):
            if missing:
                print(f"pipelines not available in this build: {', '.join(missing)}; writing the built-in model "
                      "overview", flush=True)
            sections = report.overview_sections(m, quick=args.quick, progress=progress, settings=settings) + sections
        else:
            sections = [report.model_info_section(m, settings)] + sections
        meta = report.run_metadata(m, settings, command="emolens run", elapsed_s=round(time.time() - t0, 1))
        path = report.write_report(sections, run_dir, title=f"emolens report: {m.name}", meta=meta, model_info=m.info())
        print(f"report: {path.resolve()}")
        if failure is not None:
            raise failure  # the run folder records "failed" and the error (RunFolder.__exit__)
        return 0


def _report_args(p):
    p.add_argument("run_dir", help="a run folder written by `emolens run`")
    p.add_argument("--output", default=None, help="write the HTML here instead of RUN_DIR/report.html")


@command("report", "re-render report.html from a run folder's saved results", examples=[
    "emolens report runs/first",
    "emolens report runs/first --output first.html",
])(_report_args)
def _report(args) -> int:
    from emolens import report

    path = report.rerender(args.run_dir, out=args.output)
    print(f"report: {Path(path).resolve()}")
    return 0


def _pipeline_args(pipeline: str, fn: str):
    """``add_args`` of a command whose options the pipeline declares (``emolens.pipelines.<pipeline>.<fn>``)."""
    def add_args(p: argparse.ArgumentParser) -> None:
        mod = _pipeline(pipeline)
        if mod is not None and hasattr(mod, fn):
            getattr(mod, fn)(p)
        else:  # not in this build: accept anything, the command then says what is missing
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return add_args


def _delegate(pipeline: str, fn: str, what: str, args) -> int:
    from .errors import MissingDependencyError

    mod = _pipeline(pipeline)
    if mod is None or not hasattr(mod, fn):
        raise MissingDependencyError(f"`emolens {what}` needs emolens.pipelines.{pipeline}.{fn}, which this build "
                                     "does not have yet; update emolens or use the Python API.")
    return getattr(mod, fn)(args) or 0


@command("steer", "emotion vectors and steering (paper 1): build vectors, steer a chat", examples=[
    'emolens steer --model tiny-llama --prompt hello',
    'emolens steer --prompt "How was your weekend?" --emotion joy --max-new-tokens 30',
    'emolens steer --emotion anger --layer 3 --strength 0.2 --mode norm --position generated',
    'emolens steer --emotion joy --save-gguf joy.gguf',
    'emolens steer --vectors joy.gguf --mode rms --strength 0.5',
    'emolens steer --run runs/first --prompt "How was your weekend?"',
    'emolens steer --prompt "How was your weekend?" --emotion joy --out runs --name weekend',
    'emolens steer --prompt "How was your weekend?" --emotion joy --resume runs/weekend',
])(_pipeline_args("paper1", "add_steer_args"))
def _steer(args) -> int:
    return _delegate("paper1", "steer_cli", "steer", args)


@command("circuit", "emotion circuits (paper 2): score neurons/heads, build and test a circuit", examples=[
    'emolens circuit --quick --out runs --name circuits-quick',
    'emolens circuit --model meta-llama/Llama-3.2-3B-Instruct --device cuda --paper',
])(_pipeline_args("paper2", "add_circuit_args"))
def _circuit(args) -> int:
    return _delegate("paper2", "circuit_cli", "circuit", args)


def _attribute_args(p):
    _model_arg(p)
    p.add_argument("--clean", required=True, help="clean prompt (raw text)")
    p.add_argument("--corrupted", required=True, help="corrupted prompt with the same number of tokens")
    p.add_argument("--target", required=True, help="answer token text for the clean prompt, e.g. ' happy'")
    p.add_argument("--foil", required=True, help="answer token text for the corrupted prompt, e.g. ' sad'")
    p.add_argument("--chat", action="store_true", help="wrap the prompts in the chat template")
    from emolens.pipelines.options import add_run_folder_args

    add_run_folder_args(p, overwrite_with_resume="continue it under changed options",
                        resume_help="reuse the attribution saved in the run folder DIR when the model and options "
                                    "match (refused otherwise unless --overwrite)")
    p.add_argument("--top", type=_positive_int, default=10, help="rows in the top-component tables (>= 1)")
    p.add_argument("--method", default="atp", choices=("atp", "atp*", "ig"),
                   help="attribution patching, AtP* (QK fix + GradDrop) or integrated gradients (default: atp)")
    p.add_argument("--nodes", default="resid,heads,neurons,sublayers",
                   help="comma-separated node groups: resid, heads, neurons, sublayers, q, k, v, edges")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("attribute", "attribution patching for a clean/corrupted prompt pair; writes heatmaps to a small report",
         examples=[
             "emolens attribute --clean 'I feel so happy' --corrupted 'I feel so angry' --target ' today' "
             "--foil ' now' --out runs --name attr",
             "emolens attribute --clean 'I feel so happy' --corrupted 'I feel so angry' --target ' today' "
             "--foil ' now' --method 'atp*' --nodes resid,heads --top 5 --out runs --name attr-star",
         ])(_attribute_args)
def _attribute(args) -> int:
    import pandas as pd

    import emolens
    from emolens import report, viz
    from emolens.sections import Section

    from dataclasses import dataclass

    from emolens.pipelines.engine import PipelineConfig, RunFolder, Step, model_fingerprint, run_steps

    @dataclass
    class AttributeConfig(PipelineConfig):
        clean: str = ""
        corrupted: str = ""
        target: str = ""
        foil: str = ""
        chat: bool = False
        method: str = "atp"
        nodes: str = ""

    cfg = AttributeConfig(args.clean, args.corrupted, args.target, args.foil, bool(args.chat), args.method, args.nodes)
    m = emolens.load_model(args.model, device=args.device)
    identity = {"command": "attribute", "model": model_fingerprint(m), "config": cfg.to_dict()}
    with RunFolder.open(args.out, args.name, identity, resume=args.resume, overwrite=args.overwrite) as rf:
        run_dir = rf.path
        # one engine step: a resumed folder reuses the saved attribution when model and options match
        step = Step("attribution", lambda ctx: {"attribution": _attribution_results(ctx.model, args) or
                                                {"_empty": {}}}, config=tuple(cfg.to_dict()))
        ctx = run_steps([step], m, cfg, run_dir / "attribute", progress=not args.no_progress, label="attribute",
                        on_step=lambda e: rf.step_done("attribute", e))
        results = ctx.load("attribution")
        results = results if isinstance(results, dict) and "_empty" not in results else {}
        if not results:
            raise emolens.InputError(f"Attribution returned no results for nodes {args.nodes!r}.")
        first = next(iter(results.values()))
        sec = Section("Attribution patching")
        sec.add_text(f"clean: {args.clean!r}", f"corrupted: {args.corrupted!r}",
                     f"metric: {first.meta.get('metric', '?')}; method: {first.meta.get('method', args.method)}; "
                     f"target {args.target!r}, foil {args.foil!r}")
        for name, res in results.items():
            try:
                sec.add_figure(name, viz.plot(res))
            except emolens.ResultError as e:
                sec.add_text(f"{name}: no plot ({e})")
            if res.scores.numel():
                sec.add_table(f"Top {name}", pd.DataFrame(res.top(min(args.top, res.scores.numel()))))
            sec.results[name] = res
        settings = {"clean": args.clean, "corrupted": args.corrupted, "target": args.target, "foil": args.foil,
                    "chat": args.chat, "method": args.method, "nodes": args.nodes}
        path = report.write_report([report.model_info_section(m), sec], run_dir, title=f"emolens attribution: {m.name}",
                                   meta=report.run_metadata(m, settings, command="emolens attribute"),
                                   model_info=m.info())
        for name, res in results.items():
            if res.scores.numel():
                t = res.top(1)[0]
                print(f"{name:10s} top: " + ", ".join(f"{k}={v}" for k, v in t.items()))
        print(f"report: {path.resolve()}")
        return 0


def _attribution_results(m, args) -> dict:
    """Attribution via emolens.attribution; the built-in gradient estimate when that module is absent."""
    from emolens import report
    from emolens.errors import EmolensError

    try:
        from emolens import attribution, metrics
    except ImportError:
        attribution = metrics = None
    if attribution is None or not hasattr(attribution, "attribute"):
        if args.chat:
            from .errors import InputError

            raise InputError("--chat needs emolens.attribution, which this build does not have; drop --chat.")
        a = report._gradient_attribution(m, args.clean, args.corrupted, args.target, args.foil)
        return {k: a[k] for k in ("resid", "heads", "neurons", "sublayers")}
    try:  # single-token answers: logit difference at t*; otherwise teacher-forced log-prob difference
        metric = metrics.logit_diff(m, args.target, args.foil)
    except EmolensError:
        metric = metrics.continuation_logprob_diff(m, args.target, args.foil)
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    return dict(attribution.attribute(m, [args.clean], [args.corrupted], metric, nodes=nodes, method=args.method,
                                      chat=args.chat, progress=not args.no_progress))


def _top_parser() -> argparse.ArgumentParser:
    """``emolens --help``: the list of subcommands (their options live in their own parsers)."""
    lines = [f"  emolens {n} --help" for n in COMMANDS]
    p = argparse.ArgumentParser(prog="emolens", description="Find and control emotion in language models.",
                                usage="emolens COMMAND [options ...]",
                                epilog="every command has its own options and examples:\n" + "\n".join(lines),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", title="commands")
    for name, (help_, _, _) in COMMANDS.items():
        sub.add_parser(name, help=help_)
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``emolens COMMAND ARGS...``: ARGS go to COMMAND's own parser unchanged and in order."""
    from .errors import EmolensError

    # Import modules that register further commands.
    for mod in ("emolens.pipelines.cli_commands",):
        try:
            __import__(mod)
        except ImportError:
            pass
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            top.print_usage(sys.stderr)
            top.exit(2, "emolens: error: name a command, e.g. `emolens run --quick`; see `emolens --help`\n")
        top.print_help()
        top.exit(0)  # like every subcommand's --help
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    args = build_parser(name).parse_args(rest)
    args.cmd = name
    try:
        return COMMANDS[name][2](args) or 0
    except EmolensError as e:
        print(f"emolens: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
