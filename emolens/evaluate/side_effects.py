"""Side-effect card of an emotion-control result (steering, circuit modulation, prompting).

A judged accuracy alone can be bought with broken text, with replies that merely restate the
user's message, or with replies that name the target emotion outright. The card puts these next
to the accuracy:

* perplexity of the replies under the *unsteered* model, and its ratio to unsteered replies;
* distinct-2 (share of unique word bigrams);
* restatement rate: replies that copy or edit the user's text (:func:`restates`);
* emotion-name rate: replies that contain the target emotion's word or an inflection (:func:`names_emotion`);
* task retention: accuracy on project-written factual/arithmetic questions
  (``emolens/data/retention_qa.jsonl``) with vs without the intervention (:func:`retention_accuracy`).

:class:`Guards` holds the limits and :func:`select_operating_point` is the calibration rule, fixed
before any sweep: highest judged accuracy among settings that pass every guard (ties: the weaker
setting). It is meant to run on analysis data only.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from emolens.errors import DataError, InputError

from .lexicon import DATA_DIR, distinct_n, tokenize

__all__ = ["EMOTION_FORMS", "restatement_overlap", "restates", "names_emotion", "load_retention_qa",
           "answer_correct", "retention_accuracy", "Guards", "SideEffectCard", "side_effect_card",
           "select_operating_point"]

#: The emotion word and its inflections / same-stem derivations, per target emotion.
EMOTION_FORMS: dict[str, tuple[str, ...]] = {
    "anger": ("anger", "angers", "angered", "angering", "angry", "angrier", "angriest", "angrily"),
    "sadness": ("sad", "sadder", "saddest", "sadly", "sadness", "sadden", "saddened", "saddening", "saddens"),
    "happiness": ("happy", "happier", "happiest", "happily", "happiness"),
    "fear": ("fear", "fears", "feared", "fearing", "fearful", "fearfully", "fearfulness"),
    "surprise": ("surprise", "surprises", "surprised", "surprising", "surprisingly"),
    "disgust": ("disgust", "disgusts", "disgusted", "disgusting", "disgustingly"),
}

#: Phrases with which a chat model announces it is editing/rewriting the user's text.
EDIT_MARKERS = re.compile(
    r"\b(?:revised|edited|rewritten|polished|improved|corrected|proofread|reworded|rephrased)\s+version\b"
    r"|\bhere(?:'s| is) (?:a |an |the |my )?(?:revision|rewrite|rephrasing|edit)\b"
    r"|\bsuggested edits\b", re.IGNORECASE)


def _bigrams(tokens: list[str]) -> set[tuple[str, str]]:
    return set(zip(tokens, tokens[1:]))


def restatement_overlap(reply: str, prompt: str) -> float:
    """Share of the reply's distinct word bigrams that also occur in the prompt (0 when the reply has none)."""
    rb = _bigrams(tokenize(reply))
    if not rb:
        return 0.0
    return len(rb & _bigrams(tokenize(prompt))) / len(rb)


def restates(reply: str, prompt: str, threshold: float = 0.3) -> bool:
    """Does the reply restate or edit the user's text?

    True when :func:`restatement_overlap` is at least ``threshold`` or the reply announces an
    edit ("Here's a revised version of your text ...").
    """
    return restatement_overlap(reply, prompt) >= threshold or bool(EDIT_MARKERS.search(reply))


def names_emotion(reply: str, emotion: str) -> bool:
    """Does the reply contain the target emotion's word or one of its inflections (:data:`EMOTION_FORMS`)?"""
    forms = EMOTION_FORMS.get(emotion)
    if forms is None:
        raise InputError(f"names_emotion(): unknown emotion {emotion!r}; use one of {list(EMOTION_FORMS)}")
    return any(t in forms for t in tokenize(reply))


# --------------------------------------------------------------------------- task retention


def load_retention_qa(path: str | Path | None = None) -> list[dict]:
    """``[{"question": str, "answers": [str, ...]}, ...]`` (default: the project's 50 questions)."""
    p = Path(path) if path is not None else DATA_DIR / "retention_qa.jsonl"
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"Cannot read retention questions {p} ({e}); pass a JSONL file of "
                        "{\"question\": str, \"answers\": [str]} objects") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{i} is not valid JSON ({e.msg})") from None
        if not isinstance(r.get("question"), str) or not r.get("answers") or \
                not all(isinstance(a, str) and a.strip() for a in r["answers"]):
            raise DataError(f"{p}:{i} needs a string 'question' and a non-empty list of string 'answers'")
        out.append({"question": r["question"], "answers": list(r["answers"])})
    if not out:
        raise DataError(f"{p} has no questions")
    return out


def answer_correct(reply: str, answers: Sequence[str]) -> bool:
    """Is any accepted answer in the reply as a whole word/number (case-insensitive)?"""
    low = reply.lower()
    for a in answers:
        if re.search(r"(?<![\w])" + re.escape(a.lower()) + r"(?![\w])", low):
            return True
    return False


def retention_accuracy(generate_fn: Callable[[list[str], list[str]], list[str]], emotions: Sequence[str],
                       qa: Sequence[dict] | None = None) -> tuple[float, np.ndarray, list[str]]:
    """Accuracy on the retention questions under a control method.

    Args:
        generate_fn: ``(questions, emotions) -> replies``; question ``i`` is asked under the
            intervention (or prompt) for ``emotions[i]``. The emotions are assigned round-robin so
            each emotion's intervention answers about the same number of questions.
        emotions: the target emotions to cycle through (pass ``[None]`` for the unsteered model).

    Returns:
        ``(accuracy, correct [n] bool, replies)``.
    """
    qa = list(qa) if qa is not None else load_retention_qa()
    emos = [list(emotions)[i % len(emotions)] for i in range(len(qa))]
    replies = list(generate_fn([q["question"] for q in qa], emos))
    if len(replies) != len(qa):
        raise InputError(f"retention_accuracy(): generate_fn returned {len(replies)} replies for {len(qa)} questions")
    ok = np.array([answer_correct(r, q["answers"]) for r, q in zip(replies, qa)])
    return float(ok.mean()), ok, replies


# --------------------------------------------------------------------------- the card


@dataclass(frozen=True)
class Guards:
    """Side-effect limits an operating point must meet (fractions, not percent)."""

    max_ppl_ratio: float = 4.0
    max_restate: float = 0.20
    max_name: float = 0.30
    max_retention_drop: float = 0.10

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Guards":
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise InputError(f"Unknown Guards field(s) {bad}; valid: {sorted(names)}")
        return cls(**d)


@dataclass
class SideEffectCard:
    """Side effects of one control result. Rates are fractions; ``None`` where not measured."""

    method: str
    n: int
    ppl: float
    ppl_base: float
    distinct2: float
    restate_rate: float
    name_rate: float
    retention: float | None = None
    retention_base: float | None = None

    @property
    def ppl_ratio(self) -> float:
        return self.ppl / self.ppl_base if self.ppl_base and self.ppl_base == self.ppl_base else float("nan")

    @property
    def retention_drop(self) -> float | None:
        if self.retention is None or self.retention_base is None:
            return None
        return self.retention_base - self.retention

    def failures(self, guards: Guards) -> list[str]:
        """The guards this card fails (empty = passes). A NaN perplexity ratio fails."""
        out = []
        r = self.ppl_ratio
        if not (r == r and r <= guards.max_ppl_ratio):
            out.append(f"ppl ratio {r:.2f} > {guards.max_ppl_ratio:g}")
        if self.restate_rate > guards.max_restate:
            out.append(f"restate {self.restate_rate:.0%} > {guards.max_restate:.0%}")
        if self.name_rate > guards.max_name:
            out.append(f"names emotion {self.name_rate:.0%} > {guards.max_name:.0%}")
        d = self.retention_drop
        if d is not None and d > guards.max_retention_drop:
            out.append(f"retention drop {d:.0%} > {guards.max_retention_drop:.0%}")
        return out

    def passes(self, guards: Guards) -> bool:
        return not self.failures(guards)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ppl_ratio"] = self.ppl_ratio
        d["retention_drop"] = self.retention_drop
        return d


def side_effect_card(method: str, prompts: Sequence[str], replies: Sequence[str], targets: Sequence[str], *,
                     ppl: float, ppl_base: float, retention: float | None = None,
                     retention_base: float | None = None, restate_threshold: float = 0.3) -> SideEffectCard:
    """Build a :class:`SideEffectCard` from replies, the user texts they answer and their targets.

    ``ppl`` / ``ppl_base`` are corpus perplexities under the unsteered model (of these replies and
    of unsteered replies to the same prompts), e.g. from :func:`emolens.evaluate.corpus_perplexity`.
    """
    prompts, replies, targets = list(prompts), list(replies), list(targets)
    if not replies or not (len(prompts) == len(replies) == len(targets)):
        raise InputError(f"side_effect_card(): need equal, non-zero numbers of prompts ({len(prompts)}), replies "
                         f"({len(replies)}) and targets ({len(targets)})")
    d2 = float(distinct_n(replies, 2)) if any(r.strip() for r in replies) else 0.0
    return SideEffectCard(
        method=method, n=len(replies), ppl=float(ppl), ppl_base=float(ppl_base),
        distinct2=d2 if d2 == d2 else 0.0,
        restate_rate=float(np.mean([restates(r, p, restate_threshold) for r, p in zip(replies, prompts)])),
        name_rate=float(np.mean([names_emotion(r, t) for r, t in zip(replies, targets)])),
        retention=retention, retention_base=retention_base)


def select_operating_point(rows: Sequence[Mapping[str, Any]], guards: Guards, *, accuracy: str = "accuracy",
                           strength: str = "value") -> Mapping[str, Any] | None:
    """The calibration rule (fixed before the sweep): among ``rows`` whose ``card`` passes ``guards``,
    the one with the highest ``accuracy``; ties go to the smaller ``strength``. None if none passes.

    Each row is a mapping with at least ``accuracy``, ``strength`` and ``card`` (a :class:`SideEffectCard`).
    """
    ok = [r for r in rows if r["card"].passes(guards)]
    if not ok:
        return None
    return sorted(ok, key=lambda r: (-float(r[accuracy]), float(r[strength])))[0]


def card_table(cards: Sequence[SideEffectCard], guards: Guards | None = None) -> pd.DataFrame:
    """One row per card (percent for rates), with a ``passes`` column when ``guards`` is given."""
    rows = []
    for c in cards:
        r = {"method": c.method, "n": c.n, "ppl": round(c.ppl, 2), "ppl_ratio": round(c.ppl_ratio, 2),
             "distinct2": round(c.distinct2, 3), "restate_%": round(100 * c.restate_rate, 1),
             "names_emotion_%": round(100 * c.name_rate, 1),
             "retention_%": None if c.retention is None else round(100 * c.retention, 1),
             "retention_drop_pts": None if c.retention_drop is None else round(100 * c.retention_drop, 1)}
        if guards is not None:
            r["passes"] = c.passes(guards)
            r["fails"] = "; ".join(c.failures(guards))
        rows.append(r)
    return pd.DataFrame(rows)


__all__ += ["card_table", "EDIT_MARKERS"]
