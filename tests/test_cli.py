"""The command line: every example command in README.md and in every subcommand's ``--help`` runs.

Examples are parsed out of the text (README code blocks and inline code, the ``examples:`` epilog of
each ``emolens COMMAND --help``), so a new example is tested without touching this file. Each one runs
in-process on the tiny random model in a temporary folder: ``--model`` becomes ``tiny-llama``,
``--device`` ``cpu``, and runs get ``--quick``; the test asserts exit code 0 and the file or stdout the
command promises.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch

from emolens import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-llama"
SCRIPT_OPTS = {"--model", "--device", "--out", "--name", "--quick", "--no-progress", "--config", "--paper"}


def _split(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def readme_commands() -> list[list[str]]:
    """``emolens ...`` and ``python examples/...`` lines of README.md (code blocks and inline code)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines, fences = [], text.split("```")
    for block in fences[1::2]:  # inside fenced code blocks (odd pieces)
        lines += block.replace("\\\n", " ").splitlines()[1:]
    for prose in fences[0::2]:
        lines += re.findall(r"`([^`\n]+)`", prose)
    cmd = re.compile(r"^\$?\s*(emolens\s|emolens$|python examples/)")
    return [_split(re.sub(r"^\$\s*", "", line.strip())) for line in lines if cmd.match(line.strip())]


def help_commands() -> list[list[str]]:
    """The ``examples:`` lines of every subcommand's --help text."""
    out = []
    for name in cli.COMMANDS:
        text = cli.build_parser(name).format_help()
        assert "examples:" in text, f"`emolens {name} --help` shows no examples"
        block = text.split("examples:", 1)[1]
        for line in block.splitlines():
            if line.strip().startswith("emolens "):
                out.append(_split(line.strip()))
    return out


def _dedup(cmds):
    seen, out = set(), []
    for c in cmds:
        if tuple(c) not in seen:
            seen.add(tuple(c))
            out.append(c)
    return out


# Order matters only for speed: a run folder written by an earlier example is reused by a later one.
ALL = _dedup(help_commands() + readme_commands())


def _options(toks: list[str]) -> set[str]:
    if toks[0] == "emolens":
        return {s for a in cli.build_parser(toks[1])._actions for s in a.option_strings}
    return SCRIPT_OPTS


def _set(toks: list[str], opt: str, value: str | None, opts: set[str]) -> list[str]:
    """Replace ``opt``'s value (or append the option when the command takes it)."""
    if opt in toks:
        i = toks.index(opt)
        if value is not None:
            toks[i + 1] = value
        return toks
    return toks + ([opt] + ([value] if value is not None else [])) if opt in opts else toks


def adapt(toks: list[str], tmp: Path) -> list[str]:
    """The example on the tiny model: small, on the CPU, in the temporary folder."""
    toks, opts = list(toks), _options(toks)
    if "--help" in toks or "-h" in toks:
        return toks
    toks = _set(toks, "--model", TINY, opts)
    if "--device" in toks:
        toks = _set(toks, "--device", "cpu", opts)
    if "--dtype" in toks:
        toks = _set(toks, "--dtype", "float32", opts)
    for flag in ("--quick", "--no-progress"):
        toks = _set(toks, flag, None, opts)
    if "--max-new-tokens" in opts:
        toks = _set(toks, "--max-new-tokens", "8", opts)
    if "--paper" in toks and "--config" not in toks:
        # the paper's values (acceptance filter, 24-component budgets) do not fit a random 4-layer model:
        # override them with what emolens uses for the tiny model
        from emolens.pipelines.paper2 import Paper2Config

        paper, tiny = Paper2Config.paper().to_dict(), Paper2Config.for_model(TINY).to_dict()
        cfg = tmp / "tiny-config.json"
        cfg.write_text(json.dumps({k: v for k, v in tiny.items() if v != paper.get(k)}, default=list))
        toks = _set(toks, "--config", str(cfg), opts)
    return toks


def _invoke(toks: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        if toks[0] == "emolens":
            return cli.main(toks[1:])
        argv = sys.argv
        sys.argv = [str(ROOT / toks[1])] + toks[2:]
        try:
            runpy.run_path(str(ROOT / toks[1]), run_name="__main__")
        finally:
            sys.argv = argv
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        torch.set_num_threads(threads)


def _value(toks: list[str], opt: str, default=None):
    return toks[toks.index(opt) + 1] if opt in toks else default


def _ensure_inputs(toks: list[str], tmp: Path) -> None:
    """Create the run folder / vectors file an example reads when no earlier example wrote it."""
    cmd = toks[1] if toks[0] == "emolens" else None
    run = toks[2] if cmd == "report" else _value(toks, "--run") if cmd == "steer" else None
    if run and not (tmp / run).is_dir():
        run = Path(run)
        assert _invoke(["emolens", "run", "--model", TINY, "--quick", "--no-progress", "--only", "paper1",
                        "--out", str(run.parent), "--name", run.name]) == 0
    for opt in ("--analysis-data", "--test-data"):  # a user's SEV file: a few packaged scenarios
        data = _value(toks, opt)
        if data and not (tmp / data).exists():
            import emolens

            lines = (Path(emolens.__file__).parent / "data" / "sev_test.jsonl").read_text(encoding="utf-8").splitlines()
            (tmp / data).write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
    resume = _value(toks, "--resume")
    if resume and not (tmp / resume).is_dir():  # a run to continue: the same command, interrupted by nothing
        first = [t for i, t in enumerate(toks) if t != "--resume" and (i == 0 or toks[i - 1] != "--resume")]
        first = _set(_set(first, "--out", str(Path(resume).parent), _options(toks)), "--name", Path(resume).name,
                     _options(toks))
        assert _invoke(first) == 0
    vec = _value(toks, "--vectors") if cmd == "steer" else None
    if vec and not (tmp / vec).exists():
        assert _invoke(["emolens", "steer", "--model", TINY, "--max-new-tokens", "4", "--emotion", "joy",
                        "--save-gguf", vec]) == 0


def _check_output(toks: list[str], out: str, tmp: Path) -> None:
    """The file or stdout the command promises."""
    if "--help" in toks or "-h" in toks:
        assert "usage:" in out
        return
    cmd = toks[1] if toks[0] == "emolens" else "script"
    if cmd == "info":
        assert f"name         {TINY}" in out and "n_layers     4" in out
    elif cmd in ("demo", "steer"):
        assert "[unsteered]" in out and "[steered" in out
        if "--save-gguf" in toks:
            assert (tmp / _value(toks, "--save-gguf")).stat().st_size > 0
    elif cmd == "report":
        path = Path(_value(toks, "--output") or Path(toks[2]) / "report.html")
        assert f"report: {(tmp / path).resolve()}" in out
        assert (tmp / path).read_text(encoding="utf-8").lstrip().lower().startswith("<!doctype html")
    else:  # run, circuit, attribute, example scripts: a report in the run folder they name
        m = re.search(r"report: (.+report\.html)\s*$", out, flags=re.M)
        assert m, out[-2000:]
        path = Path(m.group(1))
        assert path.is_file() and path.is_relative_to(tmp.resolve())
        if "--name" in toks:
            assert path.parent == (tmp / _value(toks, "--out", "runs") / _value(toks, "--name")).resolve()
        html = path.read_text(encoding="utf-8")
        assert TINY in html


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


def test_examples_found():
    """The sweep is not vacuous: README's commands and every subcommand's examples were parsed."""
    names = {c[1] for c in ALL if c[0] == "emolens"}
    assert names >= set(cli.COMMANDS)
    assert any(c[0] == "python" for c in ALL)
    assert ["emolens", "steer", "--model", "tiny-llama", "--prompt", "hello"] in ALL


@pytest.mark.parametrize("toks", ALL, ids=[" ".join(c)[:80] for c in ALL])
def test_example_command(toks, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    cmd = adapt(toks, workdir)
    _ensure_inputs(cmd, workdir)
    capsys.readouterr()
    rc = _invoke(cmd)
    cap = capsys.readouterr()
    assert rc == 0, f"{shlex.join(cmd)} -> exit {rc}\n{cap.out[-2000:]}\n{cap.err[-3000:]}"
    _check_output(cmd, cap.out, workdir)


def test_options_reach_the_subcommand_in_order(capsys):
    """Everything after the command name is parsed by that command's own parser, as written."""
    p = cli.build_parser("steer")
    argv = ["--model", TINY, "--prompt", "hello", "--emotion", "anger,fear", "--layer", "2"]
    a = p.parse_args(argv)
    assert (a.model, a.prompt, a.emotion, a.layer) == (TINY, "hello", "anger,fear", 2)
    # a value that looks like a subcommand or starts with the option of another command is just a value
    a = cli.build_parser("circuit").parse_args(["--quick", "--out", "steer", "--name", "run"])
    assert (a.quick, a.out, a.name) == (True, "steer", "run")


def test_unknown_option_and_command_fail_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["steer", "--model", TINY, "--promt", "hi"])
    assert e.value.code == 2 and "unrecognized arguments: --promt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["stear"])
    assert e.value.code == 2 and "choose one of: info" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2 and "name a command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "emolens steer --help" in capsys.readouterr().out


def test_explicit_config_fields_win_over_the_quick_preset():
    """`--quick --config` keeps the user's fields (the preset used to overwrite them after they were applied)."""
    from emolens.pipelines import options, paper1, paper2

    conf = json.dumps({"paper1": {"n_heldout": 5, "positions": {"all": [0.2]}},
                       "paper2": {"test_max_records": 7, "calib_scales": [1.0, 6.0]}})
    args = cli.build_parser("run").parse_args(["--quick", "--config", conf])
    over = options.read_config_file(args.config, ("paper1", "paper2"))
    c1 = cli._pipeline_config("paper1", paper1, None, args, over)
    assert c1.n_heldout == 5 and dict(c1.positions) == {"all": (0.2,)}
    assert c1.max_new_tokens == paper1.Paper1Config().quick().max_new_tokens != paper1.Paper1Config().max_new_tokens
    c2 = cli._pipeline_config("paper2", paper2, "smollm2-135m-instruct", args, over)
    q2 = paper2.Paper2Config.for_model("smollm2-135m-instruct").quick()
    assert c2.test_max_records == 7 != q2.test_max_records and tuple(c2.calib_scales) == (1.0, 6.0)
    assert c2.calib_records == q2.calib_records  # the rest of the preset stays
    a2 = cli.build_parser("circuit").parse_args(["--quick", "--config", json.dumps({"test_max_records": 7})])
    assert paper2.config_from_args("smollm2-135m-instruct", a2).test_max_records == 7
    plain = cli._pipeline_config("paper1", paper1, None, cli.build_parser("run").parse_args([]), {})
    assert plain == paper1.Paper1Config()
    assert cli.COMMANDS["run"][2] is cli._run  # the command is still wired to its runner
