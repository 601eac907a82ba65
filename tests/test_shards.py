"""Shards are steps: emolens.scale records finished shards with the step engine's records (marker last,
file hashes checked), so a damaged shard is recomputed (with its reason logged) instead of crashing the
run, a changed input is never reused, and a pipeline step's shards let a rerun of the unfinished step
skip the finished ones. The local backend runs the same shard code as Ray (tests/test_ray.py), in-process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import pytest
import torch

from emolens import resid, scale
from emolens.capture import capture
from emolens.pipelines.engine import PipelineConfig, Step, record_status, run_steps, shard_folder
from emolens.pipelines.paper2 import generate_replies
from emolens.sites import neuron

PROMPTS = [f"Sentence {i} is about {('cats', 'dogs', 'rain')[i % 3]} today." for i in range(12)]
KW = dict(reduce="mean", batch_size=2, chat=False)


def _cfg(tmp_path, **kw):
    return scale.ScaleConfig(backend="local", shard_size=4, run_dir=str(tmp_path), **kw)  # 3 shards of 2 batches


def _equal(a, b) -> bool:
    return a.data.keys() == b.data.keys() and all(torch.equal(a.data[k], b.data[k]) for k in a.data)


def _damage(kind: str, store: scale.ShardStore, name: str) -> str:
    """Damage shard ``name`` in one way; return the reason the store must give."""
    data = store.root / f"{name}.safetensors"
    info = store.root / f"{name}.info.json"
    marker = store.root / "steps" / f"{name}.json"
    rel = f"{name}.safetensors"
    if kind == "truncated data":
        b = data.read_bytes()
        data.write_bytes(b[: len(b) // 2])
        return f"output {rel} changed or is corrupt"
    if kind == "missing data":
        data.unlink()
        return f"output {rel} is missing"
    if kind == "changed data":  # same length, one value flipped: only the hash can tell
        b = bytearray(data.read_bytes())
        b[-3] ^= 0xFF
        data.write_bytes(bytes(b))
        return f"output {rel} changed or is corrupt"
    if kind == "changed info":
        info.write_text(info.read_text().replace('"n_batches": 2', '"n_batches": 3'))
        return f"output {name}.info.json changed or is corrupt"
    if kind == "empty marker":
        marker.write_text("")
        return "marker empty or corrupt"
    if kind == "corrupt marker":
        marker.write_text('{"fingerprint": "')
        return "marker empty or corrupt"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated data", "missing data", "changed data", "changed info", "empty marker",
                                  "corrupt marker"])
def test_damaged_shard_is_recomputed_with_an_identical_result(tiny_llama, tmp_path, caplog, kind):
    m = tiny_llama
    sites = [resid(1), neuron(2)]
    ref = capture(m, PROMPTS, sites, progress=False, **KW)
    first = scale.capture(m, PROMPTS, sites, backend=_cfg(tmp_path), **KW)
    assert _equal(first, ref) and scale.LAST_RUN["shards"] == 3 and scale.LAST_RUN["reused"] == 0
    store = scale.ShardStore(tmp_path / "shards")
    names = store.names()
    assert len(names) == 3
    markers = {n: (store.root / "steps" / f"{n}.json").stat().st_mtime_ns for n in names}
    fp = json.loads((store.root / "steps" / f"{names[1]}.json").read_text())["fingerprint"]
    assert record_status(store.root, names[1], fp)[1] is None
    want = _damage(kind, store, names[1])
    assert record_status(store.root, names[1], fp)[1] == want
    with caplog.at_level(logging.WARNING, logger="emolens"):
        again = scale.capture(m, PROMPTS, sites, backend=_cfg(tmp_path), **KW)
    assert _equal(again, ref)  # bitwise the uninterrupted result
    assert scale.LAST_RUN["reused"] == 2  # only the damaged shard was computed again
    assert f"{names[1]} ({want})" in caplog.text  # ... and the log says why
    after = {n: (store.root / "steps" / f"{n}.json").stat().st_mtime_ns for n in names}
    assert after[names[0]] == markers[names[0]] and after[names[2]] == markers[names[2]]
    # the record is whole again: a third run reuses every shard
    scale.capture(m, PROMPTS, sites, backend=_cfg(tmp_path), **KW)
    assert scale.LAST_RUN["reused"] == 3


def test_changed_input_or_resume_off_is_not_reused(tiny_llama, tmp_path):
    m = tiny_llama
    sites = [resid(1)]
    scale.capture(m, PROMPTS, sites, backend=_cfg(tmp_path), **KW)
    changed = PROMPTS[:-1] + ["A different last prompt."]
    res = scale.capture(m, changed, sites, backend=_cfg(tmp_path), **KW)
    assert scale.LAST_RUN["reused"] == 0  # every shard's fingerprint covers the job's inputs
    assert _equal(res, capture(m, changed, sites, progress=False, **KW))
    assert not _equal(res, capture(m, PROMPTS, sites, progress=False, **KW))
    scale.capture(m, PROMPTS, sites, backend=_cfg(tmp_path), **KW)
    assert scale.LAST_RUN["reused"] == 3
    scale.capture(m, PROMPTS, sites, backend=_cfg(tmp_path, resume=False), **KW)
    assert scale.LAST_RUN["reused"] == 0

    # one record, same name, another fingerprint: not done, and the store says so
    store = scale.ShardStore(tmp_path / "x")
    a = scale.Shard("job/00000", len, {}, scale.fingerprint("x", torch.ones(3)))
    store.save(a, {"t": torch.arange(3.0)}, {"texts": ["hi"]})
    assert store.status(a) is None
    b = dataclasses.replace(a, fingerprint=scale.fingerprint("x", torch.tensor([1.0, 1.0, 1.01])))
    assert store.status(b) == "fingerprint changed"
    store.save(b, {}, {"texts": []})
    assert store.status(b) is None and store.load(b) == ({}, {"texts": []})


# -----------------------------------------------------------------------------------------------
# A pipeline step that shards its work: an unfinished step's finished shards are skipped on rerun
# -----------------------------------------------------------------------------------------------
@dataclass
class GenConfig(PipelineConfig):
    tokens: int = 4


STORIES = [f"Tell me story number {i} about the sea." for i in range(6)]
SEA = [f"Tell me about wave {i}." for i in range(4)]
RUNS: list[dict] = []
CRASH: list[bool] = []


def _gen_step(ctx):
    gk = {"max_new_tokens": ctx.config.tokens}
    a = generate_replies(ctx.model, STORIES, [None] * len(STORIES), gen_kwargs=gk, batch_size=2)  # 3 shards
    RUNS.append(dict(scale.LAST_RUN))
    if CRASH:
        raise RuntimeError("killed half-way through the step")
    b = generate_replies(ctx.model, SEA, [None] * len(SEA), gen_kwargs=gk, batch_size=2)  # 2 shards
    RUNS.append(dict(scale.LAST_RUN))
    return {"replies": a + b}


def test_rerun_of_an_unfinished_step_skips_its_finished_shards(tiny_llama, tmp_path):
    m = tiny_llama
    steps = (Step("gen", _gen_step, config=("tokens",)),)
    backend = scale.ScaleConfig(backend="local", shard_size=2)  # no run_dir: the step's folder holds the shards
    ref = (generate_replies(m, STORIES, [None] * 6, gen_kwargs={"max_new_tokens": 4}, batch_size=2)
           + generate_replies(m, SEA, [None] * 4, gen_kwargs={"max_new_tokens": 4}, batch_size=2))
    RUNS.clear()
    CRASH.append(True)
    try:
        with scale.use_backend(backend), pytest.raises(RuntimeError, match="half-way"):
            run_steps(steps, m, GenConfig(), tmp_path, progress=False)
    finally:
        CRASH.clear()
    shards = shard_folder(tmp_path, "gen")
    assert RUNS[-1]["reused"] == 0 and len(scale.ShardStore(shards).names()) == 3
    assert not (tmp_path / "steps" / "gen.json").exists()  # the step itself is unfinished

    RUNS.clear()
    with scale.use_backend(backend):
        ctx = run_steps(steps, m, GenConfig(), tmp_path, progress=False)
    assert [(r["shards"], r["reused"]) for r in RUNS] == [(3, 3), (2, 0)]  # the finished shards were skipped
    assert ctx.load("replies") == ref
    assert not shards.exists()  # the step is done: its shard records are gone with it

    # resume off: a crashed attempt's shards are not reused either
    CRASH.append(True)
    try:
        with scale.use_backend(backend), pytest.raises(RuntimeError):
            run_steps(steps, m, GenConfig(tokens=5), tmp_path, progress=False)
    finally:
        CRASH.clear()
    RUNS.clear()
    with scale.use_backend(backend):
        ctx = run_steps(steps, m, GenConfig(tokens=5), tmp_path, progress=False, resume=False)
    assert [r["reused"] for r in RUNS] == [0, 0]
    assert ctx.load("replies") == (
        generate_replies(m, STORIES, [None] * 6, gen_kwargs={"max_new_tokens": 5}, batch_size=2)
        + generate_replies(m, SEA, [None] * 4, gen_kwargs={"max_new_tokens": 5}, batch_size=2))
