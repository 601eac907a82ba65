"""Scale-out on Ray (emolens.scale): a real local Ray cluster with 2 CPU workers on tiny-llama.

Checked against the local functions on the same inputs: bitwise for greedy generation and float64
capture sums, <= 1e-6 for patching; a worker killed by its pid mid-run; a driver killed by its pid
and a resumed rerun that skips finished shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from emolens import Pos, resid, scale
from emolens.errors import InputError, InterventionError
from emolens.capture import capture
from emolens.interventions import Add
from emolens.metrics import logit_diff
from emolens.patching import patch
from emolens.pipelines.paper2 import generate_replies
from emolens.sites import neuron
from emolens.steering import sweep

from test_steering import PROMPTS, _vectors

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'emolens[ray]'")

ROOT = Path(__file__).resolve().parent.parent
PROMPTS_20 = [f"Sentence {i} is about {('cats', 'dogs', 'rain')[i % 3]} today." for i in range(20)]


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    """Two model actors (1 CPU, 1 thread each) on a fresh local Ray cluster with 2 CPUs."""
    scale.shutdown()
    if ray.is_initialized():
        ray.shutdown()
    cfg = scale.ScaleConfig(backend="ray", workers=2, shard_size=4)
    env = scale.worker_env(tiny_llama, cfg)
    yield cfg, env
    scale.shutdown()


def _cfg(cluster, **kw):
    import dataclasses

    return dataclasses.replace(cluster[0], **kw)


def _specs(m):
    v = _vectors(m).get("joy", resid(1))
    return {"joy": [Add(resid(1), v, strength=2.0, pos=Pos.all())], None: []}


def test_cluster_has_two_one_thread_workers_importing_this_emolens(cluster):
    _, env = cluster
    assert ray.cluster_resources()["CPU"] == 2
    assert len({e["pid"] for e in env}) == 2 and os.getpid() not in {e["pid"] for e in env}
    assert all(e["threads"] == 1 for e in env)
    assert all(Path(e["emolens"]).resolve() == (ROOT / "emolens" / "__init__.py").resolve() for e in env)


def test_capture_on_ray_is_bitwise_local(tiny_llama, cluster):
    m = tiny_llama
    groups = [i % 3 for i in range(len(PROMPTS_20))]
    for reduce in ("mean", "group_mean", "none"):
        kw = dict(reduce=reduce, groups=groups if reduce == "group_mean" else None, batch_size=3, chat=False)
        local = capture(m, PROMPTS_20, [resid(1), neuron(2)], progress=False, **kw)
        dist = capture(m, PROMPTS_20, [resid(1), neuron(2)], backend=_cfg(cluster, shard_size=6), **kw)
        for k in local.data:
            assert torch.equal(local.data[k], dist.data[k]), (reduce, k)
        assert torch.equal(local.counts, dist.counts) and local.groups == dist.groups
    # float64 sums folded in the local batch order: the same bits as the float64 total, not only after rounding
    assert local.data["resid_post.1"].abs().sum() > 0


def test_generation_patching_and_sweep_on_ray_equal_local(tiny_llama, cluster):
    m = tiny_llama
    specs = _specs(m)
    emos = ["joy" if i % 2 else None for i in range(len(PROMPTS_20))]
    gk = {"max_new_tokens": 6}
    local = generate_replies(m, PROMPTS_20, emos, interventions_for=lambda e: specs[e], gen_kwargs=gk, batch_size=4)
    dist = generate_replies(m, PROMPTS_20, emos, interventions_for=lambda e: specs[e], gen_kwargs=gk, batch_size=4,
                            backend=cluster[0])
    assert dist == local
    assert len(set(local)) > 1  # the steered rows differ from the unsteered ones

    ld = logit_diff(m, "a", "b")
    clean, corr = ["I am glad", "A cat sat"], ["I am sad!", "A dog sat"]
    for nodes in ("heads", "resid"):
        a = patch(m, clean, corr, ld, nodes=nodes, chat=False, progress=False)
        b = patch(m, clean, corr, ld, nodes=nodes, chat=False, backend=_cfg(cluster, shard_size=5))
        assert b.shape == a.shape and b.meta["n_shards"] > 1
        assert torch.allclose(a.scores, b.scores, atol=1e-6, rtol=0) and a.scores.abs().max() > 1e-3
        assert torch.allclose(a.extra["stderr"], b.extra["stderr"], atol=1e-6, rtol=0)

    vecs = _vectors(m)
    kw = dict(strengths=[0.5, 2.0], layers=[1, 2], strength_mode="rms", max_new_tokens=4, progress=False)
    s1 = sweep(m, PROMPTS, vecs, ["joy", "trust"], **kw)
    s2 = sweep(m, PROMPTS, vecs, ["joy", "trust"], backend=cluster[0], **kw)
    assert s1.texts == s2.texts
    pd.testing.assert_frame_equal(s1.table, s2.table, rtol=1e-6)
    # an emolens error raised inside a worker reaches the caller as that error, with its message
    with pytest.raises(InterventionError, match="strength 1e\\+38"):
        sweep(m, PROMPTS, vecs, "joy", strengths=[1e38], layers=1, strength_mode="absolute", max_new_tokens=3,
              progress=False, backend=cluster[0])


def test_use_backend_routes_pipeline_generations_through_ray(tiny_llama, cluster, tmp_path):
    m = tiny_llama
    gk = {"max_new_tokens": 4}
    local = generate_replies(m, PROMPTS_20, [None] * 20, gen_kwargs=gk, batch_size=4)
    with scale.use_backend(_cfg(cluster, run_dir=str(tmp_path))):  # what `emolens run --backend ray` sets
        dist = generate_replies(m, PROMPTS_20, [None] * 20, gen_kwargs=gk, batch_size=4)
    assert dist == local
    assert len(scale.ShardStore(tmp_path / "shards").names()) == 5 and scale.LAST_RUN["shards"] == 5
    assert scale.active_backend() is None


def test_worker_killed_mid_run_still_gives_identical_results(tiny_llama, cluster, tmp_path):
    m = tiny_llama
    prompts = [f"Tell me story number {i} about the sea." for i in range(32)]
    emos = [None] * len(prompts)
    gk = {"max_new_tokens": 24}
    cfg = _cfg(cluster, shard_size=2, run_dir=str(tmp_path))
    pids = scale.worker_pids(m, cfg)  # ask before the run: an actor answers only between tasks
    out: dict = {}

    def job():
        out["texts"] = scale.generate_replies(m, prompts, emos, gen_kwargs=gk, batch_size=2, backend=cfg)

    th = threading.Thread(target=job)
    th.start()
    shards = lambda: list((tmp_path / "shards" / "steps").rglob("*.json"))  # noqa: E731 (shard markers)
    t0 = time.time()
    while len(shards()) < 2 and time.time() - t0 < 60:
        time.sleep(0.05)
    n_done_at_kill = len(shards())
    os.kill(pids[0], signal.SIGKILL)
    th.join(timeout=120)
    assert not th.is_alive() and "texts" in out
    assert n_done_at_kill <= 16 - 3  # the queue still held shards: both workers were busy when one was killed
    local = generate_replies(m, prompts, emos, gen_kwargs=gk, batch_size=2)
    assert out["texts"] == local
    new = scale.worker_pids(m, cfg)
    assert pids[0] not in new and pids[1] in new  # Ray restarted the killed actor in a new process


_DRIVER = """
import sys, time, torch
torch.set_num_threads(1)
import emolens
from emolens import scale
from emolens.pipelines import paper2
m = emolens.load_model("tiny-llama", device="cpu")
calls = 0
orig = paper2.generate_replies
def slow(*a, **k):  # the driver dies while shards are still to do
    global calls
    calls += 1
    time.sleep(0.3)
    return orig(*a, **k)
paper2.generate_replies = slow
prompts = [f"Tell me story number {i} about the sea." for i in range(16)]
cfg = scale.ScaleConfig(backend="local", shard_size=2, run_dir=sys.argv[1])
scale.generate_replies(m, prompts, gen_kwargs={"max_new_tokens": 8}, batch_size=2, backend=cfg)
print("finished")
"""


def test_killed_driver_then_resume_skips_finished_shards(tiny_llama, cluster, tmp_path):
    m = tiny_llama
    prompts = [f"Tell me story number {i} about the sea." for i in range(16)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               EMOLENS_PROGRESS="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    shard_dir = tmp_path / "shards"
    markers = shard_dir / "steps"
    t0 = time.time()
    while len(list(markers.rglob("*.json"))) < 3 and time.time() - t0 < 90 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in markers.rglob("*.json")}
    assert 3 <= len(done) < 8, proc.stdout.read().decode()[-2000:]  # 8 shards in all: killed part-way
    for marker in done:  # atomic writes: every visible marker is complete and its files hash to what it records
        rec = json.loads(marker.read_text())
        assert rec["fingerprint"] and len(rec["files"]) == 2
        assert all(hashlib.sha256((shard_dir / rel).read_bytes()).hexdigest() == sha for rel, sha in rec["files"].items())
    cfg = _cfg(cluster, shard_size=2, run_dir=str(tmp_path))
    texts = scale.generate_replies(m, prompts, gen_kwargs={"max_new_tokens": 8}, batch_size=2, backend=cfg)
    assert texts == generate_replies(m, prompts, [None] * 16, gen_kwargs={"max_new_tokens": 8}, batch_size=2)
    after = {p: p.stat().st_mtime_ns for p in markers.rglob("*.json")}
    assert len(after) == 8
    assert all(after[p] == t for p, t in done.items())  # finished shards were loaded, not recomputed
    # another config (more new tokens) is a new job: nothing reused, all its shards computed
    scale.generate_replies(m, prompts, gen_kwargs={"max_new_tokens": 9}, batch_size=2, backend=cfg)
    assert len(list(markers.rglob("*.json"))) == 16


def test_shard_store_reuses_only_matching_fingerprints(tmp_path):
    store = scale.ShardStore(tmp_path)
    a = scale.Shard("job/00000", len, {}, scale.fingerprint("x", torch.ones(3)))
    assert not store.done(a)
    store.save(a, {"t": torch.arange(3.0)}, {"texts": ["hi"]})
    assert store.done(a)
    t, info = store.load(a)
    assert torch.equal(t["t"], torch.arange(3.0)) and info == {"texts": ["hi"]}
    changed = scale.Shard("job/00000", len, {}, scale.fingerprint("x", torch.tensor([1.0, 1.0, 1.01])))
    assert changed.fingerprint != a.fingerprint and not store.done(changed)
    assert not scale.ShardStore(tmp_path, resume=False).done(a)
    (tmp_path / "job" / "00000.safetensors").unlink()  # data gone: the marker alone is not a finished shard
    assert not store.done(a)
    meta = json.loads((tmp_path / "steps" / "job" / "00000.json").read_text())
    assert meta["fingerprint"] == a.fingerprint


def test_backend_cli_options():
    import argparse

    p = argparse.ArgumentParser()
    scale.add_backend_args(p)
    assert scale.config_from_args(p.parse_args([])) is None
    cfg = scale.config_from_args(p.parse_args(["--backend", "ray", "--address", "auto", "--workers", "3"]), "runs/x")
    assert (cfg.backend, cfg.address, cfg.workers, cfg.run_dir, cfg.threads) == ("ray", "auto", 3, "runs/x", 1)
    assert scale.ScaleConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="Unknown backend"):
        scale.ScaleConfig(backend="dask")
