"""Fluency of generated text: perplexity under a reference (usually the unsteered) model.

Steering that pushes a model off its manifold shows up as text the *unsteered* model finds
unlikely. :func:`perplexity` teacher-forces each reply after its prompt (chat template as in
generation) and returns ``exp(mean negative log-likelihood per reply token)`` per reply;
:func:`corpus_perplexity` pools the tokens of all replies (a token-weighted geometric mean, robust
to a few very short replies). Note that perplexity *rewards* repetition, so pair it with a
repetition measure such as distinct-n (:func:`emolens.evaluate.distinct_n`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from emolens.errors import InputError

__all__ = ["reply_nll", "perplexity", "corpus_perplexity"]


def reply_nll(model, prompts: Sequence[Any], texts: Sequence[str], *, interventions=None, chat: bool | None = None,
              system: str | None = None, batch_size: int = 16, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Summed negative log-likelihood (nats) and token count of each reply given its prompt.

    Args:
        model: an :class:`~emolens.model.EmoModel` (the reference model; ``interventions`` optional).
        prompts: the prompts the replies answer (user strings or message lists), one per text.
        texts: the replies.

    Returns:
        ``(nll [n], n_tokens [n])`` as numpy arrays; an empty reply has ``nll = 0``, ``n_tokens = 0``.

    Raises:
        InputError: no texts, or prompts and texts of different lengths.
        MetricError: the model returns non-finite log-probabilities.
    """
    from emolens.errors import MetricError
    from emolens.progress import progress_bar

    prompts, texts = list(prompts), list(texts)
    if not texts:
        raise InputError("perplexity(): the evaluation set is empty; pass at least one reply to score.")
    if len(prompts) != len(texts):
        raise InputError(f"perplexity(): {len(prompts)} prompts but {len(texts)} texts; pass the prompt of every reply.")
    if any(not isinstance(t, str) for t in texts):
        raise InputError("perplexity(): texts must be strings (decoded replies).")
    nll = np.zeros(len(texts))
    ntok = np.zeros(len(texts), dtype=np.int64)
    # sort by length so batches pad little
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(order), batch_size)
    for s in progress_bar(starts, desc="perplexity", disable=not progress or len(starts) < 2):
        idx = order[s:s + batch_size]
        lp, n = model.continuation_logprobs([prompts[i] for i in idx], [texts[i] for i in idx],
                                            interventions=interventions, chat=chat, system=system)
        lp, n = lp.detach().double().cpu(), n.cpu()
        if not torch.isfinite(lp).all():
            raise MetricError("perplexity(): the reference model produced non-finite log-probabilities; "
                              "check its dtype (use float32) and any interventions passed.")
        for j, i in enumerate(idx):
            nll[i] = -float(lp[j])
            ntok[i] = int(n[j])
    return nll, ntok


def perplexity(model, prompts: Sequence[Any], texts: Sequence[str], **kw) -> np.ndarray:
    """Per-reply perplexity ``exp(NLL / n_tokens)`` of ``texts`` after ``prompts`` under ``model``.

    Pass the *unsteered* model (no ``interventions``) to measure how far steering moved the text
    from what the model finds fluent. Replies with no tokens get NaN. Keyword arguments go to
    :func:`reply_nll` (``chat``, ``system``, ``batch_size``, ``interventions``, ``progress``).

    Returns:
        ``[n]`` float array.
    """
    nll, n = reply_nll(model, prompts, texts, **kw)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, np.exp(nll / np.maximum(n, 1)), np.nan)


def corpus_perplexity(model, prompts: Sequence[Any], texts: Sequence[str], **kw) -> float:
    """Token-pooled perplexity ``exp(sum NLL / sum tokens)`` over all replies (NaN if none has tokens).

    Each distinct (prompt, reply) pair is scored once and weighted by its count: the same value with
    less work when rows repeat (e.g. one unsteered reply per target emotion).
    """
    import json

    prompts, texts = list(prompts), list(texts)
    if len(prompts) != len(texts):
        raise InputError(f"corpus_perplexity(): {len(prompts)} prompts but {len(texts)} replies; pass one each.")
    keys = [json.dumps(p, sort_keys=True, default=str) + "\x00" + str(t) for p, t in zip(prompts, texts)]
    first: dict[str, int] = {}
    count: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
        count[k] = count.get(k, 0) + 1
    uniq = list(first.values())
    nll, n = reply_nll(model, [prompts[i] for i in uniq], [texts[i] for i in uniq], **kw)
    w = np.array([count[keys[i]] for i in uniq], dtype=float)
    total = float((w * np.asarray(n, dtype=float)).sum())
    return math.exp(float((w * np.asarray(nll, dtype=float)).sum()) / total) if total else float("nan")
