"""``emolens steer`` writes a run folder through the step engine: a killed call resumes, a resume reuses
what is finished, a changed option recomputes only the steps that read it, and a folder of another
model or other options is refused naming the differing fields."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from emolens.cli import main
from emolens.pipelines.engine import diff_outputs

ROOT = Path(__file__).resolve().parents[1]


def _args(out: Path, *extra: str) -> list[str]:
    return ["steer", "--model", "tiny-llama", "--device", "cpu", "--prompt", "hello", "--emotion", "joy",
            "--max-new-tokens", "4", "--out", str(out), "--no-progress", *extra]


def _steps(run: Path) -> dict:
    return {k: v["status"] for k, v in json.loads((run / "run.json").read_text())["steps"]["steer"].items()}


def _replies(out: str) -> str:
    return out.split("\n[unsteered]", 1)[1].split("run folder:", 1)[0]


def test_steer_resume_reuses_and_a_changed_option_recomputes_only_its_steps(tmp_path, capsys):
    assert main(_args(tmp_path, "--name", "a")) == 0
    first = capsys.readouterr().out
    run = tmp_path / "a"
    assert _steps(run) == {"vectors": "computed", "unsteered": "computed", "steered": "computed"}
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    markers = {p.name: p.read_text() for p in (run / "steer" / "steps").glob("*.json")}
    assert set(markers) == {"vectors.json", "unsteered.json", "steered.json"}

    # same options: everything reused, the same replies printed
    assert main(_args(tmp_path, "--resume", str(run))) == 0
    assert _replies(capsys.readouterr().out) == _replies(first)
    assert _steps(run) == {"vectors": "reused", "unsteered": "reused", "steered": "reused"}
    assert {p.name: p.read_text() for p in (run / "steer" / "steps").glob("*.json")} == markers

    # a changed option is refused without --overwrite, naming the field and the two ways out
    assert main(_args(tmp_path, "--strength", "0.5", "--resume", str(run))) == 2
    err = capsys.readouterr().err
    assert "config.strength: 0.1 -> 0.5" in err and "--name" in err and "--overwrite" in err
    # with --overwrite: only the steered reply depends on the strength
    assert main(_args(tmp_path, "--strength", "0.5", "--resume", str(run), "--overwrite")) == 0
    capsys.readouterr()
    assert _steps(run) == {"vectors": "reused", "unsteered": "reused", "steered": "computed"}
    reason = json.loads((run / "run.json").read_text())["steps"]["steer"]["steered"]["reason"]
    assert reason == "config changed: strength"
    # ... and equals a fresh run of the new options
    assert main(_args(tmp_path, "--strength", "0.5", "--name", "fresh")) == 0
    capsys.readouterr()
    assert diff_outputs(run / "steer", tmp_path / "fresh" / "steer") == []


def test_steer_resume_refuses_a_folder_of_another_model_or_command(tmp_path, capsys):
    assert main(_args(tmp_path, "--name", "a")) == 0
    capsys.readouterr()
    other = _args(tmp_path, "--resume", str(tmp_path / "a"))
    other[other.index("tiny-llama")] = "tiny-qwen2"
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "another model or configuration" in err and "model.fingerprint" in err
    assert "--name" in err and "--overwrite" in err
    # an attribute run folder is not a steer run
    assert main(["attribute", "--model", "tiny-llama", "--device", "cpu", "--clean", "I am happy", "--corrupted",
                 "I am angry", "--target", " smile", "--foil", " shout", "--nodes", "resid", "--out", str(tmp_path),
                 "--name", "attr", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(_args(tmp_path, "--resume", str(tmp_path / "attr"))) == 2
    assert "command: 'attribute' -> 'steer'" in capsys.readouterr().err


def test_killed_steer_resumes_and_equals_an_uninterrupted_run(tmp_path, capsys):
    env = dict(os.environ, PYTHONPATH=str(ROOT), EMOLENS_CRASH_AT="steered:start", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "emolens.cli", *_args(tmp_path, "--name", "killed")], env=env,
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    run = tmp_path / "killed"
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "running" and set(state["steps"]["steer"]) == {"vectors", "unsteered"}
    assert not (run / "steer" / "steps" / "steered.json").exists()
    assert main(_args(tmp_path, "--resume", str(run))) == 0
    capsys.readouterr()
    assert _steps(run) == {"vectors": "reused", "unsteered": "reused", "steered": "computed"}
    assert main(_args(tmp_path, "--name", "whole")) == 0
    capsys.readouterr()
    assert diff_outputs(run / "steer", tmp_path / "whole" / "steer") == []
