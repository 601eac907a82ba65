"""Paper 2 prompts: the SEV records as chat prompts, and the read/injection position t*.

Two prompt templates (exact strings of the paper's code, configurable):

- **P_emo(e)** (elicitation, directions, neuron/head scoring): system
  ``"Always reply in {emotion}.\\nKeep the reply to at most two sentences."``, user
  ``"{scenario}\\n{event}"``.
- **P_neu** (steering, sublayer influence, circuit modulation): system
  ``"Keep the reply to at most two sentences."``, same user turn. No emotion is named.

**t\\*** (best reading: the paper's code, not "the last token of the user input") is the last token
of the *templated* prompt (the chat template's generation prompt,
e.g. ``<|im_start|>assistant\\n``), which is :meth:`emolens.Pos.last` in emolens; every read and
every injection of the paper happens there (``Pos.from_last()`` for injections during generation:
t* at prefill and every generated token, as with the paper's KV-cached hooks).

Emotions are always indexed by name (:data:`EMOTIONS` is only the default order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from jaxtyping import Int

from ..errors import DataError, InputError
from ..sites import Pos

__all__ = ["EMOTIONS", "VALENCES", "SYSTEM_EMO", "SYSTEM_NEU", "T_STAR", "SEVItem", "PromptSet", "sev_items",
           "check_emotions", "p_emo", "p_neu", "emo_prompts", "neu_prompts", "t_star_index"]

#: Paper 2's six Ekman emotions (stage 01-06 order).
EMOTIONS: tuple[str, ...] = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")
#: SEV valences, in the paper's order.
VALENCES: tuple[str, ...] = ("positive", "neutral", "negative")
#: System prompt of P_emo (``{emotion}`` is filled in).
SYSTEM_EMO = "Always reply in {emotion}.\nKeep the reply to at most two sentences."
#: System prompt of P_neu.
SYSTEM_NEU = "Keep the reply to at most two sentences."
#: The read / injection position of paper 2 (last token of the templated prompt).
T_STAR = Pos.last()

Message = dict


@dataclass(frozen=True)
class SEVItem:
    """One scenario-event pair: a SEV record at one valence.

    Attributes:
        skeleton_id: the record's id; ``(skeleton_id, valence)`` is the *group* whose six emotion
            prompts share all context (the group mean is subtracted in the direction recipe).
        theme, scenario, event, valence: the record's fields.
    """

    skeleton_id: str
    theme: str
    valence: str
    scenario: str
    event: str

    @property
    def user(self) -> str:
        """The user turn: ``"{scenario}\\n{event}"``."""
        return f"{self.scenario}\n{self.event}"

    @property
    def group(self) -> tuple[str, str]:
        return (self.skeleton_id, self.valence)


@dataclass
class PromptSet:
    """Chat prompts with their SEV keys.

    Attributes:
        prompts: message lists (system + user), one per row.
        items: the :class:`SEVItem` of each row.
        emotions: the P_emo emotion of each row, or the emotion the row is *evaluated against*
            (P_neu rows used for steering/modulation towards that emotion); None for plain P_neu.
    """

    prompts: list[list[Message]]
    items: list[SEVItem]
    emotions: list[str | None]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def keys(self) -> list[tuple[str, str, str | None]]:
        """``(skeleton_id, valence, emotion)`` per row."""
        return [(it.skeleton_id, it.valence, e) for it, e in zip(self.items, self.emotions)]

    def subset(self, rows: Sequence[int]) -> "PromptSet":
        rows = list(rows)
        return PromptSet([self.prompts[i] for i in rows], [self.items[i] for i in rows],
                         [self.emotions[i] for i in rows])

    def where(self, emotion: str) -> "PromptSet":
        """Rows whose emotion is ``emotion``."""
        return self.subset([i for i, e in enumerate(self.emotions) if e == emotion])


def check_emotions(emotions: Iterable[str] | str | None) -> tuple[str, ...]:
    """Validate emotion names (lower-cased); unknown names raise :class:`InputError`."""
    if emotions is None:
        return EMOTIONS
    if isinstance(emotions, str):
        emotions = [emotions]
    out = tuple(str(e).strip().lower() for e in emotions)
    if not out:
        raise InputError(f"No emotions given; pass some of {list(EMOTIONS)}.")
    bad = [e for e in out if e not in EMOTIONS]
    if bad:
        raise InputError(f"Unknown emotion name(s) {bad}; paper 2's emotions are {list(EMOTIONS)} "
                         "(use these exact names; 'joy' is 'happiness').")
    if len(set(out)) != len(out):
        raise InputError(f"Emotion list {list(out)} names an emotion twice; list each once.")
    return out


def _check_valences(valences: Iterable[str] | None) -> tuple[str, ...]:
    if valences is None:
        return VALENCES
    out = tuple(str(v).strip().lower() for v in valences)
    bad = [v for v in out if v not in VALENCES]
    if bad or not out:
        raise InputError(f"Unknown valence(s) {bad or out}; use some of {list(VALENCES)}.")
    return out


def sev_items(records: "Iterable[dict] | str | Path", valences: Iterable[str] | None = None, *,
              per_theme: int | None = None) -> list[SEVItem]:
    """Expand SEV records into scenario-event items (record order, then valence order).

    Args:
        records: a ``datasets.Dataset`` from :func:`emolens.datasets.load_sev`, a list of record
            dicts (``theme``, ``scenario``, ``event{positive,neutral,negative}``, ``skeleton_id``),
            or a path to a SEV-format JSONL file.
        valences: which valences to use (default all three).
        per_theme: keep only the first ``per_theme`` records of each theme (quick runs).

    Raises:
        DataError: a record lacks a field or one of the requested valences.
    """
    if isinstance(records, (str, Path)):
        from ..datasets import load_sev

        records = load_sev(records)
    vals = _check_valences(valences)
    out: list[SEVItem] = []
    seen_theme: dict[str, int] = {}
    seen_id: set[str] = set()
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"SEV record {i} is {type(r).__name__}; each record must be a dict with theme, "
                            "scenario, event and skeleton_id.")
        missing = [k for k in ("theme", "scenario", "event", "skeleton_id") if r.get(k) in (None, "")]
        if missing:
            raise DataError(f"SEV record {i} lacks {missing}; each record needs theme, scenario, event "
                            "{positive, neutral, negative} and skeleton_id.")
        ev = r["event"]
        if not isinstance(ev, dict):
            raise DataError(f"SEV record {i} ({r['skeleton_id']}): 'event' must be an object with keys "
                            f"{list(VALENCES)}, got {type(ev).__name__}.")
        sid = str(r["skeleton_id"])
        if sid in seen_id:
            raise DataError(f"SEV record {i}: skeleton_id {sid!r} is repeated; ids must be unique (they key the "
                            "context groups).")
        seen_id.add(sid)
        theme = str(r["theme"])
        seen_theme[theme] = seen_theme.get(theme, 0) + 1
        if per_theme is not None and seen_theme[theme] > per_theme:
            continue
        for v in vals:
            text = ev.get(v)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"SEV record {i} ({sid}) has no {v!r} event (missing valence); every record "
                                f"needs non-empty events for {list(vals)}. Fix the record or pass valences= "
                                "to use only the valences it has.")
            out.append(SEVItem(sid, theme, v, str(r["scenario"]).strip(), text.strip()))
    if not out:
        raise DataError("No SEV items: the records are empty (or per_theme=0).")
    return out


def p_emo(item: SEVItem, emotion: str, system_template: str = SYSTEM_EMO) -> list[Message]:
    """P_emo(e): system ``Always reply in {emotion}.`` + two-sentence limit; user = scenario + event."""
    check_emotions([emotion])
    return [{"role": "system", "content": system_template.format(emotion=emotion)},
            {"role": "user", "content": item.user}]


def p_neu(item: SEVItem, system: str = SYSTEM_NEU) -> list[Message]:
    """P_neu: the two-sentence system prompt only (no emotion named); user = scenario + event."""
    return [{"role": "system", "content": system}, {"role": "user", "content": item.user}]


def emo_prompts(items: Sequence[SEVItem], emotions: Iterable[str] | None = None,
                system_template: str = SYSTEM_EMO) -> PromptSet:
    """P_emo prompts for every (item, emotion), item-major (the six emotions of a group are adjacent)."""
    emos = check_emotions(emotions)
    prompts, its, es = [], [], []
    for it in items:
        for e in emos:
            prompts.append(p_emo(it, e, system_template))
            its.append(it)
            es.append(e)
    return PromptSet(prompts, its, es)


def neu_prompts(items: Sequence[SEVItem], emotions: Iterable[str] | None = None,
                system: str = SYSTEM_NEU) -> PromptSet:
    """P_neu prompts; with ``emotions``, one row per (item, target emotion) (for steering/modulation)."""
    if emotions is None:
        return PromptSet([p_neu(it, system) for it in items], list(items), [None] * len(items))
    emos = check_emotions(emotions)
    prompts, its, es = [], [], []
    for it in items:
        for e in emos:
            prompts.append(p_neu(it, system))
            its.append(it)
            es.append(e)
    return PromptSet(prompts, its, es)


def t_star_index(batch) -> Int[torch.Tensor, "batch"]:
    """Padded index of t* (the last token of the templated prompt) in each row of a Batch."""
    return batch.last_prompt_index
