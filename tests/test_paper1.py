"""Paper-1 pipeline: pair construction, locus rule, config, end to end (tiny model; embedded model as integration)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from emolens import InputError
from emolens.results import Result

from conftest import get_model

ROOT = Path(__file__).resolve().parents[1]



def _load_example():
    spec = importlib.util.spec_from_file_location("paper1_example", ROOT / "examples" / "paper1_conversations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The example script, quick mode, on tiny-llama (shared by the tests below)."""
    out = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    try:  # one thread: on a shared CPU two spinning threads make tiny models many times slower
        rc = _load_example().main(["--model", "tiny-llama", "--device", "cpu", "--quick", "--out", str(out), "--name",
                                   "t", "--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out / "t"


def test_diagnostic_pairs_have_equal_lengths_and_reject_bad_tasks(tiny_llama):
    from emolens.pipelines.paper1 import diagnostic_pairs

    tasks = [{"prompt": "I got the job!", "aligned": "Wonderful news!", "misaligned": "Whatever."},
             {"prompt": "My cat is sick.", "aligned": "I'm so sorry.", "misaligned": "Not my problem."}]
    dp = diagnostic_pairs(tiny_llama, tasks)
    assert dp["align"] is None and len(dp["clean"]) == 2
    cb = dp["metric"].encode(tiny_llama, dp["clean"])
    xb = dp["metric"].encode(tiny_llama, dp["corrupted"])
    assert torch.equal(cb.seq_len, xb.seq_len) and not torch.equal(cb.input_ids, xb.input_ids)
    # framings of different token length fall back to right alignment
    dp2 = diagnostic_pairs(tiny_llama, tasks, [("Be warm.", "Be very cold.")])
    assert dp2["align"] == "right"
    with pytest.raises(InputError, match="misaligned"):
        diagnostic_pairs(tiny_llama, [{"prompt": "Hi", "aligned": "Hello!", "misaligned": ""}])
    with pytest.raises(InputError):
        diagnostic_pairs(tiny_llama, [])


def test_find_locus_rules_on_a_hand_built_heatmap():
    from emolens.pipelines.paper1 import find_locus

    # 6 layers, 5 prompt positions + 2 reply positions; t* is index 4
    s = torch.zeros(6, 7)
    s[:, 0] = 1.0                          # far from the reply: outside the window span
    s[2, 4], s[3, 4], s[4, 4], s[5, 4] = 0.2, 1.0, 2.0, 1.5   # mass arrives at t* from layer 3
    s[3, 2] = -0.6                         # second-strongest position at the locus layer (negative counts)
    s[:, 5:] = 5.0                         # reply positions are never part of the window
    labels = ["a", "b", "c", "d", "t*", "r1", "r2"]
    res = Result("resid_pos", s, ("layer", "position"), {"position": labels})
    loc = find_locus(res, p_max=5, rule="onset", onset_fraction=0.5, window_span=3, window_max=2)
    assert loc["layer"] == 3 and loc["window"] == [-3, -1] and loc["window_tokens"] == ["c", "t*"]
    loc = find_locus(res, p_max=5, rule="argmax", window_span=3, window_max=1)
    assert loc["layer"] == 4 and loc["window"] == [-1]
    with pytest.raises(InputError):
        find_locus(Result("resid_pos", torch.zeros(2, 3), ("layer", "position")), p_max=3)


def test_config_round_trip_and_validation():
    from emolens.pipelines.paper1 import Paper1Config

    cfg = Paper1Config()
    back = Paper1Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    q = cfg.quick()
    assert q.n_heldout < cfg.n_calibration + 1000 and q.max_new_tokens < cfg.max_new_tokens
    with pytest.raises(InputError, match="Unknown Paper1Config field"):
        Paper1Config.from_dict({"strenght": 1})
    with pytest.raises(InputError, match="positions"):
        Paper1Config.from_dict({"positions": {"everywhere": [1.0]}})


def test_quick_run_writes_report_raw_results_and_resumes(tiny_run):
    from emolens.directions import EmotionVectors
    from emolens.pipelines.paper1 import run

    raw = tiny_run / "paper1"
    assert (tiny_run / "report.html").exists()
    for f in ("attribution_resid.safetensors", "attribution_exact.safetensors", "locus.json", "verify.json",
              "vectors.safetensors", "vector_quality.parquet", "joy_trust.gguf", "calibration.json",
              "results_table.parquet", "acceptance.json", "replies/unsteered.parquet", "replies/priming.parquet"):
        assert (raw / f).exists(), f
    locus = json.loads((raw / "locus.json").read_text())
    assert 0 <= locus["layer"] < 4 and all(o < 0 for o in locus["window"])
    attr = Result.load(raw / "attribution_resid")
    assert attr.kind == "resid_pos" and attr.shape[0] == 4
    # the GGUF control vector holds the steering vector at every layer
    g = EmotionVectors.from_gguf(raw / "joy_trust.gguf", emotion="jt")
    v = EmotionVectors.load(raw / "vectors")
    assert torch.equal(g.get("jt", "resid_post.2"), v.get("joy_trust", "resid_post.2"))
    acc = json.loads((raw / "acceptance.json").read_text())
    from emolens.pipelines.paper1 import Paper1Config

    assert acc["n_heldout"] == Paper1Config().quick().n_heldout and "priming" in acc["conditions"]
    table = pd.read_parquet(raw / "results_table.parquet")
    assert {"condition", "metric", "t_p", "cohens_dz"} <= set(table.columns)
    # resume: every step is reused (no recomputation) and the sections come back
    m = get_model("tiny-llama")
    before = {p.name: p.stat().st_mtime_ns for p in (raw / "steps").glob("*.json")}
    secs = run(m, tiny_run, quick=True, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (raw / "steps").glob("*.json")}
    assert before == after and len(before) == 4
    titles = [s.title for s in secs]
    assert any("Locus" in t for t in titles) and any("Held-out" in t for t in titles)
    assert any("attribution_resid" in s.results for s in secs)
    # every figure is drawn (EMOLENS_STRICT=1 makes a failing one raise): per-section counts
    figs = {s.title.split(":")[0].split(" (")[0]: len(s.figures) for s in secs}
    n_sweeps = len(json.loads((raw / "calibration.json").read_text())["sweeps"])
    assert figs == {"Paper 1": 0, "1. Locus": 2, "2. Emotion vectors": 3, "3. Calibration": 2 * n_sweeps,
                    "4. Held-out evaluation": 1}
    assert not any(t.startswith("[Figure not drawn]") for s in secs for t in s.text)
    # the step log says every step was reused, and why
    log = [t for s in secs for cap, t in s.tables if cap.startswith("Steps in this call")][0]
    assert list(log["step"]) == ["locus", "vectors", "calibration", "evaluation"] and set(log["status"]) == {"reused"}


def test_steer_cli_prints_both_replies(tiny_run, tmp_path, capsys):
    from emolens.cli import build_parser
    from emolens.pipelines.paper1 import steer_cli

    def steer(*argv):  # the subcommand's own parser (emolens.cli.main's pass-through is tested in test_cli)
        return steer_cli(build_parser("steer").parse_args(["--model", "tiny-llama", "--device", "cpu", "--out",
                                                           str(tmp_path), "--no-progress", *argv]))

    rc = steer("--prompt", "Hello!", "--max-new-tokens", "5", "--layer", "1", "--strength", "0.5")
    out = capsys.readouterr().out
    assert rc == 0 and "[unsteered]" in out and "[steered: +0.5 (norm)" in out
    rc = steer("--run", str(tiny_run), "--max-new-tokens", "5", "--strength", "0.3")
    out = capsys.readouterr().out
    assert rc == 0 and "joy_trust" in out
    with pytest.raises(InputError, match="paper-1"):
        steer("--run", str(tiny_run / "nope"))


@pytest.mark.integration
def test_quick_run_on_the_embedded_model_steers_toward_joy(smol, tmp_path):
    """Quick mode on SmolLM2-135M: the locus is found past the first layers and steering raises joy+trust."""
    from emolens.pipelines.paper1 import Paper1Config, run

    cfg = Paper1Config().quick().replace(n_diagnostic=4, n_verify_tasks=2, verify_k=2, verify_controls=0,
                                         positions={"all": (0.15,)}, global_strengths=(), n_calibration=4,
                                         n_heldout=4, max_new_tokens=10, max_pairs=16)
    threads = torch.get_num_threads()
    try:  # one thread: on a shared CPU two spinning threads are several times slower
        torch.set_num_threads(1)
        secs = run(smol, tmp_path, config=cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    raw = tmp_path / "paper1"
    locus = json.loads((raw / "locus.json").read_text())
    assert 3 <= locus["layer"] <= smol.n_layers - 3  # not the embedding, not the unembedding
    assert locus["clean_metric"] > locus["corrupted_metric"]  # the warm framing favours the aligned reply
    sweep = pd.read_parquet(raw / "sweeps" / "steer_all_table.parquet")
    base = sweep[sweep.layer.isna()].iloc[0]
    steered = sweep[sweep.layer.notna()].iloc[0]
    assert steered["joy_trust"] > base["joy_trust"]
    q = pd.read_parquet(raw / "vector_quality.parquet")
    assert q[(q.emotion == "joy_trust") & (q.layer == locus["layer"])]["auroc"].iloc[0] > 0.7
    assert len(secs) == 5
