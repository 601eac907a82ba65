"""Metrics: values against hand computations and independent model paths; bad metric output."""

from __future__ import annotations

import pytest
import torch

from emolens import resid, run_with_cache
from emolens.errors import EmolensError, InputError, MetricError
from emolens.metrics import Metric, as_metric, continuation_logprob_diff, logit_diff, projection

PROMPTS = ["I feel great today", "The meeting moved", "Hi"]


def test_logit_diff_matches_hand_computation(tiny_llama):
    m = tiny_llama
    b = m.encode(PROMPTS)
    logits = m.forward(b)
    good, bad = m.tokenizer("a", add_special_tokens=False)["input_ids"][0], m.tokenizer("b", add_special_tokens=False)["input_ids"][0]
    got = logit_diff(m, "a", ["b", "c"])(logits, b, {})
    c = m.tokenizer("c", add_special_tokens=False)["input_ids"][0]
    for i in range(len(PROMPTS)):
        last = logits[i, -1]  # left padding: t* is the last slot
        want = last[good] - (last[bad] + last[c]) / 2
        assert abs(float(got[i] - want)) < 1e-5
    # a prompt position (0 = first real token) and per-prompt token sets
    first = logit_diff(m, good, bad, pos=0)(logits, b, {})
    for i in range(len(PROMPTS)):
        off = int(b.pad_offset[i])
        assert abs(float(first[i] - (logits[i, off, good] - logits[i, off, bad]))) < 1e-5
    per = logit_diff(m, [["a"], ["b"], ["c"]], ["d"])(logits, b, {})
    d = m.tokenizer("d", add_special_tokens=False)["input_ids"][0]
    assert abs(float(per[1] - (logits[1, -1, bad] - logits[1, -1, d]))) < 1e-5


def test_continuation_logprob_diff_equals_model_path(tiny_llama):
    m = tiny_llama
    metric = continuation_logprob_diff(m, " yes please", [" no", " nope", " never!"])
    b = metric.encode(m, PROMPTS)
    assert len(b) == 2 * len(PROMPTS) and metric.rows_per_prompt == 2
    per_prompt = metric.per_prompt(metric(m.forward(b), b, {}))
    pos, _ = m.continuation_logprobs(PROMPTS, [" yes please"] * 3)
    neg, _ = m.continuation_logprobs(PROMPTS, [" no", " nope", " never!"])
    assert torch.allclose(per_prompt, pos - neg, atol=1e-4)


def test_projection_reads_the_cache(tiny_llama):
    m = tiny_llama
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    met = projection(resid(2), v)
    assert met.sites == (resid(2),)
    b = m.encode(PROMPTS)
    logits, cache = run_with_cache(m, b, [resid(2)])
    got = met(logits, b, cache)
    h = cache["blocks.2.hook_resid_post"][:, -1]
    assert torch.allclose(got, h @ (v / v.norm()), atol=1e-5)
    mean = projection(resid(2), v, pos="mean", normalize=False)(logits, b, cache)
    i = 2
    off = int(b.pad_offset[i])
    assert abs(float(mean[i] - cache["blocks.2.hook_resid_post"][i, off:].mean(0) @ v)) < 1e-4
    with pytest.raises(MetricError):
        met(logits, b, {})  # site missing from the cache
    with pytest.raises(InputError):
        projection(resid(2), torch.zeros(m.d_model))


def test_as_metric_wraps_callables_and_rejects_bad_output(tiny_llama):
    m = tiny_llama
    b = m.encode(PROMPTS)
    logits = m.forward(b)
    one = as_metric(lambda lg: lg[:, -1, 0])
    two = as_metric(lambda lg, batch: lg[torch.arange(len(batch)), batch.last_prompt_index, 0])
    assert torch.allclose(one(logits, b), two(logits, b))
    assert isinstance(one, Metric) and as_metric(one) is one
    with pytest.raises(MetricError, match="scalar"):
        as_metric(lambda lg: lg[:, -1, 0].mean())(logits, b)
    with pytest.raises(MetricError, match="shape"):
        as_metric(lambda lg: lg[:, :, 0])(logits, b)
    with pytest.raises(MetricError, match="NaN"):
        as_metric(lambda lg: lg[:, -1, 0] * float("nan"))(logits, b)
    with pytest.raises(EmolensError):
        as_metric(3)


def test_logit_diff_bad_tokens(tiny_llama):
    with pytest.raises(InputError, match="tokens"):
        logit_diff(tiny_llama, "happy", "sad")  # multi-token under the byte tokenizer
    with pytest.raises(InputError):
        logit_diff(tiny_llama, 10 ** 9, 1)
