"""The step engine every pipeline runs on: fingerprinted, atomic, resumable steps.

A pipeline is a list of :class:`Step` objects. A step is

- ``name``: unique within the pipeline; its outputs live under ``ROOT/`` and its marker is
  ``ROOT/steps/NAME.json``;
- ``inputs``: names of upstream steps whose outputs it reads (through :meth:`Context.load`);
- ``config``: the configuration fields it reads;
- ``data``: configuration fields that name data files/datasets (their *content* is hashed);
- ``fn(ctx) -> {output_name: object}``: computes and returns its outputs (results, data frames,
  JSON-able values, emotion vectors, ...; see :func:`register_kind`); it may also write extra files
  with ``ctx.path(rel)``;
- ``section(ctx) -> Section | list[Section] | None``: its part of the report (optional).

Its fingerprint is ``sha256(config slice, model fingerprint, data hashes, hashes of the inputs'
outputs, version)``. :func:`run_steps` skips a step whose marker holds the same fingerprint and
whose output files still hash to what the marker recorded; otherwise it recomputes the step, and
every step downstream sees changed input hashes and recomputes too. Each decision is logged with
its reason (``steps recomputed: ...``) and returned as the run log.

Writes are crash-safe: a step writes into ``ROOT/.staging/NAME/``; the engine then publishes every
file with :func:`emolens.io.publish` (fsync + rename) and writes the marker last. A crash at any
point leaves either a valid marker whose files hash correctly, or no valid marker (the step is
recomputed). A corrupt or empty marker or output is treated as missing, never as a crash.

Shards are records of the same kind: :mod:`emolens.scale` stores each finished shard of sharded work
with :func:`record_status` / :func:`begin_record` / :func:`commit_record` (marker last, files
hash-checked), and work started inside a step records its shards in ``ROOT/.shards/STEP/``
(:func:`current_shard_dir`), so rerunning an unfinished step skips its finished shards; the folder is
removed once the step's own marker is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import io
from ..errors import InputError
from ..sections import Section

log = logging.getLogger("emolens")

__all__ = ["Step", "Context", "StepLog", "PipelineConfig", "run_steps", "register_kind", "model_fingerprint",
           "hash_source", "RunFolder", "record_status", "begin_record", "commit_record", "current_shard_dir",
           "shard_folder"]

ENGINE_VERSION = 1


# =========================================================================================
# Configuration base
# =========================================================================================
def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _coerce(v: Any, tp: Any, where: str) -> Any:
    """Check ``v`` against the annotation ``tp`` (JSON lists become tuples); raise InputError if it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return v
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if v is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(v, a, where)
            except InputError as e:
                errs.append(str(e))
        raise InputError(errs[0] if errs else f"{where}: {v!r} does not fit {tp}.")
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise InputError(f"{where} must be true or false, got {v!r}.")
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise InputError(f"{where} must be an integer, got {v!r}.")
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise InputError(f"{where} must be a number, got {v!r}.")
    if tp is str:
        if isinstance(v, str):
            return v
        raise InputError(f"{where} must be a string, got {v!r}.")
    if tp is tuple or origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise InputError(f"{where} must be a list, got {v!r}.")
        if not args:
            return tuple(_jsonable_tuple(x) for x in v)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(x, args[0], f"{where}[{i}]") for i, x in enumerate(v))
        if len(args) != len(v):
            raise InputError(f"{where} must have {len(args)} elements, got {len(v)}.")
        return tuple(_coerce(x, a, f"{where}[{i}]") for i, (x, a) in enumerate(zip(v, args)))
    if tp is dict or origin is dict:
        if not isinstance(v, dict):
            raise InputError(f"{where} must be a mapping, got {v!r}.")
        if not args:
            return {k: _jsonable_tuple(x) for k, x in v.items()}
        return {_coerce(k, args[0], f"{where} key"): _coerce(x, args[1], f"{where}[{k!r}]") for k, x in v.items()}
    return v


def _jsonable_tuple(v: Any) -> Any:
    """Untyped containers: JSON lists become tuples (hashable, equal to the dataclass defaults)."""
    if isinstance(v, list):
        return tuple(_jsonable_tuple(x) for x in v)
    return v


@dataclass
class PipelineConfig:
    """Base of every pipeline configuration: JSON round trip with every field validated.

    ``from_dict`` rejects unknown keys (naming the valid ones) and values of the wrong type;
    subclasses add semantic checks in :meth:`check`.
    """

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def _fields(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise InputError(f"A {cls.__name__} must be built from a mapping of field names, got {type(d).__name__}.")
        fields = cls._fields()
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise InputError(f"Unknown {cls.__name__} field(s) {unknown}; valid fields: {', '.join(sorted(fields))}.")
        kw = {k: _coerce(v, fields[k], f"{cls.__name__}.{k}") for k, v in d.items()}
        cfg = cls(**kw)
        cfg.check()
        return cfg

    def replace(self, **kw):
        return type(self).from_dict({**self.to_dict(), **_jsonable(kw)})

    def check(self) -> None:
        """Semantic checks (subclasses); raise :class:`~emolens.errors.InputError` naming the fix."""

    def diff(self, other: "PipelineConfig") -> dict:
        a, b = self.to_dict(), other.to_dict()
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


# =========================================================================================
# Fingerprints
# =========================================================================================
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_source(value: Any) -> str:
    """Content hash of a data source: a file, a folder (every file under it), or the value itself
    (``None`` = the packaged data, whose content is fixed by the emolens version)."""
    if value is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "packaged:" + version("emolens")
        except PackageNotFoundError:
            return "packaged"
    p = Path(str(value)).expanduser()
    if p.is_file():
        return _file_sha(p)
    if p.is_dir():
        return _sha({str(q.relative_to(p)): _file_sha(q) for q in sorted(p.rglob("*")) if q.is_file()})
    return _sha(value)


def model_fingerprint(model) -> dict:
    """Identity of a model for fingerprints: its name and dimensions plus a hash of a sample of every
    parameter (so two checkpoints of one architecture differ). Device-independent."""
    fp = getattr(model, "fingerprint", None)
    if isinstance(fp, (str, dict)):
        return {"fingerprint": fp}
    if callable(fp):
        return {"fingerprint": fp()}
    info = {k: v for k, v in model.info().items() if k != "device"}
    cached = getattr(model, "_emolens_weights_sha", None)
    if cached is None:
        import torch

        h = hashlib.sha256()
        with torch.no_grad():
            for name, p in model.hf_model.named_parameters():
                h.update(name.encode())
                h.update(str(tuple(p.shape)).encode())
                h.update(p.detach().flatten()[:512].float().cpu().numpy().tobytes())
        cached = h.hexdigest()[:16]
        try:
            model._emolens_weights_sha = cached
        except AttributeError:
            pass
    return {**info, "weights": cached}


# =========================================================================================
# Output kinds
# =========================================================================================
@dataclass(frozen=True)
class _Kind:
    name: str
    test: Callable[[Any], bool]
    save: Callable[[Any, Path], None]   # (obj, staging path without suffix)
    load: Callable[[Path, Any], Any]    # (path without suffix, model) -> obj


_KINDS: list[_Kind] = []


def register_kind(name: str, test: Callable[[Any], bool], save: Callable[[Any, Path], None],
                  load: Callable[[Path, Any], Any]) -> None:
    """Teach the engine to save/load another output type (``test(obj)`` picks the kind; first match wins)."""
    _KINDS.insert(0, _Kind(name, test, save, load))


def _kind_of(obj: Any) -> _Kind:
    for k in _KINDS:
        if k.test(obj):
            return k
    raise InputError(f"The engine cannot save an output of type {type(obj).__name__}; register_kind() it.")


def _kind_named(name: str) -> _Kind:
    for k in _KINDS:
        if k.name == name:
            return k
    raise InputError(f"Unknown output kind {name!r}.")


def _save_json(obj, p: Path) -> None:
    p.with_suffix(".json").write_text(json.dumps(obj, indent=1, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _register_builtin_kinds() -> None:
    import pandas as pd

    from ..results import Result

    register_kind("json", lambda o: isinstance(o, (dict, list, str, int, float, bool)) or o is None, _save_json,
                  lambda p, m: json.loads(p.with_suffix(".json").read_text()))
    register_kind("parquet", lambda o: isinstance(o, pd.DataFrame),
                  lambda o, p: o.to_parquet(p.with_suffix(".parquet"), index=False),
                  lambda p, m: pd.read_parquet(p.with_suffix(".parquet")))
    register_kind("frames", lambda o: isinstance(o, dict) and bool(o) and all(isinstance(v, pd.DataFrame)
                                                                             for v in o.values()),
                  _save_frames,
                  lambda p, m: {q.relative_to(p).with_suffix("").as_posix(): pd.read_parquet(q)
                                for q in sorted(p.rglob("*.parquet"))})
    register_kind("result", lambda o: isinstance(o, Result), lambda o, p: o.save(p), lambda p, m: Result.load(p))
    register_kind("results", lambda o: isinstance(o, dict) and bool(o) and all(isinstance(v, Result)
                                                                              for v in o.values()),
                  lambda o, p: [v.save(p / k) for k, v in o.items()],
                  lambda p, m: {q.relative_to(p).with_suffix("").as_posix(): Result.load(q)
                                for q in sorted(p.rglob("*.safetensors"))})
    try:
        from ..directions import EmotionVectors

        register_kind("vectors", lambda o: isinstance(o, EmotionVectors), lambda o, p: o.save(p),
                      lambda p, m: EmotionVectors.load(p, model=m))
    except ImportError:  # pragma: no cover
        pass


def _save_frames(frames: dict, folder: Path) -> None:
    for k, v in frames.items():
        v.to_parquet(_mk(folder / f"{k}.parquet"), index=False)


def _mk(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


# =========================================================================================
# Steps and the run
# =========================================================================================
@dataclass(frozen=True)
class Step:
    """One unit of work (see the module docstring)."""

    name: str
    fn: Callable[["Context"], dict | None]
    inputs: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    section: Callable[["Context"], Any] | None = None
    version: int = 1
    doc: str = ""


@dataclass
class StepLog:
    """What happened to one step in one call: ``status`` is ``"reused"`` or ``"computed"``."""

    step: str
    status: str
    reason: str
    seconds: float


class Context:
    """What a step sees: the model, the configuration, its inputs' outputs, and a place to write."""

    def __init__(self, model, config, root: Path, steps: dict[str, Step], progress: bool, extras: dict):
        self.model = model
        self.config = config
        self.root = Path(root)
        self.progress = progress
        self.extras = extras  # shared per-call objects (judge, loaded data) that are not outputs
        self._steps = steps
        self._cache: dict[str, Any] = {}
        self._staging: Path | None = None
        self._current: Step | None = None
        self.log: dict[str, StepLog] = {}

    # -- inside a step -------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        """A file path for an extra output of the running step (published with its outputs)."""
        if self._staging is None:
            raise InputError("ctx.path() is only available while a step runs.")
        return _mk(self._staging / rel)

    def load(self, name: str, default: Any = dataclasses.MISSING) -> Any:
        """The output ``name`` of a finished step (``"step.output"`` or a unique output name)."""
        step, out = self._locate(name)
        if out is None:
            if default is not dataclasses.MISSING:
                return default
            raise InputError(f"No output {name!r} in {self.root}; the step that writes it has not run.")
        key = f"{step}.{out}"
        if key not in self._cache:
            marker = _read_marker(self.root, step)
            kind = _kind_named(marker["outputs"][out]["kind"])
            self._cache[key] = kind.load(self.root / out, self.model)
        return self._cache[key]

    def has(self, name: str) -> bool:
        """Whether ``name`` is available to the running step (an output of a declared input that exists)."""
        return self._locate(name, strict=False)[1] is not None

    def file(self, rel: str) -> Path:
        """A published extra file of a finished step."""
        return self.root / rel

    def _locate(self, name: str, strict: bool = True) -> tuple[str | None, str | None]:
        # while a step runs it sees only its declared inputs: an undeclared read would escape its fingerprint
        allowed = self._steps if self._current is None else self._current.inputs
        if "." in name and name.split(".", 1)[0] in self._steps:
            step, out = name.split(".", 1)
            if step not in allowed:
                if not strict:
                    return None, None
                raise InputError(f"Step {self._current.name!r} reads {name!r} but does not declare {step!r} as an "
                                 "input; add it to the step's inputs.")
            m = _read_marker(self.root, step)
            return step, out if m and out in m["outputs"] else None
        for s in allowed:
            m = _read_marker(self.root, s)
            if m and name in m["outputs"]:
                return s, name
        if self._current is not None and strict:
            for s in self._steps:
                m = _read_marker(self.root, s)
                if m and name in m["outputs"]:
                    raise InputError(f"Step {self._current.name!r} reads {name!r} (an output of {s!r}) but does not "
                                     f"declare {s!r} as an input; add it to the step's inputs.")
        return None, None

    def seconds(self, step: str) -> float:
        m = _read_marker(self.root, step)
        return float(m.get("seconds", 0.0)) if m else 0.0


def _marker_path(root: Path, step: str) -> Path:
    return root / "steps" / f"{step}.json"


def _read_marker(root: Path, step: str) -> dict | None:
    """The step's marker, or None when it is missing, empty or corrupt (treated as not done)."""
    p = _marker_path(root, step)
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("outputs"), dict) or "fingerprint" not in m:
        return None
    return m


def _outputs_ok(root: Path, marker: dict) -> str | None:
    """None when every file of the marker exists with its recorded hash; else why not."""
    for rel, sha in marker.get("files", {}).items():
        p = root / rel
        try:
            if _file_sha(p) != sha:
                return f"output {rel} changed or is corrupt"
        except OSError:
            return f"output {rel} is missing"
    return None


def _crash_hook(step: str, phase: str) -> None:
    """Test hook: ``EMOLENS_CRASH_AT=step:phase`` kills the process (SIGKILL) at that point."""
    want = os.environ.get("EMOLENS_CRASH_AT")
    if want and want == f"{step}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


def _parts(step: Step, cfg_dict: dict, model_fp: dict, root: Path) -> dict:
    missing = [k for k in step.config + step.data if k not in cfg_dict]
    if missing:
        raise InputError(f"Step {step.name!r} reads configuration field(s) {missing} that the configuration lacks.")
    inputs = {}
    for s in step.inputs:
        m = _read_marker(root, s)
        inputs[s] = m["outputs_hash"] if m else None
    return {"step": step.name, "version": [ENGINE_VERSION, step.version], "model": model_fp,
            "config": {k: cfg_dict[k] for k in step.config},
            "data": {k: hash_source(cfg_dict[k]) for k in step.data}, "inputs": inputs}


def _why(old: dict | None, new: dict) -> str:
    if old is None:
        return "not run yet"
    op = old.get("parts", {})
    if not isinstance(op, dict):
        op = {}
    if not isinstance(new, dict) or "config" not in new:  # a record without step parts (e.g. a shard)
        return "fingerprint changed"
    reasons = []
    if op.get("model") != new["model"]:
        reasons.append("model changed")
    oc, nc = op.get("config", {}), new["config"]
    ch = sorted(k for k in set(oc) | set(nc) if oc.get(k) != nc.get(k))
    if ch:
        reasons.append("config changed: " + ", ".join(ch))
    od, nd = op.get("data", {}), new["data"]
    dch = sorted(k for k in set(od) | set(nd) if od.get(k) != nd.get(k))
    if dch:
        reasons.append("data changed: " + ", ".join(dch))
    oi, ni = op.get("inputs", {}), new["inputs"]
    ich = sorted(k for k in set(oi) | set(ni) if oi.get(k) != ni.get(k))
    if ich:
        reasons.append("inputs changed: " + ", ".join(ich))
    if op.get("version") != new["version"]:
        reasons.append("step version changed")
    return "; ".join(reasons) or "fingerprint changed"


def _publish(staging: Path, root: Path, step: str) -> dict[str, str]:
    files = {}
    for p in sorted(staging.rglob("*")):
        if p.is_file():
            rel = p.relative_to(staging).as_posix()
            files[rel] = _file_sha(p)
    for i, rel in enumerate(files):
        io.publish(staging / rel, root / rel)
        if i == 0:
            _crash_hook(step, "publishing")
    return files


# -----------------------------------------------------------------------------------------
# Records: how a step (or a shard of work, emolens.scale) is stored and checked
# -----------------------------------------------------------------------------------------
def record_status(root: str | Path, name: str, fingerprint: str, parts: dict | None = None, *,
                  resume: bool = True) -> tuple[dict | None, str | None]:
    """Whether the record ``name`` under ``root`` (marker ``root/steps/NAME.json``) can be reused.

    Returns ``(marker, None)`` when its marker holds ``fingerprint`` and every file it lists still has
    its recorded sha256; otherwise ``(marker or None, reason)`` with the reason it must be computed
    (``"not run yet"``, ``"marker empty or corrupt"``, what changed, ``"output F is missing"``,
    ``"output F changed or is corrupt"``, ``"resume off"``). Never raises on a damaged record.
    """
    root = Path(root)
    old = _read_marker(root, name)
    if not resume:
        return old, "resume off"
    if old is None:
        return None, "not run yet" if not _marker_path(root, name).exists() else "marker empty or corrupt"
    if old["fingerprint"] != fingerprint:
        return old, _why(old, parts if parts is not None else {})
    return old, _outputs_ok(root, old)


def begin_record(root: str | Path, name: str) -> Path:
    """Start (re)computing the record ``name``: forget its marker (a crash from here on leaves it "not
    done") and return an empty staging folder ``root/.staging/NAME/`` to write its files into, laid out
    as they will be under ``root``."""
    root = Path(root)
    _marker_path(root, name).unlink(missing_ok=True)
    staging = root / ".staging" / name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def commit_record(root: str | Path, name: str, staging: Path, *, fingerprint: str, parts: Any, outputs: dict,
                  seconds: float = 0.0, old: dict | None = None) -> dict:
    """Publish every file under ``staging`` to ``root`` (:func:`emolens.io.publish`: fsync, rename), remove
    files of the ``old`` marker that were not rewritten, and write the marker last (atomically).

    The marker holds ``fingerprint``, ``parts`` (what the fingerprint hashed, for the reasons
    :func:`record_status` gives), ``outputs`` (name -> ``{"kind": ...}``), ``files`` (path -> sha256),
    ``outputs_hash`` and ``seconds``. Returns the marker.
    """
    root = Path(root)
    files = _publish(Path(staging), root, name)
    if old:
        for rel in old.get("files", {}):
            if rel not in files:
                (root / rel).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    marker = {"fingerprint": fingerprint, "parts": parts, "outputs": outputs, "files": files,
              "outputs_hash": _sha(files), "seconds": round(seconds, 3)}
    _crash_hook(name, "marker")
    io.write_json(_marker_path(root, name), marker)
    return marker


SHARDS = ".shards"
_SHARD_DIRS: list[Path] = []


def shard_folder(root: str | Path, step: str) -> Path:
    """Where the shards of step ``step`` of the pipeline folder ``root`` are recorded while it runs."""
    return Path(root) / SHARDS / step


def current_shard_dir() -> Path | None:
    """The shard folder of the step running now (``ROOT/.shards/STEP/``), ``None`` outside a step.

    :mod:`emolens.scale` records the shards of work a step starts there, so a rerun of an unfinished
    step (``--resume``) skips its finished shards; the folder is removed once the step is done.
    """
    return _SHARD_DIRS[-1] if _SHARD_DIRS else None


def run_steps(steps: Sequence[Step], model, config: PipelineConfig, root: str | Path, *, progress: bool = True,
              resume: bool = True, extras: dict | None = None, on_step: Callable[[StepLog], None] | None = None,
              label: str = "pipeline") -> Context:
    """Run ``steps`` in order under ``root``; return the :class:`Context` (its ``log`` says what ran and why).

    Args:
        steps: the pipeline (each step's inputs must come earlier in the list).
        model: the model every step uses (its fingerprint enters every step's fingerprint).
        config: a :class:`PipelineConfig`; each step reads only its declared fields.
        root: the pipeline's folder (``RUN/paperN``).
        resume: reuse steps whose fingerprint and outputs match; False recomputes everything.
        extras: per-call objects shared by the steps (``ctx.extras``).
        on_step: called after each step with its log entry (e.g. to update ``run.json``).
    """
    root = Path(root)
    (root / "steps").mkdir(parents=True, exist_ok=True)
    by_name: dict[str, Step] = {}
    for s in steps:
        if s.name in by_name:
            raise InputError(f"Two steps are named {s.name!r}.")
        bad = [i for i in s.inputs if i not in by_name]
        if bad:
            raise InputError(f"Step {s.name!r} reads {bad}, which no earlier step provides.")
        by_name[s.name] = s
    cfg_dict = config.to_dict()
    mfp = model_fingerprint(model)
    ctx = Context(model, config, root, by_name, progress, dict(extras or {}))
    # a leftover staging folder or temp file is a crash's half-written work: never read, removed now
    shutil.rmtree(root / ".staging", ignore_errors=True)
    io.remove_stale_temps(root)
    recomputed = []
    for s in steps:
        parts = _parts(s, cfg_dict, mfp, root)
        fp = _sha(parts)
        old, reason = record_status(root, s.name, fp, parts, resume=resume)
        if reason is None:
            ctx.log[s.name] = StepLog(s.name, "reused", "fingerprint and outputs match", float(old.get("seconds", 0)))
            if on_step:
                on_step(ctx.log[s.name])
            continue
        recomputed.append(f"{s.name} ({reason})")
        log.info("emolens: %s step %r recomputes: %s", label, s.name, reason)
        for k in [k for k in ctx._cache if k.startswith(f"{s.name}.")]:
            ctx._cache.pop(k, None)
        staging = begin_record(root, s.name)
        shards = shard_folder(root, s.name)
        if not resume:  # resume off: shards of an earlier, unfinished run of this step are not reused either
            shutil.rmtree(shards, ignore_errors=True)
        ctx._staging, ctx._current = staging, s
        _crash_hook(s.name, "start")
        t0 = time.time()
        _SHARD_DIRS.append(shards)
        try:
            outs = s.fn(ctx) or {}
        finally:
            _SHARD_DIRS.pop()
            ctx._staging, ctx._current = None, None
        out_kinds = {}
        for name, obj in outs.items():
            k = _kind_of(obj)
            k.save(obj, _mk(staging / name))
            out_kinds[name] = {"kind": k.name}
        seconds = time.time() - t0
        _crash_hook(s.name, "staged")
        # a folder output (curves/, replies/, ...) is replaced as a whole: files an older version of the step
        # wrote there (e.g. before a crash that lost its marker) must not be loaded with the new ones
        for name in out_kinds:
            if (staging / name).is_dir():
                shutil.rmtree(root / name, ignore_errors=True)
        commit_record(root, s.name, staging, fingerprint=fp, parts=parts, outputs=out_kinds, seconds=seconds, old=old)
        # the step's outputs now hold what its shards computed; their records are no longer needed
        shutil.rmtree(shards, ignore_errors=True)
        with contextlib.suppress(OSError):
            shards.parent.rmdir()  # ROOT/.shards, once empty
        ctx.log[s.name] = StepLog(s.name, "computed", reason, seconds)
        if on_step:
            on_step(ctx.log[s.name])
    shutil.rmtree(root / ".staging", ignore_errors=True)
    if recomputed:
        log.warning("emolens: %s steps recomputed: %s", label, "; ".join(recomputed))
    else:
        log.info("emolens: %s: every step reused", label)
    return ctx


def sections(steps: Sequence[Step], ctx: Context) -> list[Section]:
    """Every step's report section, in step order."""
    out: list[Section] = []
    for s in steps:
        if s.section is None:
            continue
        r = s.section(ctx)
        if r is None:
            continue
        out.extend(r if isinstance(r, (list, tuple)) else [r])
    return out


def log_table(ctx: Context):
    """The run log as a table: step, computed/reused, why, seconds."""
    import pandas as pd

    return pd.DataFrame([{"step": l.step, "status": l.status, "reason": l.reason, "seconds": round(l.seconds, 1)}
                         for l in ctx.log.values()])


# =========================================================================================
# Run folders (run.json written at the start, updated per step)
# =========================================================================================
RUN_MARKER = "run.json"


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


class RunFolder:
    """A run folder's ``run.json``: who it belongs to (``identity``: command, model, configuration),
    its status and the state of every step, rewritten atomically as the run goes.

    Used as a context manager (``with RunFolder.open(...) as rf:``), the block's normal end marks the
    folder ``done``; an exception marks it ``failed`` (``interrupted`` on Ctrl-C) with the error in
    ``run.json``.

    ``open(..., resume=True)`` continues a folder only when its identity equals the new one; otherwise
    it refuses with the differing fields (``overwrite=True`` accepts the new identity: steps whose
    fingerprints still match are reused, the rest recompute).
    """

    def __init__(self, path: Path, state: dict):
        self.path = Path(path)
        self.state = state

    @classmethod
    def open(cls, out: str | Path, name: str | None, identity: dict, *, resume: str | Path | None = None,
             overwrite: bool = False) -> "RunFolder":
        from .. import report

        if resume is not None:
            path = Path(resume)
            rj = path / RUN_MARKER
            if not path.is_dir():
                raise InputError(f"--resume {path}: no such run folder; pass a folder written by emolens.")
            try:
                state = json.loads(rj.read_text())
            except (OSError, ValueError):
                raise InputError(f"--resume {path}: {rj} is missing or unreadable, so this is not an emolens run "
                                 "folder; start a new run (--name NEW).") from None
            old = json.loads(json.dumps(state.get("identity", {}), default=str))
            new = json.loads(json.dumps(identity, default=str))
            if old != new and not overwrite:
                fo, fn = _flatten(old), _flatten(new)
                diff = [f"{k}: {fo.get(k, '(absent)')!r} -> {fn.get(k, '(absent)')!r}"
                        for k in sorted(set(fo) | set(fn)) if fo.get(k) != fn.get(k)]
                shown = "; ".join(diff[:12]) + (f"; ... ({len(diff)} fields)" if len(diff) > 12 else "")
                raise InputError(f"--resume {path}: this folder holds a run of another model or configuration "
                                 f"({shown}). Pass a new --name to start a separate run, or --overwrite to resume "
                                 "it under the new settings (steps whose inputs changed recompute).")
            state["identity"] = new
            state["status"] = "running"
            state.pop("error", None)  # of the run that failed; written out below
            io.remove_stale_temps(path)  # e.g. .run.json.<random>.tmp of a process killed while saving
            rf = cls(path, state)
        else:
            path = report.new_run_dir(out, name, overwrite=overwrite)
            rf = cls(path, {"identity": json.loads(json.dumps(identity, default=str)), "status": "running",
                            "steps": {}})
        # the whole state, not save()'s merge: a resumed state is the file's content (others' keys included)
        # minus what the resume drops, e.g. the last run's error
        io.write_json(path / RUN_MARKER, rf.state)
        return rf

    def save(self) -> None:
        try:  # keep keys others wrote (the report's title, sections)
            old = json.loads((self.path / RUN_MARKER).read_text())
            state = {**(old if isinstance(old, dict) else {}), **self.state}
        except (OSError, ValueError):
            state = self.state
        io.write_json(self.path / RUN_MARKER, state)

    def step_done(self, pipeline: str, entry: StepLog) -> None:
        self.state.setdefault("steps", {}).setdefault(pipeline, {})[entry.step] = dataclasses.asdict(entry)
        self.save()

    def finish(self, status: str = "done") -> None:
        self.state["status"] = status
        self.save()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, et, e, tb) -> bool:
        # a command that dies leaves "failed"/"interrupted" and the error, not a "running" that never ends;
        # finished steps stay in the folder, so --resume continues from them
        if self.state.get("status") != "running":
            return False
        if e is None:
            self.finish()
        else:
            self.state["error"] = f"{et.__name__}: {e}"
            self.finish("interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        return False


_register_builtin_kinds()


def diff_outputs(a: str | Path, b: str | Path) -> list[str]:
    """Output files that differ between two pipeline or run folders (tables compared as data, everything else
    byte for byte); step markers, staging, run.json, the report and its sections are not outputs."""
    import pandas as pd

    a, b = Path(a), Path(b)

    def files(root: Path) -> set[str]:
        skip = ("steps", ".staging", SHARDS, "sections")
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                and not any(part in skip for part in p.relative_to(root).parts)
                and p.name not in (RUN_MARKER, "report.html")}

    fa, fb = files(a), files(b)
    out = sorted(fa ^ fb)
    for rel in sorted(fa & fb):
        pa, pb = a / rel, b / rel
        if rel.endswith(".parquet"):
            try:
                pd.testing.assert_frame_equal(pd.read_parquet(pa), pd.read_parquet(pb))
            except AssertionError:
                out.append(rel)
        elif pa.read_bytes() != pb.read_bytes():
            out.append(rel)
    return out
