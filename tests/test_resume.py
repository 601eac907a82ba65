"""The step engine and resume: fingerprints, crash safety, kill -9 + --resume equals an uninterrupted run,
a changed config field recomputes exactly its dependents, another configuration is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from emolens.errors import InputError
from emolens.pipelines.engine import PipelineConfig, Step, diff_outputs, run_steps

from conftest import get_model

ROOT = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------------------------
# A toy pipeline (no model): a -> b -> c, d independent
# -----------------------------------------------------------------------------------------------
@dataclass
class ToyConfig(PipelineConfig):
    x: int = 1
    y: float = 2.0
    z: tuple[str, ...] = ("p", "q")
    w: dict[str, float] = field(default_factory=dict)
    data: str | None = None


class ToyModel:
    fingerprint = "toy-model-1"
    name = "toy"


CALLS: list[str] = []


def _a(ctx):
    CALLS.append("a")
    return {"a_out": {"v": ctx.config.x * 10}}


def _b(ctx):
    CALLS.append("b")
    import pandas as pd

    return {"b_out": pd.DataFrame({"v": [ctx.load("a_out")["v"] + ctx.config.y]})}


def _c(ctx):
    CALLS.append("c")
    ctx.path("extra/c.txt").write_text(str(float(ctx.load("b_out")["v"].iloc[0]) * 2))
    return {"c_out": [float(ctx.load("b_out")["v"].iloc[0]) * 2]}


def _d(ctx):
    CALLS.append("d")
    text = Path(ctx.config.data).read_text() if ctx.config.data else ""
    return {"d_out": {"z": list(ctx.config.z), "data": text}}


TOY = (Step("a", _a, config=("x",)), Step("b", _b, inputs=("a",), config=("y",)),
       Step("c", _c, inputs=("b",)), Step("d", _d, config=("z",), data=("data",)))


def _run(root, cfg=None, **kw):
    CALLS.clear()
    ctx = run_steps(TOY, ToyModel(), cfg or ToyConfig(), root, progress=False, **kw)
    return ctx, list(CALLS)


def test_engine_skips_matching_steps_and_recomputes_exactly_the_dependents(tmp_path, caplog):
    ctx, calls = _run(tmp_path)
    assert calls == ["a", "b", "c", "d"] and ctx.load("c_out") == [24.0]
    assert (tmp_path / "extra" / "c.txt").read_text() == "24.0"
    assert _run(tmp_path)[1] == []  # same config and model: nothing recomputes
    ctx, calls = _run(tmp_path, ToyConfig(y=3.0))  # b's field: b and c (its input changed), not a or d
    assert calls == ["b", "c"] and ctx.load("c_out") == [26.0]
    assert ctx.log["b"].reason == "config changed: y" and ctx.log["c"].reason == "inputs changed: b"
    assert ctx.log["a"].status == "reused"
    # a field of an independent step: only that step
    ctx, calls = _run(tmp_path, ToyConfig(y=3.0, z=("p", "r")))
    assert calls == ["d"]
    # a data file is fingerprinted by content, not by name
    f = tmp_path / "data.txt"
    f.write_text("one")
    assert _run(tmp_path, ToyConfig(y=3.0, z=("p", "r"), data=str(f)))[1] == ["d"]
    assert _run(tmp_path, ToyConfig(y=3.0, z=("p", "r"), data=str(f)))[1] == []
    f.write_text("two")
    ctx, calls = _run(tmp_path, ToyConfig(y=3.0, z=("p", "r"), data=str(f)))
    assert calls == ["d"] and ctx.log["d"].reason == "data changed: data" and ctx.load("d_out")["data"] == "two"
    # another model: everything
    class Other(ToyModel):
        fingerprint = "toy-model-2"

    CALLS.clear()
    ctx = run_steps(TOY, Other(), ToyConfig(y=3.0, z=("p", "r"), data=str(f)), tmp_path, progress=False)
    assert CALLS == ["a", "b", "c", "d"] and ctx.log["a"].reason == "model changed"
    # resume=False recomputes everything
    assert _run(tmp_path, resume=False)[1] == ["a", "b", "c", "d"]


def test_engine_treats_corrupt_markers_and_outputs_as_missing(tmp_path):
    _run(tmp_path)
    (tmp_path / "steps" / "a.json").write_text("")  # empty marker (a kill during an unsafe write)
    (tmp_path / "b_out.parquet").write_bytes(b"PAR1 truncated")  # a half-written output
    ctx, calls = _run(tmp_path)
    assert calls == ["a", "b"]  # a: marker unreadable; b: output hash wrong; c: inputs identical again
    assert ctx.log["a"].reason == "marker empty or corrupt" and "b_out.parquet" in ctx.log["b"].reason
    assert ctx.load("c_out") == [24.0]
    (tmp_path / "extra" / "c.txt").unlink()  # an extra file is an output too
    assert _run(tmp_path)[1] == ["c"]
    (tmp_path / "steps" / "d.json").write_text('{"fingerprint": 1}')  # valid JSON, wrong shape
    assert _run(tmp_path)[1] == ["d"]


def test_engine_crash_inside_a_step_leaves_no_marker_and_no_partial_output(tmp_path):
    _run(tmp_path)

    def boom(ctx):
        ctx.path("partial.bin").write_bytes(b"half")
        raise RuntimeError("killed")

    steps = (TOY[0], Step("b", boom, inputs=("a",), config=("y",)), *TOY[2:])
    with pytest.raises(RuntimeError):
        run_steps(steps, ToyModel(), ToyConfig(y=5.0), tmp_path, progress=False)
    assert not (tmp_path / "steps" / "b.json").exists() and not (tmp_path / "partial.bin").exists()
    ctx, calls = _run(tmp_path, ToyConfig(y=5.0))
    assert calls == ["b", "c"] and not (tmp_path / ".staging").exists() and ctx.load("c_out") == [30.0]


def test_resume_removes_temp_files_of_a_writer_killed_mid_write(tmp_path):
    # io.atomic_path writes .<name>.<random>.tmp and renames it; a SIGKILL between the two leaves the temp file
    # (seen once in the kill -9 test below, at the run folder's run.json). A resume deletes them, keeps outputs.
    from emolens.pipelines.engine import RunFolder

    _run(tmp_path)
    stale = [tmp_path / ".b_out.parquet.k1l2.tmp", tmp_path / "extra" / ".c.txt.x9y8.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    assert _run(tmp_path)[1] == []  # nothing recomputes: the outputs are whole
    assert not any(p.exists() for p in stale) and (tmp_path / "extra" / "c.txt").read_text() == "24.0"
    run = RunFolder.open(tmp_path, "r1", {"model": "toy"})
    left = run.path / ".run.json.s8aw61x.tmp"
    left.write_text('{"status": "runn')
    RunFolder.open(tmp_path, None, {"model": "toy"}, resume=run.path)
    assert not left.exists() and json.loads((run.path / "run.json").read_text())["status"] == "running"


def test_engine_refuses_undeclared_inputs_and_bad_graphs(tmp_path):
    def sneaky(ctx):
        return {"s": ctx.load("a_out")}

    with pytest.raises(InputError, match="does not declare"):
        run_steps((TOY[0], Step("s", sneaky)), ToyModel(), ToyConfig(), tmp_path, progress=False)
    with pytest.raises(InputError, match="no earlier step"):
        run_steps((Step("b", _b, inputs=("a",)),), ToyModel(), ToyConfig(), tmp_path, progress=False)
    with pytest.raises(InputError, match="lacks"):
        run_steps((Step("a", _a, config=("nope",)),), ToyModel(), ToyConfig(), tmp_path, progress=False)


def test_config_base_validates_every_field():
    c = ToyConfig.from_dict({"x": 3, "y": 1, "z": ["a"], "w": {"k": 2}})
    assert (c.x, c.y, c.z, c.w) == (3, 1.0, ("a",), {"k": 2.0})
    assert ToyConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for bad, msg in (({"x": "3"}, "x must be an integer"), ({"x": True}, "x must be an integer"),
                     ({"y": "1"}, "y must be a number"), ({"z": "abc"}, "z must be a list"),
                     ({"w": {"k": "v"}}, r"w\['k'\] must be a number"), ({"v": 1}, "Unknown ToyConfig field")):
        with pytest.raises(InputError, match=msg):
            ToyConfig.from_dict(bad)
    with pytest.raises(InputError, match="valid fields: data, w, x, y, z"):
        ToyConfig().replace(q=1)


# -----------------------------------------------------------------------------------------------
# Both papers on a tiny model
# -----------------------------------------------------------------------------------------------
def _cli(args, env_extra=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EMOLENS_PROGRESS="0")
    env.pop("EMOLENS_CRASH_AT", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "emolens.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


RUN = ["run", "--model", "tiny-llama", "--device", "cpu", "--quick", "--no-progress"]


@pytest.mark.integration  # eight subprocesses (~2 CPU-minutes)
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL at fixed points (before a step, mid-publish of its files, after staging, before the marker) and at
    a random moment, each followed by --resume: the final outputs equal an uninterrupted run's."""
    ref = _cli(RUN + ["--out", str(tmp_path), "--name", "ref"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = tmp_path / "killed"
    first = True
    for point in ("vectors:publishing", "stats:staged", "curves:publishing", "calibrate_circuit:marker"):
        args = RUN + (["--out", str(tmp_path), "--name", "killed"] if first else ["--resume", str(killed)])
        r = _cli(args, {"EMOLENS_CRASH_AT": point})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
        first = False
        assert json.loads((killed / "run.json").read_text())["status"] == "running"
    # a kill at a random moment (a subprocess killed by the test, wherever it is)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", EMOLENS_PROGRESS="0")
    env.pop("EMOLENS_CRASH_AT", None)
    p = subprocess.Popen([sys.executable, "-m", "emolens.cli", *RUN, "--resume", str(killed)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(9.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = _cli(RUN + ["--resume", str(killed)])
    assert r.returncode == 0, r.stderr[-2000:]
    state = json.loads((killed / "run.json").read_text())
    assert state["status"] == "done" and {"paper1", "paper2"} <= set(state["steps"])
    assert diff_outputs(tmp_path / "ref", killed) == []
    # every marker of the resumed run carries the uninterrupted run's fingerprint and output hashes
    for paper in ("paper1", "paper2"):
        for m in (tmp_path / "ref" / paper / "steps").glob("*.json"):
            a, b = json.loads(m.read_text()), json.loads((killed / paper / "steps" / m.name).read_text())
            assert (a["fingerprint"], a["files"]) == (b["fingerprint"], b["files"]), m
    # nothing half-written is left behind
    assert not list(killed.rglob(".staging")) and not list(killed.rglob("*.tmp"))
    # a finished run resumes to itself, every step reused
    r = _cli(RUN + ["--resume", str(killed)])
    assert r.returncode == 0
    steps = json.loads((killed / "run.json").read_text())["steps"]
    assert all(v["status"] == "reused" for p in steps.values() for v in p.values())
    # another configuration is refused, naming the differing field and the way out
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"paper1": {"priming_template": "Be {emotions}."}}))
    r = _cli(RUN + ["--resume", str(killed), "--config", str(cfg)])
    assert r.returncode == 2 and "config.paper1.priming_template" in r.stderr
    assert "--name" in r.stderr and "--overwrite" in r.stderr


def test_a_changed_field_recomputes_exactly_its_dependents_and_equals_a_fresh_run(tmp_path):
    from emolens.pipelines import paper1, paper2

    m = get_model("tiny-llama")
    log: list = []
    c1 = paper1.Paper1Config().quick().replace(n_calibration=3, n_heldout=3, max_new_tokens=4)
    paper1.run(m, tmp_path / "a", config=c1, progress=False)
    c1b = c1.replace(priming_template="Talk with {emotions}.")
    paper1.run(m, tmp_path / "a", config=c1b, progress=False, on_step=log.append)
    assert [e.step for e in log if e.status == "computed"] == ["evaluation"]
    assert log[-1].reason == "config changed: priming_template"
    paper1.run(m, tmp_path / "fresh1", config=c1b, progress=False)
    assert diff_outputs(tmp_path / "a" / "paper1", tmp_path / "fresh1" / "paper1") == []

    c2 = paper2.Paper2Config.for_model(m).replace(emotions=("anger", "fear"), steer_alpha=2.0, circuit_scale=2.0,
                                                  test_max_records=1)
    paper2.run(m, tmp_path / "b", config=c2, progress=False)
    log.clear()
    c2b = c2.replace(circuit_scale=3.0)
    paper2.run(m, tmp_path / "b", config=c2b, progress=False, on_step=log.append)
    assert [e.step for e in log if e.status == "computed"] == ["calibrate_circuit", "eval_circuit_texts",
                                                                "eval_circuit", "examples", "ensemble",
                                                                "side_effects", "circuit_attention"]
    paper2.run(m, tmp_path / "fresh2", config=c2b, progress=False)
    assert diff_outputs(tmp_path / "b" / "paper2", tmp_path / "fresh2" / "paper2") == []


def test_attribute_resume_from_the_cli(tmp_path, capsys):
    from emolens.cli import main

    args = ["attribute", "--model", "tiny-llama", "--device", "cpu", "--clean", "I am happy", "--corrupted",
            "I am angry", "--target", " smile", "--foil", " shout", "--out", str(tmp_path), "--no-progress"]
    assert main(args + ["--name", "a"]) == 0
    marker = tmp_path / "a" / "attribute" / "steps" / "attribution.json"
    before = marker.read_text()
    assert main(args + ["--resume", str(tmp_path / "a")]) == 0
    steps = json.loads((tmp_path / "a" / "run.json").read_text())["steps"]["attribute"]
    assert steps["attribution"]["status"] == "reused" and marker.read_text() == before
    capsys.readouterr()
    other = [a if a != " smile" else " grin" for a in args]
    assert main(other + ["--resume", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "config.target: ' smile' -> ' grin'" in err and "--overwrite" in err
    assert main(other + ["--resume", str(tmp_path / "a"), "--overwrite"]) == 0
    steps = json.loads((tmp_path / "a" / "run.json").read_text())["steps"]["attribute"]
    assert steps["attribution"]["status"] == "computed" and "config changed: target" in steps["attribution"]["reason"]
    # a folder that is not a run
    (tmp_path / "plain").mkdir()
    assert main(args + ["--resume", str(tmp_path / "plain")]) == 2
    assert "not an emolens run folder" in capsys.readouterr().err


def test_circuit_quick_evaluates_on_a_user_test_file(tmp_path, capsys):
    """`emolens circuit --quick --test-data FILE` evaluates on that file (CSV, mapped columns)."""
    import pandas as pd

    from emolens.cli import build_parser
    from emolens.errors import DataError
    from emolens.pipelines.paper2 import circuit_cli

    def main(argv):  # the subcommand's own parser (emolens.cli.main's pass-through is tested elsewhere)
        return circuit_cli(build_parser(argv[0]).parse_args(argv[1:]))

    rows = [{"topic": f"pets-{i}", "id": f"my-{i}", "scenario": f"I adopted a cat named Tom number {i}.",
             "event.positive": "He purrs on my lap every evening.", "event.neutral": "He sleeps on the sofa.",
             "event.negative": "He ran away through the open window."} for i in range(2)]
    f = tmp_path / "mine.csv"
    pd.DataFrame(rows).to_csv(f, index=False)
    code = main(["circuit", "--model", "tiny-llama", "--device", "cpu", "--quick", "--test-data", str(f),
                 "--columns", "test:theme=topic,skeleton_id=id", "--steer-alpha", "2", "--circuit-scale", "2",
                 "--out", str(tmp_path), "--name", "c", "--no-progress"])
    assert code == 0
    root = tmp_path / "c" / "paper2"
    for method in ("prompting", "steering", "circuit"):
        ev = pd.read_parquet(root / f"eval_{method}.parquet")
        assert set(ev["skeleton_id"]) == {"my-0", "my-1"} and set(ev["theme"]) == {"pets-0", "pets-1"}
    cal = json.loads((root / "circuit_calibration.json").read_text())
    assert cal["circuit_scale"] == 2.0 and "passed" in cal["why"]
    # a broken test file fails before any work, naming the file, line and field
    rows[1]["event.negative"] = ""
    pd.DataFrame(rows).to_csv(f, index=False)
    with pytest.raises(DataError, match=r"mine.csv, line 3: 'event' is missing the valence 'negative'"):
        main(["circuit", "--model", "tiny-llama", "--device", "cpu", "--quick", "--test-data", str(f),
              "--columns", "test:theme=topic,skeleton_id=id", "--out", str(tmp_path), "--name", "d"])
    assert not (tmp_path / "d").exists()


def test_folder_outputs_are_replaced_whole(tmp_path):
    """Files a lost earlier version of a step left in its output folder are never loaded with the new ones."""
    from emolens.results import Result
    import torch

    def make(ctx):
        return {"curves": {f"k{i}": Result("layers", torch.ones(2) * i, ("layer",)) for i in range(ctx.config.x)}}

    steps = (Step("c", make, config=("x",)),)
    run_steps(steps, ToyModel(), ToyConfig(x=3), tmp_path, progress=False)
    (tmp_path / "steps" / "c.json").unlink()  # a crash after the marker was dropped, before the new outputs
    ctx = run_steps(steps, ToyModel(), ToyConfig(x=2), tmp_path, progress=False)
    assert sorted(ctx.load("curves")) == ["k0", "k1"] and not (tmp_path / "curves" / "k2.safetensors").exists()
