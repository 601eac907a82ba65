"""Command-line options shared by the pipeline commands: user data, column mappings, config files, resume."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError

#: option -> (pipeline, config field, help)
DATA_OPTIONS: dict[str, tuple[str, str, str]] = {
    "--analysis-data": ("paper2", "analysis_data", "SEV-format records for paper 2's analysis split (directions, "
                        "circuits, calibration): JSONL/CSV/parquet file or a Hugging Face datasets folder"),
    "--test-data": ("paper2", "test_data", "SEV-format records paper 2 evaluates on (prompting vs steering vs "
                    "circuit): JSONL/CSV/parquet file or a datasets folder"),
    "--judge-train": ("paper2", "judge_train", "JSONL of labelled sentences ({\"text\", \"emotion\"}) the probe "
                      "judge trains on"),
    "--judge-eval": ("paper2", "judge_eval", "labelled held-out sentences (text, emotion) the judge's accuracy is "
                     "measured on: JSONL/CSV/parquet file or a datasets folder"),
    "--tasks-data": ("paper1", "tasks_data", "diagnostic tasks for paper 1's locus (prompt, aligned, misaligned, "
                     "emotion)"),
    "--pairs-data": ("paper1", "pairs_data", "contrastive pairs for emotion vectors (emotion, positive, negative"
                     "[, split])"),
    "--openers-data": ("paper1", "openers_data", "conversation openers paper 1 steers and evaluates on (text)"),
}
#: --columns NAME:... -> (pipeline, config field)
COLUMN_TARGETS = {"analysis": ("paper2", "analysis_columns"), "test": ("paper2", "test_columns"),
                  "judge_eval": ("paper2", "judge_eval_columns"),
                  "tasks": ("paper1", "tasks_columns"), "pairs": ("paper1", "pairs_columns"),
                  "openers": ("paper1", "openers_columns")}


def add_run_folder_args(p, *, overwrite_with_resume: str, resume_help: str | None = None) -> None:
    """``--out``, ``--name``, ``--overwrite`` (and ``--resume DIR`` when ``resume_help`` is given) of a
    command that writes a run folder; ``overwrite_with_resume`` says what ``--overwrite --resume`` does."""
    p.add_argument("--out", default="runs", help="folder that holds run folders (default: ./runs)")
    p.add_argument("--name", default=None, help="run folder name (default: a timestamp); never reused unless "
                   "--overwrite is given")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same --name; with "
                   f"--resume: {overwrite_with_resume}")
    if resume_help is not None:
        p.add_argument("--resume", default=None, metavar="DIR", help=resume_help)


def add_data_args(p, pipelines=("paper1", "paper2")) -> None:
    """``--analysis-data`` ... options of the given pipelines, ``--columns``, ``--config`` and ``--resume``."""
    for opt, (pipe, _, help_) in DATA_OPTIONS.items():
        if pipe in pipelines:
            p.add_argument(opt, default=None, help=help_)
    names = [k for k, (pipe, _) in COLUMN_TARGETS.items() if pipe in pipelines]
    p.add_argument("--columns", action="append", default=[], metavar="DATA:FIELD=COLUMN[,FIELD=COLUMN]",
                   help=f"map schema fields to your column names, DATA one of {', '.join(names)} (e.g. "
                        "test:theme=topic,event.positive=good); repeatable")
    p.add_argument("--config", default=None, help="JSON file (or inline JSON) of configuration fields to override"
                   + (' ({"paper1": {...}, "paper2": {...}})' if len(pipelines) > 1 else ""))
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR (a killed or finished run): finished steps whose inputs are "
                        "unchanged are reused; refused if DIR holds another model or configuration unless "
                        "--overwrite is given")


def parse_columns(specs) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for spec in specs or []:
        name, sep, rest = str(spec).partition(":")
        if not sep or name not in COLUMN_TARGETS:
            raise InputError(f"--columns {spec!r}: write DATA:FIELD=COLUMN[,FIELD=COLUMN] with DATA one of "
                             f"{', '.join(COLUMN_TARGETS)} (e.g. test:theme=topic).")
        for pair in rest.split(","):
            f, eq, c = pair.partition("=")
            if not eq or not f.strip() or not c.strip():
                raise InputError(f"--columns {spec!r}: {pair!r} is not FIELD=COLUMN.")
            out.setdefault(name, {})[f.strip()] = c.strip()
    return out


def read_config_file(path: str | None, pipelines) -> dict[str, dict]:
    """``--config FILE``: ``{"paper1": {...}, "paper2": {...}}`` (or the fields of the single pipeline)."""
    if not path:
        return {}
    try:  # a file, or the JSON itself
        text = path if str(path).lstrip().startswith("{") else Path(path).read_text()
        over = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"Cannot read --config {path}: {e}") from None
    if not isinstance(over, dict):
        raise InputError(f"--config {path} must hold a JSON object of configuration fields.")
    if len(pipelines) == 1 and not set(over) <= {"paper1", "paper2"}:
        return {pipelines[0]: over}
    bad = sorted(set(over) - set(pipelines))
    if bad:
        raise InputError(f"--config {path}: unknown section(s) {bad}; use {', '.join(pipelines)} as top-level keys.")
    return over


def apply(cfg, pipeline: str, args, overrides: dict) -> object:
    """The configuration ``cfg`` with the --config fields and data options of ``pipeline`` applied."""
    kw = dict(overrides.get(pipeline, {}))
    for opt, (pipe, field, _) in DATA_OPTIONS.items():
        v = getattr(args, opt[2:].replace("-", "_"), None)
        if pipe == pipeline and v is not None:
            if not Path(v).exists():
                raise InputError(f"{opt} {v}: no such file or folder.")
            kw[field] = str(Path(v).resolve())
    for name, mapping in parse_columns(getattr(args, "columns", [])).items():
        pipe, field = COLUMN_TARGETS[name]
        if pipe == pipeline:
            kw[field] = mapping
    return cfg.replace(**kw) if kw else cfg
