"""Shipped datasets and their loaders.

emolens ships small, hand-written JSONL files under ``emolens/data/``. Each loader
below reads one of them (or any file in the same format that you pass as ``path``),
checks every record against its schema, and returns a Hugging Face
:class:`datasets.Dataset` with one row per record, in file order.

Every problem with a file (missing file, empty file, invalid JSON, a missing field, an
unknown emotion, a duplicated id, ...) raises :class:`emolens.errors.DataError`. The
message names the file, the line number and how to fix it. Blank lines are skipped;
keys that a schema does not list are ignored.

Schemas (one JSON object per line)
----------------------------------

``contrastive_pairs.jsonl``: minimal pairs for emotion vectors (paper 1, section 2.2)::

    {"id": "joy-001", "emotion": "joy",
     "positive": "I'm so glad you came over tonight.",
     "negative": "I'm aware you came over tonight.",
     "split": "train"}

* ``emotion``: one of :data:`EMOTIONS_PLUTCHIK`.
* ``positive``: a sentence expressing the emotion; ``negative``: the same sentence
  minimally edited to be neutral or opposite (same structure, at most 2 words longer or
  shorter in the shipped file).
* ``split``: ``"train"`` or ``"heldout"``. The shipped file holds 64 pairs per emotion
  and marks every 4th pair of each emotion as ``"heldout"`` (16 per emotion).
* ``id`` and ``split`` may be left out in your own files: ``id`` then defaults to
  ``"<emotion>-NNN"`` (NNN counts the records of that emotion, from 001) and ``split`` to
  the same every-4th-is-heldout rule.

``diagnostic_tasks.jsonl``: prompts with an emotionally aligned and a misaligned
reply, for localisation by attribution/activation patching (paper 1, section 2.1)::

    {"id": "diag-001", "prompt": "I finally finished knitting my first scarf!",
     "aligned": "That's wonderful! ...", "misaligned": "So what? ...", "emotion": "joy"}

* ``aligned``: a warm, engaged reply; ``misaligned``: a cold, hostile or dismissive reply
  of similar length. ``emotion``: the emotion the aligned reply carries, one of
  :data:`EMOTIONS_PLUTCHIK` (the shipped file uses ``"joy"`` and ``"trust"``, 26 each).
* ``id`` is optional (default ``"diag-NNN"`` by record number).

``openers.jsonl``: 120 everyday conversation openers for evaluating steered replies;
none of them appears in the other files::

    {"id": "open-001", "text": "Hey, how's your week been so far?"}

* ``id`` is optional (default ``"open-NNN"`` by record number).

``sev_analysis.jsonl`` / ``sev_test.jsonl``: scenario-event data in the format of the SEV
dataset (paper 2, section 2.2), written from scratch for emolens::

    {"theme": "work",
     "scenario": "I finished the quarterly report and sent it to my manager this morning.",
     "event": {"positive": "...", "neutral": "...", "negative": "..."},
     "skeleton_id": "work-a01"}

* ``scenario`` is a neutral first-person situation; ``event`` holds three outcomes, one
  per valence in :data:`SEV_VALENCES`. No record names an emotion: the six emotions of
  :data:`EMOTIONS_SEV` are applied later through prompts.
* Shipped: 8 themes (work, family, health, travel, school, friendship, money, home);
  12 scenarios per theme in the analysis split (96 records, ids ``<theme>-aNN``) and
  6 in the test split (48 records, ids ``<theme>-tNN``); the two splits share no scenario.
* ``sev_confirm.jsonl`` (24 records, 3 per theme, ids ``<theme>-cNN``): a confirmation test
  split written after the control protocol of ``benchmarks/control.py`` was fixed and never used
  for tuning; it shares no 6-word sequence with the other SEV, story or judge files. Load it with
  ``load_sev(path)``; it is not a ``split``.
* ``sev_confirm2.jsonl`` (24 records, 3 per theme, ids ``<theme>-dNN``): a second confirmation
  test file, written the same way before any run on it; it also shares no 6-word sequence with
  ``sev_confirm.jsonl``.
* ``sev_confirm3.jsonl`` (24 records, 3 per theme, ids ``<theme>-eNN``): a third one, written
  the same way; it shares no 6-word sequence with either earlier confirmation file.
* ``sev_confirm4.jsonl`` (24 records, 3 per theme, ids ``<theme>-fNN``): a fourth one, written
  the same way; it shares no 6-word sequence with any earlier confirmation file.
* ``sev_confirm5.jsonl`` (24 records, 3 per theme, ids ``<theme>-gNN``): a fifth one, written
  the same way; it shares no 6-word sequence with any earlier confirmation file.
* ``sev_confirm6.jsonl`` (24 records, 3 per theme, ids ``<theme>-hNN``): a sixth one, written
  the same way; it shares no 6-word sequence with any earlier confirmation file.
* ``skeleton_id`` must be unique within a file (a string; integers are converted).
  :func:`load_sev` also reads the original SEV files (``sev.jsonl``, ``test_set.jsonl``).

``judge_train.jsonl`` / ``judge_eval.jsonl``: labelled sentences for the emotion judges
(paper 2): the probe judge trains on the first, every judge's held-out accuracy is measured
on the second (192 sentences, 32 per emotion, none of them in the training file)::

    {"text": "How dare you speak to my mother like that!", "emotion": "anger"}

* ``emotion``: one of :data:`EMOTIONS_SEV`; the training file may also use ``"neutral"``.

:data:`SCHEMAS` holds the same information as a dict, for programs.
"""

from __future__ import annotations

import json
import os
from difflib import get_close_matches
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Union

from emolens.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "EMOTIONS_PLUTCHIK",
    "EMOTIONS_SEV",
    "SEV_VALENCES",
    "PAIR_SPLITS",
    "SEV_SPLITS",
    "HELDOUT_EVERY",
    "SCHEMAS",
    "load_contrastive_pairs",
    "load_diagnostic_tasks",
    "load_openers",
    "load_sev",
    "load_judge_labelled",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Plutchik's eight basic emotions, in wheel order: item ``i`` and item ``i + 4`` are
#: opposites (joy/sadness, trust/disgust, fear/anger, surprise/anticipation).
EMOTIONS_PLUTCHIK: tuple[str, ...] = (
    "joy", "trust", "fear", "surprise", "sadness", "disgust", "anger", "anticipation",
)

#: The six emotions of paper 2 (SEV), in the order of its stages 01-06. Index by name.
EMOTIONS_SEV: tuple[str, ...] = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")

#: The three event variants of every SEV record.
SEV_VALENCES: tuple[str, ...] = ("positive", "neutral", "negative")

#: Values of the ``split`` field of a contrastive pair.
PAIR_SPLITS: tuple[str, ...] = ("train", "heldout")

#: Shipped SEV splits, for ``load_sev(split=...)``.
SEV_SPLITS: tuple[str, ...] = ("analysis", "test")

#: Every ``HELDOUT_EVERY``-th pair of each emotion is held out (when a file gives no split).
HELDOUT_EVERY: int = 4

_RECORD_KIND = {"contrastive_pairs": "contrastive-pair", "diagnostic_tasks": "diagnostic-task",
                "openers": "opener", "sev": "SEV", "judge_labelled": "labelled-sentence"}
_FIELD_PLACEHOLDER = {"event": '{"positive": "...", "neutral": "...", "negative": "..."}'}

_DATA_PACKAGE = "emolens"
_DATA_DIR = "data"

SCHEMAS: dict[str, dict[str, Any]] = {
    "contrastive_pairs": {
        "file": "contrastive_pairs.jsonl",
        "loader": "load_contrastive_pairs",
        "description": "Minimal pairs: a sentence expressing an emotion and the same sentence "
                       "minimally edited to be neutral or opposite.",
        "fields": {
            "id": "str, unique; optional (default '<emotion>-NNN')",
            "emotion": f"str, one of {', '.join(EMOTIONS_PLUTCHIK)}",
            "positive": "str, sentence expressing the emotion",
            "negative": "str, same sentence minimally edited to be neutral or opposite",
            "split": "'train' or 'heldout'; optional (default: every 4th pair of each "
                     "emotion is 'heldout')",
        },
        "required": ("emotion", "positive", "negative"),
        "example": {"id": "joy-001", "emotion": "joy",
                    "positive": "I'm so glad you came over tonight.",
                    "negative": "I'm aware you came over tonight.", "split": "train"},
    },
    "diagnostic_tasks": {
        "file": "diagnostic_tasks.jsonl",
        "loader": "load_diagnostic_tasks",
        "description": "Conversational prompts with an emotionally aligned and a misaligned "
                       "reply of similar length (for attribution/activation patching).",
        "fields": {
            "id": "str, unique; optional (default 'diag-NNN')",
            "prompt": "str, the user message",
            "aligned": "str, warm and engaged reply",
            "misaligned": "str, cold, hostile or dismissive reply",
            "emotion": f"str, one of {', '.join(EMOTIONS_PLUTCHIK)}",
        },
        "required": ("prompt", "aligned", "misaligned", "emotion"),
        "example": {"id": "diag-001", "prompt": "I finally finished knitting my first scarf!",
                    "aligned": "That's wonderful! Your first scarf is a real milestone.",
                    "misaligned": "So what? It's just a scarf, nobody needs another one.",
                    "emotion": "joy"},
    },
    "openers": {
        "file": "openers.jsonl",
        "loader": "load_openers",
        "description": "Everyday conversation openers for evaluating (steered) replies.",
        "fields": {
            "id": "str, unique; optional (default 'open-NNN')",
            "text": "str, the user message",
        },
        "required": ("text",),
        "example": {"id": "open-001", "text": "Hey, how's your week been so far?"},
    },
    "sev": {
        "file": {"analysis": "sev_analysis.jsonl", "test": "sev_test.jsonl"},
        "loader": "load_sev",
        "description": "Scenario-event records in SEV format: a neutral first-person scenario "
                       "and three outcomes (positive, neutral, negative), with no emotion words.",
        "fields": {
            "theme": "str, e.g. 'work'",
            "scenario": "str, neutral first-person situation",
            "event": "object with str fields 'positive', 'neutral', 'negative'",
            "skeleton_id": "str, unique within the file",
        },
        "required": ("theme", "scenario", "event", "skeleton_id"),
        "example": {"theme": "work",
                    "scenario": "I finished the quarterly report and sent it to my manager "
                                "this morning.",
                    "event": {"positive": "My manager replied that the report was the "
                                          "clearest she had seen.",
                              "neutral": "My manager replied that she will read it on Thursday.",
                              "negative": "My manager replied that half the figures were "
                                          "wrong."},
                    "skeleton_id": "work-a01"},
    },
    "judge_labelled": {
        "file": {"train": "judge_train.jsonl", "eval": "judge_eval.jsonl"},
        "loader": "load_judge_labelled",
        "description": "Sentences labelled with the emotion they express: the probe judge's training set "
                       "and the held-out set every judge's accuracy is measured on.",
        "fields": {
            "text": "str, the sentence",
            "emotion": f"str, one of {', '.join(EMOTIONS_SEV)} (training set: or 'neutral')",
        },
        "required": ("text", "emotion"),
        "example": {"text": "How dare you speak to my mother like that!", "emotion": "anger"},
    },
}


# --------------------------------------------------------------------------------------
# reading and checking


class _Source:
    """A JSONL file to read: its display name and a way to get its text."""

    def __init__(self, path: PathLike | None, default_name: str, columns: dict[str, str] | None = None):
        self.columns = dict(columns or {})
        self.unit = "line"
        if path is None:
            self._resource = resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR, default_name)
            self.name = str(self._resource)
            self.shipped = True
        else:
            p = Path(os.fspath(path)).expanduser()
            self._resource = p
            self.name = str(p)
            self.shipped = False

    def read_text(self) -> str:
        if self.shipped:
            try:
                data = self._resource.read_bytes()
            except (FileNotFoundError, OSError) as e:
                raise DataError(
                    f"{self.name}: the shipped data file is missing ({e}). Fix: reinstall "
                    f"emolens (`pip install -e .`) so that emolens/data/*.jsonl is included."
                ) from None
        else:
            p: Path = self._resource
            if not p.exists():
                raise DataError(
                    f"{self.name}: file not found. Fix: pass the path of an existing JSONL "
                    f"file, or leave path=None to use the file shipped with emolens."
                )
            if p.is_dir():
                raise DataError(
                    f"{self.name}: is a directory, not a file. Fix: pass the path of a JSONL "
                    f"file inside it."
                )
            data = p.read_bytes()
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{self.name}: not valid UTF-8 text (byte {e.start}). Fix: save the file as "
                f"UTF-8 JSONL, one JSON object per line."
            ) from None


_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".arrow")


def _table_records(source: _Source, schema: str) -> list[tuple[int, dict[str, Any]]] | None:
    """CSV / parquet files and Hugging Face ``datasets`` folders as ``(row_number, record)`` pairs;
    None for a JSONL file. CSV rows count like lines of the file (header = line 1)."""
    if source.shipped:
        return None
    p: Path = source._resource
    if p.is_dir():
        try:
            import datasets as hfd

            if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
                ds = hfd.load_from_disk(str(p))
                if isinstance(ds, hfd.DatasetDict):
                    ds = ds[next(iter(ds))]
            else:
                ds = hfd.load_dataset(str(p), split="train")
        except Exception as e:  # noqa: BLE001 - any reader failure is a data problem to explain
            raise DataError(f"{source.name}: cannot read this folder as a Hugging Face dataset ({type(e).__name__}: "
                            f"{e}). Fix: pass a JSONL/CSV/parquet file, or a folder written by "
                            "Dataset.save_to_disk or holding data files.") from None
        source.unit = "row"
        rows = [dict(r) for r in ds]
        start = 1
    elif p.suffix.lower() in _TABLE_SUFFIXES:
        if not p.exists():
            raise DataError(f"{source.name}: file not found. Fix: pass the path of an existing file.")
        import pandas as pd

        try:
            if p.suffix.lower() in (".csv", ".tsv"):
                df = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",", dtype=str,
                                 keep_default_na=False)
                start = 2
            else:
                df = pd.read_parquet(p)
                start = 1
                source.unit = "row"
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{source.name}: cannot read the table ({type(e).__name__}: {e}). Fix: save it as "
                            "UTF-8 CSV with a header row, or as parquet.") from None
        rows = []
        for r in df.to_dict(orient="records"):
            rows.append({k: (None if (v is None or (isinstance(v, float) and v != v) or v == "") else v)
                         for k, v in r.items()})
    else:
        return None
    if not rows:
        raise DataError(f"{source.name}: the table is empty (no records). Fix: add one record per row.")
    return [(i + start, r) for i, r in enumerate(rows)]


def _map_columns(rec: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename ``columns`` (schema field -> your column) and nest dotted keys (``event.positive``)."""
    out = dict(rec)
    for field, col in columns.items():
        if col in out:
            out[field] = out.pop(col)
    for k in [k for k in out if isinstance(k, str) and "." in k]:
        head, _, tail = k.partition(".")
        if isinstance(out.get(head, {}), dict):
            out.setdefault(head, {})
            if out[head] is None:
                out[head] = {}
            out[head][tail] = out.pop(k)
    return out


def _read_jsonl(source: _Source, schema: str) -> list[tuple[int, dict[str, Any]]]:
    """Parse a data file into ``(line_number, record)`` pairs: JSONL (blank lines skipped), CSV,
    parquet or a Hugging Face ``datasets`` folder; column mapping applied."""
    table = _table_records(source, schema)
    if table is not None:
        return [(n, _map_columns(r, source.columns)) for n, r in table]
    example = json.dumps(SCHEMAS[schema]["example"], ensure_ascii=False)
    text = source.read_text()
    out: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{source.name}, line {lineno}: invalid JSON ({e.msg}, column {e.colno}). "
                f"Fix: each line must be one complete JSON object with double-quoted keys "
                f"and strings, e.g. {example}"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(
                f"{source.name}, line {lineno}: expected a JSON object, got "
                f"{type(rec).__name__}. Fix: write one object per line, e.g. {example}"
            )
        out.append((lineno, _map_columns(rec, source.columns)))
    if not out:
        raise DataError(
            f"{source.name}: the file is empty (no records). Fix: add one JSON object per "
            f"line, e.g. {example}"
        )
    return out


def _where(source: _Source, lineno: int) -> str:
    return f"{source.name}, {source.unit} {lineno}"


def _get_str(rec: dict[str, Any], key: str, source: _Source, lineno: int, schema: str,
             *, required: bool = True, allow_int: bool = False) -> str | None:
    """Return ``rec[key]`` as a non-empty string, or raise a DataError that says how to fix it."""
    if key not in rec or rec[key] is None:
        if not required:
            return None
        needed = ", ".join(repr(k) for k in SCHEMAS[schema]["required"])
        placeholder = _FIELD_PLACEHOLDER.get(key, '"..."')
        have = ", ".join(repr(k) for k in rec) or "no fields"
        raise DataError(
            f"{_where(source, lineno)}: record is missing the field {key!r} (it has {have}). "
            f"Fix: add \"{key}\": {placeholder}; every "
            f"{_RECORD_KIND[schema]} record needs {needed}."
        )
    val = rec[key]
    if allow_int and isinstance(val, int) and not isinstance(val, bool):
        val = str(val)
    if not isinstance(val, str):
        raise DataError(
            f"{_where(source, lineno)}: field {key!r} must be a string, got "
            f"{type(val).__name__} ({val!r}). Fix: write it as \"{key}\": \"...\"."
        )
    if not val.strip():
        raise DataError(
            f"{_where(source, lineno)}: field {key!r} is empty. Fix: give it a non-empty text, "
            f"or remove the record."
        )
    return val


def _unknown_name_msg(value: str, valid: Iterable[str], what: str) -> str:
    valid = tuple(valid)
    hint = ""
    close = get_close_matches(str(value).lower(), valid, n=1)
    if close:
        hint = f" Did you mean {close[0]!r}?"
    return f"unknown {what} {value!r}. Valid {what}s: {', '.join(valid)}.{hint}"


def _check_choice(value: str, valid: tuple[str, ...], what: str, source: _Source,
                  lineno: int) -> str:
    if value not in valid:
        raise DataError(
            f"{_where(source, lineno)}: {_unknown_name_msg(value, valid, what)} "
            f"Fix: use one of the valid names (lowercase)."
        )
    return value


def _check_unique(seen: dict[str, int], key: str, value: str, source: _Source,
                  lineno: int) -> None:
    if value in seen:
        raise DataError(
            f"{_where(source, lineno)}: duplicate {key} {value!r} (first used on line "
            f"{seen[value]}). Fix: give every record its own {key}."
        )
    seen[value] = lineno


def _normalize_emotions(emotions: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if emotions is None:
        return None
    if isinstance(emotions, str):
        emotions = (emotions,)
    emotions = tuple(emotions)
    if not emotions:
        raise DataError(
            "emotions=() selects nothing. Fix: pass None for all emotions, or one or more of "
            f"{', '.join(EMOTIONS_PLUTCHIK)}."
        )
    for e in emotions:
        if e not in EMOTIONS_PLUTCHIK:
            raise DataError(
                f"emotions argument: {_unknown_name_msg(e, EMOTIONS_PLUTCHIK, 'emotion')} "
                f"Fix: pass names from emolens.datasets.EMOTIONS_PLUTCHIK."
            )
    return emotions


def _to_dataset(rows: list[dict[str, Any]], features_spec: dict[str, Any]) -> "datasets.Dataset":
    import datasets as hf  # lazy: importing `datasets` costs about a second

    def build(spec: Any) -> Any:
        if isinstance(spec, dict):
            return {k: build(v) for k, v in spec.items()}
        return hf.Value(spec)

    features = hf.Features(build(features_spec))
    return hf.Dataset.from_list(rows, features=features)


# --------------------------------------------------------------------------------------
# loaders


def load_contrastive_pairs(path: PathLike | None = None, *,
                           emotions: str | Iterable[str] | None = None,
                           split: str | None = None, columns: dict[str, str] | None = None) -> "datasets.Dataset":
    """Load minimal contrastive pairs (positive vs neutral/opposite sentence per emotion).

    Args:
        path: a JSONL file in the ``contrastive_pairs`` schema (see :data:`SCHEMAS`);
            ``None`` loads the shipped ``emolens/data/contrastive_pairs.jsonl``
            (8 emotions x 64 pairs).
        emotions: keep only these emotions (a name or a sequence of names from
            :data:`EMOTIONS_PLUTCHIK`); ``None`` keeps all.
        split: ``"train"``, ``"heldout"``, or ``None`` for both.

    Returns:
        A ``datasets.Dataset`` with string columns ``id``, ``emotion``, ``positive``,
        ``negative``, ``split``, in file order.

    Raises:
        DataError: the file is missing, empty or not JSONL; a record lacks ``emotion``,
            ``positive`` or ``negative``; an emotion or split name is unknown; an ``id`` is
            repeated; a pair has identical sides; or an argument names an unknown emotion
            or split.

    Example:
        >>> from emolens.datasets import load_contrastive_pairs
        >>> ds = load_contrastive_pairs(emotions=["joy", "trust"], split="train")
        >>> ds.num_rows
        96
        >>> sorted(set(ds["emotion"]))
        ['joy', 'trust']
    """
    wanted = _normalize_emotions(emotions)
    if split is not None and split not in PAIR_SPLITS:
        raise DataError(
            f"split argument: {_unknown_name_msg(split, PAIR_SPLITS, 'split')} "
            f"Fix: pass 'train', 'heldout', or None for both."
        )
    schema = "contrastive_pairs"
    source = _Source(path, SCHEMAS[schema]["file"], columns)
    rows: list[dict[str, Any]] = []
    seen_ids: dict[str, int] = {}
    per_emotion: dict[str, int] = {}
    for lineno, rec in _read_jsonl(source, schema):
        emotion = _check_choice(_get_str(rec, "emotion", source, lineno, schema),
                                EMOTIONS_PLUTCHIK, "emotion", source, lineno)
        pos = _get_str(rec, "positive", source, lineno, schema)
        neg = _get_str(rec, "negative", source, lineno, schema)
        if pos.strip() == neg.strip():
            raise DataError(
                f"{_where(source, lineno)}: 'positive' and 'negative' are the same text, so "
                f"the pair carries no contrast. Fix: edit a few words of 'negative' to make "
                f"it neutral or opposite."
            )
        k = per_emotion[emotion] = per_emotion.get(emotion, 0) + 1
        rid = _get_str(rec, "id", source, lineno, schema, required=False, allow_int=True)
        rid = rid if rid is not None else f"{emotion}-{k:03d}"
        _check_unique(seen_ids, "id", rid, source, lineno)
        sp = _get_str(rec, "split", source, lineno, schema, required=False)
        if sp is None:
            sp = "heldout" if k % HELDOUT_EVERY == 0 else "train"
        else:
            _check_choice(sp, PAIR_SPLITS, "split", source, lineno)
        rows.append({"id": rid, "emotion": emotion, "positive": pos, "negative": neg,
                     "split": sp})
    if wanted is not None:
        rows = [r for r in rows if r["emotion"] in wanted]
    if split is not None:
        rows = [r for r in rows if r["split"] == split]
    return _to_dataset(rows, {"id": "string", "emotion": "string", "positive": "string",
                              "negative": "string", "split": "string"})


def load_diagnostic_tasks(path: PathLike | None = None, *, columns: dict[str, str] | None = None
                          ) -> "datasets.Dataset":
    """Load diagnostic conversational tasks (prompt + aligned and misaligned reply).

    Args:
        path: a JSONL file in the ``diagnostic_tasks`` schema (see :data:`SCHEMAS`);
            ``None`` loads the shipped ``emolens/data/diagnostic_tasks.jsonl`` (52 tasks,
            26 joy and 26 trust).

    Returns:
        A ``datasets.Dataset`` with string columns ``id``, ``prompt``, ``aligned``,
        ``misaligned``, ``emotion``, in file order.

    Raises:
        DataError: the file is missing, empty or not JSONL; a record lacks ``prompt``,
            ``aligned``, ``misaligned`` or ``emotion``; an emotion is not in
            :data:`EMOTIONS_PLUTCHIK`; an ``id`` is repeated; or both replies are identical.

    Example:
        >>> from emolens.datasets import load_diagnostic_tasks
        >>> ds = load_diagnostic_tasks()
        >>> ds.column_names
        ['id', 'prompt', 'aligned', 'misaligned', 'emotion']
    """
    schema = "diagnostic_tasks"
    source = _Source(path, SCHEMAS[schema]["file"], columns)
    rows: list[dict[str, Any]] = []
    seen_ids: dict[str, int] = {}
    for n, (lineno, rec) in enumerate(_read_jsonl(source, schema), 1):
        prompt = _get_str(rec, "prompt", source, lineno, schema)
        aligned = _get_str(rec, "aligned", source, lineno, schema)
        misaligned = _get_str(rec, "misaligned", source, lineno, schema)
        emotion = _check_choice(_get_str(rec, "emotion", source, lineno, schema),
                                EMOTIONS_PLUTCHIK, "emotion", source, lineno)
        if aligned.strip() == misaligned.strip():
            raise DataError(
                f"{_where(source, lineno)}: 'aligned' and 'misaligned' are the same text. "
                f"Fix: make 'misaligned' a cold or dismissive reply of similar length."
            )
        rid = _get_str(rec, "id", source, lineno, schema, required=False, allow_int=True)
        rid = rid if rid is not None else f"diag-{n:03d}"
        _check_unique(seen_ids, "id", rid, source, lineno)
        rows.append({"id": rid, "prompt": prompt, "aligned": aligned,
                     "misaligned": misaligned, "emotion": emotion})
    return _to_dataset(rows, {"id": "string", "prompt": "string", "aligned": "string",
                              "misaligned": "string", "emotion": "string"})


def load_openers(path: PathLike | None = None, *, columns: dict[str, str] | None = None) -> "datasets.Dataset":
    """Load evaluation conversation openers.

    Args:
        path: a JSONL file in the ``openers`` schema (see :data:`SCHEMAS`); ``None`` loads
            the shipped ``emolens/data/openers.jsonl`` (120 openers).

    Returns:
        A ``datasets.Dataset`` with string columns ``id`` and ``text``, in file order.

    Raises:
        DataError: the file is missing, empty or not JSONL; a record lacks ``text``; or an
            ``id`` is repeated.

    Example:
        >>> from emolens.datasets import load_openers
        >>> load_openers()["text"][0]
        "Hey, how's your week been so far?"
    """
    schema = "openers"
    source = _Source(path, SCHEMAS[schema]["file"], columns)
    rows: list[dict[str, Any]] = []
    seen_ids: dict[str, int] = {}
    for n, (lineno, rec) in enumerate(_read_jsonl(source, schema), 1):
        text = _get_str(rec, "text", source, lineno, schema)
        rid = _get_str(rec, "id", source, lineno, schema, required=False, allow_int=True)
        rid = rid if rid is not None else f"open-{n:03d}"
        _check_unique(seen_ids, "id", rid, source, lineno)
        rows.append({"id": rid, "text": text})
    return _to_dataset(rows, {"id": "string", "text": "string"})


def load_sev(path: PathLike | None = None, *, split: str = "analysis",
             columns: dict[str, str] | None = None) -> "datasets.Dataset":
    """Load scenario-event records in SEV format (paper 2).

    Args:
        path: any JSONL file in the SEV format (see :data:`SCHEMAS`), including the
            original SEV files ``sev.jsonl`` and ``test_set.jsonl``. When given, it
            overrides ``split``.
        split: which shipped file to load when ``path`` is ``None``: ``"analysis"``
            (``sev_analysis.jsonl``, 96 records) or ``"test"`` (``sev_test.jsonl``,
            48 records).

    Returns:
        A ``datasets.Dataset`` with columns ``theme``, ``scenario``, ``event`` (a struct
        with string fields ``positive``, ``neutral``, ``negative``; ``ds[i]["event"]`` is a
        dict) and ``skeleton_id``, in file order. Other keys of the records are dropped.

    Raises:
        DataError: the file is missing, empty or not JSONL; a record lacks ``theme``,
            ``scenario``, ``event`` or ``skeleton_id``; ``event`` is not an object or lacks
            one of the valences in :data:`SEV_VALENCES`; a ``skeleton_id`` is repeated; or
            ``split`` is unknown.

    Example:
        >>> from emolens.datasets import load_sev
        >>> ds = load_sev(split="test")
        >>> sorted(ds[0]["event"])
        ['negative', 'neutral', 'positive']
    """
    if path is None:
        if split not in SEV_SPLITS:
            raise DataError(
                f"split argument: {_unknown_name_msg(split, SEV_SPLITS, 'split')} "
                f"Fix: pass split='analysis' or split='test', or path= to load your own file."
            )
        default = SCHEMAS["sev"]["file"][split]
    else:
        default = SCHEMAS["sev"]["file"]["analysis"]  # unused: path wins
    schema = "sev"
    source = _Source(path, default, columns)
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, rec in _read_jsonl(source, schema):
        theme = _get_str(rec, "theme", source, lineno, schema)
        scenario = _get_str(rec, "scenario", source, lineno, schema)
        sid = _get_str(rec, "skeleton_id", source, lineno, schema, allow_int=True)
        if "event" not in rec or rec["event"] is None:
            _get_str(rec, "event", source, lineno, schema)  # raises the missing-field error
        event = rec["event"]
        if not isinstance(event, dict):
            raise DataError(
                f"{_where(source, lineno)}: field 'event' must be an object with the keys "
                f"{', '.join(SEV_VALENCES)}, got {type(event).__name__}. Fix: write "
                f"\"event\": {{\"positive\": \"...\", \"neutral\": \"...\", \"negative\": \"...\"}}."
            )
        ev: dict[str, str] = {}
        for v in SEV_VALENCES:
            val = event.get(v)
            if not isinstance(val, str) or not val.strip():
                problem = ("is missing the valence" if val is None else
                           "has an empty or non-string valence")
                raise DataError(
                    f"{_where(source, lineno)}: 'event' {problem} {v!r} (it has "
                    f"{', '.join(repr(k) for k in event) or 'no keys'}). Fix: every SEV record "
                    f"needs event texts for all of {', '.join(SEV_VALENCES)}."
                )
            ev[v] = val
        _check_unique(seen, "skeleton_id", sid, source, lineno)
        rows.append({"theme": theme, "scenario": scenario, "event": ev, "skeleton_id": sid})
    return _to_dataset(rows, {"theme": "string", "scenario": "string",
                              "event": {v: "string" for v in SEV_VALENCES},
                              "skeleton_id": "string"})


def load_judge_labelled(path: PathLike | None = None, *, split: str = "eval",
                        columns: dict[str, str] | None = None,
                        emotions: Iterable[str] | None = None) -> "datasets.Dataset":
    """Load labelled sentences for the emotion judges.

    Args:
        path: a JSONL/CSV/parquet file or a Hugging Face ``datasets`` folder in the
            ``judge_labelled`` schema (see :data:`SCHEMAS`); ``None`` loads the shipped
            ``emolens/data/judge_<split>.jsonl``.
        split: ``"eval"`` (held-out accuracy; labels from :data:`EMOTIONS_SEV`) or ``"train"``
            (the probe judge's training set; ``"neutral"`` is allowed too).
        columns: schema field -> your column name (e.g. ``{"text": "sentence", "emotion": "label"}``).
        emotions: the labels allowed (default: as ``split`` says), e.g. a judge's ``emotions``.

    Returns:
        A ``datasets.Dataset`` with string columns ``text`` and ``emotion``, in file order.

    Raises:
        DataError: the file is missing, empty or unreadable; a record lacks ``text`` or
            ``emotion``; or an emotion is not allowed (the message names the file and line).
    """
    schema = "judge_labelled"
    if split not in ("eval", "train"):
        raise DataError(f"split={split!r}: use 'eval' (held-out set) or 'train' (probe training set).")
    allowed = (tuple(emotions) if emotions is not None
               else EMOTIONS_SEV + (("neutral",) if split == "train" else ()))
    source = _Source(path, SCHEMAS[schema]["file"][split], columns)
    rows: list[dict[str, Any]] = []
    for lineno, rec in _read_jsonl(source, schema):
        text = _get_str(rec, "text", source, lineno, schema)
        emo = _check_choice(_get_str(rec, "emotion", source, lineno, schema).strip().lower(), allowed, "emotion",
                            source, lineno)
        rows.append({"text": text, "emotion": emo})
    return _to_dataset(rows, {"text": "string", "emotion": "string"})
