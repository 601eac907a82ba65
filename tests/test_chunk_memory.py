"""Attribution and exact patching hold one chunk at a time (issue 11: their peak memory grew with
the number of prompts). Not timed: these check the mechanism — no reference cycle keeps a chunk's
tensors alive, the number of live tensors does not grow from chunk to chunk, and per-prompt values
land in the right rows whatever the chunking."""

from __future__ import annotations

import gc

import pytest
import torch

import emolens.attribution as attribution_mod
import emolens.patching as patching_mod
from emolens.attribution import attribute
from emolens.metrics import logit_diff
from emolens.patching import patch

CLEAN = ["I am glad", "The cat sat on it", "Hi", "We ran home", "A bird sang", "It is warm"]
CORR = ["I am sad!", "The dog sat on it", "Yo", "We ran away", "A fish sang", "It is cold"]


def _run(m, op: str, batch_size: int = 1):
    ld = logit_diff(m, "a", "b")
    if op == "attribute":
        return attribute(m, CLEAN, CORR, ld, nodes=("resid", "heads", "neurons"), batch_size=batch_size,
                         align="right", progress=False)
    return patch(m, CLEAN, CORR, ld, nodes="heads", candidates={1: [0, 2], 3: [1]}, batch_size=batch_size,
                 align="right", progress=False)


@pytest.mark.parametrize("op", ["attribute", "patch"])
def test_no_reference_cycle_keeps_tensors_alive(tiny_llama, op):
    """A cycle through a chunk's activations frees them only when Python's cyclic collector runs
    (the _Recorder callbacks once closed over the recorder: 32 tensors per call on tiny-llama)."""
    _run(tiny_llama, op, batch_size=2)  # warm: lazily built module state is not garbage
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        _run(tiny_llama, op, batch_size=2)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
    assert cyclic == [], f"{len(cyclic)} tensors were only reachable through reference cycles"


@pytest.mark.parametrize("op", ["attribute", "patch"])
def test_live_tensors_do_not_grow_with_chunks(tiny_llama, op, monkeypatch):
    """Count live tensors (cyclic garbage included: the collector is off) at every progress step
    of a 6-chunk run; from the second chunk on, the count at the same step of each chunk is the same."""
    mod = attribution_mod if op == "attribute" else patching_mod
    counts: list[int] = []

    def counting_bar(it, **kw):
        for x in it:
            counts.append(sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor)))
            yield x

    monkeypatch.setattr(mod, "progress_bar", counting_bar)
    _run(tiny_llama, op)  # warm-up
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        counts.clear()
        _run(tiny_llama, op)  # batch_size=1: one pair per chunk, 6 chunks
    finally:
        if was_enabled:
            gc.enable()
    per_chunk = len(counts) // len(CLEAN)
    assert per_chunk * len(CLEAN) == len(counts) and per_chunk >= 2
    by_chunk = [counts[i * per_chunk:(i + 1) * per_chunk] for i in range(len(CLEAN))]
    assert all(c == by_chunk[1] for c in by_chunk[2:]), by_chunk


def test_per_prompt_rows_are_filled_whatever_the_chunking(tiny_llama):
    """Means and standard errors from uneven chunks (2+2+2, 4+2, 6) equal those of the six
    single-pair runs stacked by hand (an independent reference for the row bookkeeping)."""
    m = tiny_llama
    ld = logit_diff(m, "a", "b")
    singles = [attribute(m, [a], [b], ld, nodes=("heads", "neurons"), progress=False) for a, b in zip(CLEAN, CORR)]
    n = len(CLEAN)
    for bs in (2, 4, 6):
        res = attribute(m, CLEAN, CORR, ld, nodes=("heads", "neurons"), batch_size=bs, progress=False)
        for key in ("heads", "neurons"):
            ref = torch.stack([s[key].scores for s in singles])
            assert torch.allclose(res[key].scores, ref.mean(0), atol=1e-6, rtol=1e-5)
            assert torch.allclose(res[key].extra["stderr"], ref.std(0) / n ** 0.5, atol=1e-6, rtol=1e-5)
        mc = torch.tensor([s["heads"].meta["clean_metric"] for s in singles])
        assert abs(res["heads"].meta["clean_metric"] - float(mc.mean())) < 1e-5
