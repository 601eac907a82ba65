"""The ``emolens`` command line.

Subcommands register themselves in :data:`COMMANDS`; each gets ``--help`` text.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``fn(args) -> exit code`` with an ``add_args(parser)`` companion."""
    def deco(add_args):
        def wrap(run):
            COMMANDS[name] = (help, add_args, run)
            return run
        return wrap
    return deco


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name (default: smollm2-135m-instruct; tiny-llama, "
                   "tiny-qwen2, tiny-gemma3, or any Hugging Face id / local directory)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def _info_args(p):
    _model_arg(p)


@command("info", "print the model's dimensions and hook names")(_info_args)
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


@command("demo", "chat once unsteered and once with a steering intervention")(_demo_args)
def _demo(args) -> int:
    import torch

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


def main(argv: list[str] | None = None) -> int:
    from .errors import EmolensError

    # Import modules that register further commands.
    for mod in ("emolens.pipelines.cli_commands",):
        try:
            __import__(mod)
        except ImportError:
            pass
    parser = argparse.ArgumentParser(prog="emolens", description="Find and control emotion in language models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (help_, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.cmd][2](args) or 0
    except EmolensError as e:
        print(f"emolens: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
