"""Scale-out on Ray: long, embarrassingly parallel work split into shards over model workers.

What runs here (each also runs locally, the default):

- :func:`generate_replies` - evaluation generations (method x emotion x scenario rows, greedy);
- :func:`capture` - dataset captures with streaming reductions (float64 sums);
- :func:`patch` - exact activation patching over many components;
- :func:`sweep` - steering strength x layer calibration grids (:func:`emolens.steering.sweep`).

Every one takes ``backend=``: ``"local"`` (this process; the plain emolens function), ``"ray"``
(a Ray cluster: the one at ``RAY_ADDRESS`` or a new local one) or a :class:`ScaleConfig`
(address, workers, CPUs/GPUs per worker, threads, shard size, run folder, resume).

How it works
------------
- **Workers.** One model per Ray actor (``num_cpus``/``num_gpus`` per actor). Each actor loads the
  model *by name* with :func:`emolens.load_model` (plus ``model_kwargs``: ``device``, ``dtype``,
  ``device_map``, ``n_devices``, ``max_memory``) and pins ``torch.set_num_threads(threads)``. The
  driver never needs the weights: pass an :class:`~emolens.model.EmoModel` (its name and dtype are
  used) or just a model name. A model changed in memory on the driver is *not* what workers see.
- **Shards.** The work is cut into shards: named units with a fingerprint of their inputs,
  configuration and model (:func:`fingerprint`). Prompt shards start at multiples of
  ``batch_size``, so every forward pass sees exactly the batch it sees locally.
- **Merging.** Results are merged into the local types (:class:`~emolens.capture.CaptureResult`,
  :class:`~emolens.results.Result`, :class:`~emolens.steering.SweepResult`, lists of replies).
  Capture shards return each batch's float64 contribution and the driver folds them in the local
  batch order: the float64 sums (hence the means) are bitwise the local ones; greedy generation
  is bitwise too (same batches, same thread count); patching agrees to float rounding (<= 1e-6:
  patched cells share a stacked forward pass with other cells, as locally, but not always the same ones).
- **Faults.** With ``run_dir``, every finished shard is recorded in ``run_dir/shards/`` exactly like
  a pipeline step (:class:`ShardStore`: files published atomically, marker last, file hashes
  checked); inside a pipeline step the shards go to the step's ``ROOT/.shards/STEP/`` instead. A
  rerun with ``resume=True`` loads shards whose fingerprint matches and whose files verify, and
  recomputes the others (a damaged shard is logged with its reason, never a crash). A killed worker process is restarted by Ray
  (``max_restarts``) and its shard retried (``max_task_retries``); a worker that is gone for good
  has its shard re-queued on the others.

Example::

    from emolens import scale
    cfg = scale.ScaleConfig(backend="ray", workers=2, run_dir="runs/sweep1")
    res = scale.capture("smollm2-135m-instruct", prompts, resid(8), backend=cfg)
    texts = scale.generate_replies(m, prompts, emotions, specs={"joy": [...]}, backend=cfg)
    scale.shutdown()   # stop the workers (kept alive between calls otherwise)

Limits: the metric of :func:`patch` and ``make_interventions`` of :func:`sweep` travel to the
workers by value (cloudpickle in memory; nothing pickled is written to disk), so they must not
capture the driver's model; emolens's built-in metrics do not. Shard files are safetensors + JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import io
from .errors import EmolensError, InputError, MissingDependencyError

log = logging.getLogger("emolens")

__all__ = ["ScaleConfig", "ScaleError", "Shard", "ShardStore", "fingerprint", "add_backend_args", "config_from_args", "use_backend",
           "active_backend", "capture", "patch", "sweep", "generate_replies", "worker_pids", "worker_env", "shutdown"]

BACKENDS = ("local", "ray")


class ScaleError(EmolensError, RuntimeError):
    """A sharded run could not finish (no worker left, a shard failing on every try)."""


# =========================================================================================
# Configuration
# =========================================================================================
@dataclass
class ScaleConfig:
    """Where and how sharded work runs.

    Attributes:
        backend: ``"local"`` (this process) or ``"ray"``.
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); ``None``
            = ``$RAY_ADDRESS`` when set, otherwise a new local cluster with ``workers x num_cpus`` CPUs.
        workers: model actors (default: what the cluster's CPUs/GPUs allow).
        num_cpus, num_gpus: resources per actor (``num_gpus=1``: one GPU per model;
            ``num_gpus=4`` with ``model_kwargs={"n_devices": 4}``: one model over 4 GPUs).
        threads: torch threads per actor (pinned with ``torch.set_num_threads``).
        shard_size: prompts (or cells, or grid points) per shard; prompt shards are rounded up
            to a multiple of ``batch_size``. Default: about 4 shards per worker.
        run_dir: folder for finished shards (``run_dir/shards/``); ``None`` keeps them in memory.
            Work started inside a pipeline step records its shards in the step's folder
            (``ROOT/.shards/STEP/``, :func:`emolens.pipelines.engine.current_shard_dir`) instead.
        resume: reuse finished shards in ``run_dir`` whose fingerprint matches.
        max_restarts, max_task_retries: Ray restarts of a dead actor and retries of its task.
        model_kwargs: extra :func:`~emolens.load_model` arguments for the workers (``device``,
            ``dtype``, ``device_map``, ``n_devices``, ``max_memory``).
    """

    backend: str = "local"
    address: str | None = None
    workers: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int = 1
    shard_size: int | None = None
    run_dir: str | None = None
    resume: bool = True
    max_restarts: int = 3
    max_task_retries: int = 3
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"Unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}.")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"workers={self.workers}; use at least 1 (or None for what the cluster allows).")
        if self.threads < 1:
            raise InputError(f"threads={self.threads}; use at least 1.")
        if self.shard_size is not None and self.shard_size < 1:
            raise InputError(f"shard_size={self.shard_size}; use at least 1 (or None for about 4 shards per worker).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ScaleConfig":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


def _as_config(backend: "str | ScaleConfig | None") -> ScaleConfig:
    if backend is None:
        return active_backend() or ScaleConfig()
    if isinstance(backend, ScaleConfig):
        return backend
    if isinstance(backend, str):
        return ScaleConfig(backend=backend)
    raise InputError(f"backend={backend!r}; pass 'local', 'ray' or a ScaleConfig.")


_ACTIVE: list[ScaleConfig] = []


@contextlib.contextmanager
def use_backend(cfg: "ScaleConfig | str | None") -> Iterator[ScaleConfig | None]:
    """Make ``cfg`` the backend of code that does not pass one (e.g. a pipeline's generation steps)."""
    if cfg is None:
        yield None
        return
    cfg = _as_config(cfg)
    _ACTIVE.append(cfg)
    try:
        yield cfg
    finally:
        _ACTIVE.pop()


def active_backend() -> ScaleConfig | None:
    """The backend set by :func:`use_backend` (``None`` outside it, and inside a worker)."""
    return _ACTIVE[-1] if _ACTIVE else None


# =========================================================================================
# Fingerprints and the shard store
# =========================================================================================
def _canon(x: Any) -> Any:
    """A JSON-able canonical form: tensors by content hash, dataclasses/specs by fields, callables by code."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        return {"tensor": hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest(),
                "shape": list(t.shape), "dtype": str(t.dtype)}
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, dict):
        return {str(k): _canon(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [_canon(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted(json.dumps(_canon(v), sort_keys=True) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {"__type__": type(x).__qualname__,
                **{f.name: _canon(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if isinstance(x, functools.partial):
        return {"partial": _canon(x.func), "args": _canon(x.args), "kw": _canon(x.keywords)}
    code = getattr(x, "__code__", None)
    if code is not None:  # a function: its code, defaults and closure values (not its identity)
        cells = [c.cell_contents for c in (x.__closure__ or ()) if _has_contents(c)]
        return {"fn": f"{x.__module__}.{x.__qualname__}", "code": hashlib.sha256(code.co_code).hexdigest(),
                "consts": _canon([c for c in code.co_consts if isinstance(c, (str, int, float, tuple))]),
                "defaults": _canon(x.__defaults__), "closure": _canon(cells)}
    if hasattr(x, "to_dict"):
        return {"__type__": type(x).__qualname__, **_canon(x.to_dict())}
    if hasattr(x, "__dict__"):
        return {"__type__": type(x).__qualname__, **_canon(vars(x))}
    return repr(x)


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def fingerprint(*items: Any) -> str:
    """Stable hash of anything a shard depends on (prompts, configs, tensors by content, specs, metrics)."""
    return hashlib.sha256(json.dumps(_canon(list(items)), sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class Shard:
    """A named unit of work.

    Attributes:
        name: unique within a run folder (``"<job>/<index>"``).
        fn: module-level function ``fn(model, shared, **payload) -> (tensors, info)`` run by a
            worker: ``tensors`` a ``{name: tensor}`` dict, ``info`` JSON-able.
        payload: the shard's own arguments.
        fingerprint: hash of inputs + configuration + model; a stored shard is reused only
            when it matches.
    """

    name: str
    fn: Callable
    payload: dict
    fingerprint: str


class ShardStore:
    """Finished shards under ``root``, stored and checked exactly like pipeline steps
    (:func:`emolens.pipelines.engine.commit_record`):

    - ``root/NAME.safetensors`` (tensors) and ``root/NAME.info.json`` (the JSON-able info);
    - ``root/steps/NAME.json``: the marker, written last, with the shard's fingerprint and the
      sha256 of both files.

    A shard is *done* only when its marker holds the shard's fingerprint and both files still hash to
    what it recorded; a missing, empty or corrupt marker, or a missing, truncated or changed file,
    makes it "not done" (recomputed, with the reason logged), never a crash.
    """

    def __init__(self, root: str | Path, *, resume: bool = True):
        from .pipelines import engine

        self.root = Path(root)
        self.resume = resume
        self.root.mkdir(parents=True, exist_ok=True)
        # a leftover staging folder is a crash's half-written shard: never read, removed now
        shutil.rmtree(self.root / ".staging", ignore_errors=True)
        self._engine = engine
        self._old: dict[str, dict | None] = {}

    def status(self, shard: Shard) -> str | None:
        """``None`` when ``shard`` is finished here and reusable; otherwise why it must be computed."""
        old, reason = self._engine.record_status(self.root, shard.name, shard.fingerprint, resume=self.resume)
        self._old[shard.name] = old
        return reason

    def done(self, shard: Shard) -> bool:
        return self.status(shard) is None

    def save(self, shard: Shard, tensors: dict, info: Any, seconds: float = 0.0) -> None:
        e = self._engine
        old = self._old.pop(shard.name, None)
        if old is None:  # files of an older record of this name that the new one does not rewrite are removed
            old, _ = e.record_status(self.root, shard.name, shard.fingerprint)
        staging = e.begin_record(self.root, shard.name)
        base = staging / shard.name
        base.parent.mkdir(parents=True, exist_ok=True)
        data, meta = base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".info.json")
        data.write_bytes(io.safetensors_bytes(tensors or {"__empty__": torch.zeros(0)}))
        meta.write_text(json.dumps(info))
        e.commit_record(self.root, shard.name, staging, fingerprint=shard.fingerprint, parts={"shard": shard.name},
                        outputs={"tensors": {"kind": "safetensors"}, "info": {"kind": "json"}}, seconds=seconds,
                        old=old)

    def load(self, shard: Shard) -> tuple[dict, Any]:
        from safetensors.torch import load_file

        base = self.root / shard.name
        t = load_file(str(base.with_name(base.name + ".safetensors")))
        t.pop("__empty__", None)
        return t, json.loads(base.with_name(base.name + ".info.json").read_text())

    def names(self) -> list[str]:
        """Names of the shards with a readable marker (finished, unless a file was damaged since)."""
        steps = self.root / "steps"
        return sorted(str(p.relative_to(steps).with_suffix("")) for p in steps.rglob("*.json")
                      if self._engine._read_marker(self.root, str(p.relative_to(steps).with_suffix(""))))


# =========================================================================================
# Workers
# =========================================================================================
def _model_ref(model: Any, cfg: ScaleConfig) -> tuple[str, dict, dict | None]:
    """(name, load_model kwargs, driver-side info or None) of the model the workers load."""
    kw = dict(cfg.model_kwargs)
    if isinstance(model, str):
        name, info = model, None
    else:
        name, info = model.name, {k: v for k, v in model.info().items() if k != "device"}
        kw.setdefault("dtype", str(model.dtype).replace("torch.", ""))
    if "device" not in kw and "device_map" not in kw and "n_devices" not in kw:
        kw["device"] = "cuda" if cfg.num_gpus > 0 else "cpu"
    return name, kw, info


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


class _Worker:
    """One model; runs shard functions on it. Used as a Ray actor, or in-process for ``local``."""

    def __init__(self, name: str, model_kwargs: dict, threads: int | None, model: Any = None):
        if threads is not None:  # Ray workers only: the local pool leaves the driver's threads alone
            _set_threads(threads)
        if model is None:
            from .model import load_model

            model = load_model(name, **model_kwargs)
        self.model = model

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        return {k: v for k, v in self.model.info().items() if k != "device"}

    def env(self) -> dict:
        """Process id, torch threads and the emolens package this worker imported."""
        import emolens

        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "emolens": emolens.__file__}

    def run(self, fn: Callable, shared: dict, payload: dict) -> tuple[dict, Any, float]:
        t0 = time.perf_counter()
        tensors, info = fn(self.model, shared, **payload)
        return tensors, info, time.perf_counter() - t0


def _ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("backend='ray' needs Ray: pip install 'emolens[ray]' (or pip install ray).") from None
    return ray


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


class _RayPool:
    """Model actors on a Ray cluster; shards are handed to whichever actor is free."""

    def __init__(self, name: str, model_kwargs: dict, cfg: ScaleConfig):
        ray = _ray()
        if not ray.is_initialized():
            # Workers must import this emolens (e.g. a source checkout), with pinned threads.
            env = {"PYTHONPATH": os.pathsep.join([_package_root()] + [p for p in os.environ.get("PYTHONPATH", "").split(
                os.pathsep) if p]), "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads),
                "TOKENIZERS_PARALLELISM": "false"}
            for var in ("EMOLENS_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "EMOLENS_PROGRESS"):
                if var in os.environ:
                    env[var] = os.environ[var]
            kw: dict = dict(runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False,
                            logging_level=logging.WARNING)
            address = cfg.address or os.environ.get("RAY_ADDRESS")
            if address:
                kw["address"] = address
            else:
                n = cfg.workers or max(1, (os.cpu_count() or 1) // max(1, int(cfg.num_cpus)))
                kw["num_cpus"] = max(1, math.ceil(n * cfg.num_cpus))
                # Ray runs workers at nice 15 by default; here the workers *are* the job, and on a shared
                # machine niced workers lost most of their CPU to other processes (benchmarks/sweep.py).
                kw["_system_config"] = {"worker_niceness": 0}
                if cfg.num_gpus:
                    kw["num_gpus"] = max(1, math.ceil(n * cfg.num_gpus))
            ray.init(**kw)
            _STARTED_RAY.append(True)
        res = ray.cluster_resources()
        n = cfg.workers
        if n is None:
            n = int(res.get("CPU", 1) // max(cfg.num_cpus, 1e-9))
            if cfg.num_gpus:
                n = min(n, int(res.get("GPU", 0) // cfg.num_gpus))
            n = max(1, n)
        if n * cfg.num_cpus > res.get("CPU", 0) + 1e-9:
            raise InputError(f"{n} workers x {cfg.num_cpus} CPUs need {n * cfg.num_cpus:g} CPUs but the Ray cluster has "
                             f"{res.get('CPU', 0):g}; use fewer workers or num_cpus, or a larger cluster (--address).")
        if cfg.num_gpus and res.get("GPU", 0) < cfg.num_gpus:
            raise InputError(f"num_gpus={cfg.num_gpus} per worker but the Ray cluster has {res.get('GPU', 0)} GPUs; "
                             "lower num_gpus or connect to a cluster with GPUs (--address).")
        actor = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=cfg.max_restarts,
                           max_task_retries=cfg.max_task_retries)(_Worker)
        self.actors = [actor.remote(name, model_kwargs, cfg.threads) for _ in range(n)]
        self._info = ray.get(self.actors[0].info.remote())

    def info(self) -> dict:
        return self._info

    def pids(self) -> list[int]:
        return [e["pid"] for e in self.env()]

    def env(self) -> list[dict]:
        ray = _ray()
        return ray.get([a.env.remote() for a in self.actors])

    def map(self, shards: list[Shard], shared: dict, on_done: Callable[[Shard, dict, Any, float], None]) -> None:
        ray = _ray()
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

        shared_ref = ray.put(shared)
        queue, idle, pending = deque(shards), list(self.actors), {}
        tries: dict[str, int] = {}
        while queue or pending:
            while idle and queue:
                a, sh = idle.pop(0), queue.popleft()
                pending[a.run.remote(sh.fn, shared_ref, sh.payload)] = (sh, a)
            if not pending:
                raise ScaleError("No Ray worker is left (each died more often than max_restarts allows); "
                                 "check the worker logs, raise max_restarts, or run with fewer shards in flight.")
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                sh, a = pending.pop(ref)
                try:
                    tensors, info, secs = ray.get(ref)
                except RayTaskError as e:  # the shard itself raised: re-raise the emolens error it carries
                    raise e.as_instanceof_cause() from None
                except RayActorError as e:  # retries used up: hand the shard to the others
                    tries[sh.name] = tries.get(sh.name, 0) + 1
                    if tries[sh.name] > len(self.actors) + 1:
                        raise ScaleError(f"Shard {sh.name} failed on every try; see the Ray worker logs.") from None
                    if isinstance(e, ActorDiedError):  # gone for good (max_restarts used up)
                        log.warning("emolens: a Ray worker died for good; re-queueing shard %s", sh.name)
                        self.actors = [x for x in self.actors if x is not a]
                    else:
                        idle.append(a)
                    queue.appendleft(sh)
                    continue
                idle.append(a)
                on_done(sh, tensors, info, secs)

    def close(self) -> None:
        ray = _ray()
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        self.actors = []


class _LocalPool:
    """In-process: the same shards, one after the other, on the driver's model."""

    def __init__(self, worker: _Worker):
        self.worker = worker

    def info(self) -> dict:
        return self.worker.info()

    def pids(self) -> list[int]:
        return [os.getpid()]

    def env(self) -> list[dict]:
        return [self.worker.env()]

    def map(self, shards, shared, on_done) -> None:
        for sh in shards:
            on_done(sh, *self.worker.run(sh.fn, shared, sh.payload))

    def close(self) -> None:
        pass


_POOLS: dict[str, Any] = {}
#: Last sharded run: job, shards, reused (loaded from the run folder), worker_seconds (sum of the
#: shards' compute time in the workers), wall_seconds (driver wall time of the computed shards).
LAST_RUN: dict[str, Any] = {}
_STARTED_RAY: list = []  # non-empty when emolens started the local Ray cluster (shutdown() stops it)


def _pool(model: Any, cfg: ScaleConfig):
    """A pool for ``model`` under ``cfg``; Ray pools are kept and reused until :func:`shutdown`."""
    if cfg.backend == "local":
        if isinstance(model, str):
            key = json.dumps(["local", model, cfg.model_kwargs], sort_keys=True, default=str)
            if key not in _POOLS:
                name, kw, _ = _model_ref(model, cfg)
                _POOLS[key] = _LocalPool(_Worker(name, kw, None))
            return _POOLS[key]
        return _LocalPool(_Worker(model.name, {}, None, model=model))
    name, kw, _ = _model_ref(model, cfg)
    key = json.dumps(["ray", name, kw, cfg.address, cfg.workers, cfg.num_cpus, cfg.num_gpus, cfg.threads,
                      cfg.max_restarts, cfg.max_task_retries], sort_keys=True, default=str)
    if key not in _POOLS:
        for k in [k for k in _POOLS if json.loads(k)[0] == "ray"]:  # one Ray pool at a time: free its resources
            _POOLS.pop(k).close()
        _POOLS[key] = _RayPool(name, kw, cfg)
    return _POOLS[key]


def worker_pids(model: Any, backend: "str | ScaleConfig" = "ray") -> list[int]:
    """Process ids of the workers serving ``model`` (starts them if needed); for tests and monitoring."""
    return _pool(model, _as_config(backend)).pids()


def worker_env(model: Any, backend: "str | ScaleConfig" = "ray") -> list[dict]:
    """Per worker: ``{"pid", "threads", "emolens"}`` (the package file it imported)."""
    return _pool(model, _as_config(backend)).env()


def shutdown() -> None:
    """Stop every worker pool (and the local Ray cluster emolens started)."""
    while _POOLS:
        _POOLS.popitem()[1].close()
    if _STARTED_RAY:
        _STARTED_RAY.clear()
        _ray().shutdown()


def _execute(model: Any, cfg: ScaleConfig, job: str, shards: list[Shard], shared: dict,
             progress: bool = False) -> list[tuple[dict, Any]]:
    """Run ``shards`` (skipping finished ones in the run folder); outputs in shard order."""
    from .pipelines.engine import current_shard_dir

    # inside a pipeline step the shards belong to the step (its --resume skips them); else cfg.run_dir
    step_dir = current_shard_dir()
    if step_dir is not None:
        store = ShardStore(step_dir, resume=True)  # the engine clears the folder when the step runs with resume off
    else:
        store = ShardStore(Path(cfg.run_dir) / "shards", resume=cfg.resume) if cfg.run_dir else None
    out: dict[str, tuple[dict, Any]] = {}
    todo, why = [], []
    for sh in shards:
        reason = store.status(sh) if store is not None else "no run folder"
        if reason is None:
            try:
                out[sh.name] = store.load(sh)
                continue
            except Exception as e:  # noqa: BLE001 - verified files that still fail to load: recompute
                reason = f"unreadable ({type(e).__name__}: {e})"
        todo.append(sh)
        if reason not in ("not run yet", "no run folder", "resume off"):
            why.append(f"{sh.name} ({reason})")
    if store is not None and len(out):
        log.info("emolens: %s: %d of %d shards reused from %s", job, len(out), len(shards), store.root)
    if why:
        log.warning("emolens: %s shards recomputed: %s", job, "; ".join(why))
    LAST_RUN.clear()
    LAST_RUN.update(job=job, shards=len(shards), reused=len(shards) - len(todo), worker_seconds=0.0, wall_seconds=0.0)
    if todo:
        pool = _pool(model, cfg)
        from .progress import progress_bar

        bar = progress_bar(None, total=len(todo), desc=f"{job} ({cfg.backend})", disable=not progress)
        t0 = time.perf_counter()

        def on_done(sh: Shard, tensors: dict, info: Any, secs: float) -> None:
            if store is not None:
                store.save(sh, tensors, info, secs)
            out[sh.name] = (tensors, info)
            LAST_RUN["worker_seconds"] += secs
            bar.update(1)

        pool.map(todo, shared, on_done)
        LAST_RUN["wall_seconds"] = time.perf_counter() - t0
        bar.close()
    return [out[sh.name] for sh in shards]


def _model_id(model: Any, cfg: ScaleConfig) -> dict:
    name, kw, info = _model_ref(model, cfg)
    if info is None:
        info = _pool(model, cfg).info()
    return {"name": name, "load": kw, "info": info}


def _prompt_shards(n: int, batch_size: int, cfg: ScaleConfig) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges starting at multiples of ``batch_size`` (the local batches, never split)."""
    n_batches = math.ceil(n / batch_size)
    if cfg.shard_size is not None:
        per = max(1, math.ceil(cfg.shard_size / batch_size))
    else:
        per = max(1, math.ceil(n_batches / (4 * max(1, cfg.workers or 2))))
    return [(b * batch_size, min(n, (b + per) * batch_size)) for b in range(0, n_batches, per)]


def _job(kind: str, fp: str) -> str:
    return f"{kind}-{fp[:12]}"


# =========================================================================================
# Generation
# =========================================================================================
def _lookup(specs: dict, emotion: Any) -> list:
    return list(specs.get(emotion, []))


def _gen_shard(model, shared: dict, *, start: int, stop: int) -> tuple[dict, Any]:
    from .pipelines.paper2 import generate_replies as local_generate

    specs = shared["specs"]
    texts = local_generate(model, shared["prompts"][start:stop], shared["emotions"][start:stop],
                           interventions_for=functools.partial(_lookup, specs) if specs is not None else None,
                           gen_kwargs=shared["gen_kwargs"], batch_size=shared["batch_size"], backend="local")
    return {}, {"texts": texts}


def generate_replies(model, prompts: Sequence[Any], emotions: Sequence[Any] | None = None, *,
                     specs: dict | None = None, interventions_for: Callable[[Any], list] | None = None,
                     gen_kwargs: dict | None = None, batch_size: int = 32, backend: "str | ScaleConfig | None" = None,
                     progress: bool = False) -> list[str]:
    """Greedy replies of :func:`emolens.pipelines.paper2.generate_replies`, sharded.

    Args:
        model: an :class:`~emolens.model.EmoModel` or a model name (workers load it).
        prompts: one prompt (string / message list) per row.
        emotions: one label per row (``None`` = no interventions for that row).
        specs: ``{emotion: [Intervention, ...]}``, applied to that emotion's rows only; or
        interventions_for: ``fn(emotion) -> interventions``, called here on the driver (once per emotion).
        gen_kwargs: decoding options (``max_new_tokens``, ``repetition_penalty``, ...).
        batch_size: rows per generation batch; shards hold whole batches.

    Returns:
        one reply per prompt (stripped), in order; bitwise the local result for greedy decoding.
    """
    cfg = _as_config(backend)
    prompts = list(prompts)
    if not prompts:
        raise InputError("No prompts to generate from; pass at least one.")
    emotions = list(emotions) if emotions is not None else [None] * len(prompts)
    if len(emotions) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(emotions)} emotion labels; pass one label per prompt.")
    if specs is None and interventions_for is not None:
        specs = {e: list(interventions_for(e)) for e in dict.fromkeys(emotions)}
    if specs is not None:
        specs = {e: list(v) for e, v in specs.items()}
    shared = {"prompts": prompts, "emotions": emotions, "specs": specs, "gen_kwargs": dict(gen_kwargs or {}),
              "batch_size": int(batch_size)}
    fp = fingerprint("generate", _model_id(model, cfg), shared)
    job = _job("generate", fp)
    shards = [Shard(f"{job}/{i:05d}", _gen_shard, {"start": a, "stop": b}, fingerprint(fp, a, b))
              for i, (a, b) in enumerate(_prompt_shards(len(prompts), batch_size, cfg))]
    outs = _execute(model, cfg, "generate", shards, shared, progress)
    return [t for _, info in outs for t in info["texts"]]


# =========================================================================================
# Capture
# =========================================================================================
def _capture_shard(model, shared: dict, *, start: int, stop: int) -> tuple[dict, Any]:
    from .capture import _stream

    accs, counts = _stream(model, shared["prompts"][start:stop], shared["sites"], shared["pos"], shared["reduce"],
                           shared["gid_all"][start:stop], shared["n_groups"], batch_size=shared["batch_size"],
                           chat=shared["chat"], system=shared["system"], interventions=shared["interventions"],
                           record=True, attn=shared.get("attn", "auto"))
    tensors: dict[str, torch.Tensor] = {"counts": counts}
    dims = {}
    for key, a in accs.items():
        if shared["reduce"] == "none":
            tensors[f"items.{key}"] = torch.cat(a.items)
        else:  # each batch's float64 contribution, in order: [n_batches, D] (one group) or [rows, D] (groups)
            tensors[f"parts.{key}"] = torch.stack(a.record) if shared["n_groups"] == 1 else torch.cat(a.record)
            dims[key] = list(a.dims)
    gids = shared["gid_all"][start:stop]
    tensors["gids"] = gids
    return tensors, {"dims": dims, "n_batches": math.ceil((stop - start) / shared["batch_size"])}


def capture(model, prompts: Sequence[Any], sites, *, pos="last", reduce: str = "mean", groups=None,
            batch_size: int = 16, chat: bool | None = None, system: str | None = None, interventions=None,
            backend: "str | ScaleConfig | None" = None, progress: bool = False, attn: str = "auto"):
    """:func:`emolens.capture.capture`, sharded over workers; bitwise the local result.

    Shards return, per site, every batch's float64 contribution (``[n_batches, D]`` for
    ``mean``/``sum``; ``[batch, D]`` rows for ``group_mean``, with their group ids) and the driver
    adds them in the local batch order. Memory on the driver: one float64 total per site plus
    the shards' partial sums (``n_batches x D`` per site and shard; ``n_prompts x D`` for
    ``group_mean``/``none``).
    """
    from .capture import _finish, _prepare

    from .model import _positive_int, _prompt_list

    cfg = _as_config(backend)
    prompts = _prompt_list(prompts)
    batch_size = _positive_int("batch_size", batch_size)
    pos, site_list, labels, gid_all = _prepare(prompts, sites, pos, reduce, groups)
    n_groups = max(len(labels), 1)
    shared = {"prompts": prompts, "sites": site_list, "pos": pos, "reduce": reduce, "gid_all": gid_all,
              "n_groups": n_groups, "batch_size": int(batch_size), "chat": chat, "system": system,
              "interventions": list(interventions or []), "attn": attn}
    fp = fingerprint("capture", _model_id(model, cfg), {k: v for k, v in shared.items()})
    job = _job("capture", fp)
    shards = [Shard(f"{job}/{i:05d}", _capture_shard, {"start": a, "stop": b}, fingerprint(fp, a, b))
              for i, (a, b) in enumerate(_prompt_shards(len(prompts), batch_size, cfg))]
    outs = _execute(model, cfg, "capture", shards, shared, progress)
    counts = torch.zeros(n_groups, dtype=torch.float64)
    totals: dict[str, Any] = {}
    keys = [str(s) for s in site_list]
    for tensors, info in outs:
        counts += tensors["counts"]  # integer-valued float64: exact in any order
        for key in keys:
            if reduce == "none":
                totals.setdefault(key, []).append(tensors[f"items.{key}"])
                continue
            parts = tensors[f"parts.{key}"]
            if key not in totals:
                totals[key] = (torch.zeros((n_groups, parts.shape[-1]), dtype=torch.float64), tuple(info["dims"][key]))
            total = totals[key][0]
            if n_groups == 1:
                for part in parts:  # the local loop's additions, in its order
                    total[0] += part
            else:
                gids = tensors["gids"]
                for b in range(info["n_batches"]):
                    rows = slice(b * batch_size, (b + 1) * batch_size)
                    total.index_add_(0, gids[rows], parts[rows])
    meta = {"model": model} if isinstance(model, str) else model.meta()
    res = _finish(totals, reduce, pos, counts, labels, len(prompts), meta)
    res.meta["backend"] = cfg.backend
    return res


# =========================================================================================
# Exact patching
# =========================================================================================
def _patch_cells(model, shared: dict) -> tuple[dict, Any]:
    from .attribution import prepare_pairs
    from .metrics import as_metric
    from .patching import _norm_cells

    metric = as_metric(shared["metric"])
    pairs = prepare_pairs(model, shared["clean"], shared["corrupted"], metric, align=shared["align"],
                          chat=shared["chat"], system=shared["system"])
    return {}, {"cells": [list(c) for c in _norm_cells(model, shared["nodes"], shared["candidates"], pairs.n_pos)]}


def _patch_shard(model, shared: dict, *, cells: list) -> tuple[dict, Any]:
    from .patching import patch as local_patch

    r = local_patch(model, shared["clean"], shared["corrupted"], shared["metric"], nodes=shared["nodes"],
                    candidates=[tuple(c) for c in cells], batch_size=shared["batch_size"], align=shared["align"],
                    resid_site=shared["resid_site"], normalize=shared["normalize"], skip_prefix=shared["skip_prefix"],
                    chat=shared["chat"], system=shared["system"], progress=False, attn=shared.get("attn", "auto"))
    return {"scores": r.scores, **{f"extra.{k}": v for k, v in r.extra.items()}}, \
        {"kind": r.kind, "axes": list(r.axes), "labels": r.labels, "meta": r.meta}


def patch(model, clean, corrupted, metric, *, nodes: str = "resid", candidates: Any = None, batch_size: int = 64,
          align: str | None = None, resid_site: str = "pre", normalize: bool = False, skip_prefix: bool = True,
          chat: bool | None = None, system: str | None = None, backend: "str | ScaleConfig | None" = None,
          progress: bool = False, attn: str = "auto"):
    """:func:`emolens.patching.patch` with the cells split into shards over workers.

    Each shard patches a contiguous run of cells (layer-major, so a shard covers few layers) and
    repeats the two clean/corrupted passes of its prompts; the merged
    :class:`~emolens.results.Result` equals the local one to float rounding (<= 1e-6).
    """
    from .patching import PATCH_NODES
    from .results import Result

    cfg = _as_config(backend)
    if nodes not in PATCH_NODES:
        raise InputError(f"Unknown patching nodes {nodes!r}; use one of {', '.join(PATCH_NODES)}.")
    shared = {"clean": clean, "corrupted": corrupted, "metric": metric, "nodes": nodes, "candidates": candidates,
              "batch_size": int(batch_size), "align": align, "resid_site": resid_site, "normalize": normalize,
              "skip_prefix": skip_prefix, "chat": chat, "system": system, "attn": attn}
    fp = fingerprint("patch", _model_id(model, cfg), shared)
    job = _job("patch", fp)
    plan = Shard(f"{job}/cells", _patch_cells, {}, fp)
    cells = _execute(model, cfg, "patch: cells", [plan], shared)[0][1]["cells"]
    n_workers = cfg.workers or 2
    per = cfg.shard_size or max(1, math.ceil(len(cells) / (2 * n_workers)))
    shards = [Shard(f"{job}/{i:05d}", _patch_shard, {"cells": cells[s:s + per]}, fingerprint(fp, cells[s:s + per]))
              for i, s in enumerate(range(0, len(cells), per))]
    outs = _execute(model, cfg, "patch", shards, shared, progress)
    t0, info0 = outs[0]
    scores = t0["scores"].clone()
    extra = {k[6:]: v.clone() for k, v in t0.items() if k.startswith("extra.")}
    for tensors, _ in outs[1:]:
        m = tensors["extra.patched"] > 0
        scores[m] = tensors["scores"][m]
        for k in extra:
            extra[k][m] = tensors[f"extra.{k}"][m]
    meta = dict(info0["meta"])
    meta.update(n_cells=len(cells), n_forward_passes=sum(i["meta"]["n_forward_passes"] for _, i in outs),
                backend=cfg.backend, n_shards=len(shards))
    return Result(info0["kind"], scores, tuple(info0["axes"]), info0["labels"], extra, meta)


# =========================================================================================
# Steering sweeps
# =========================================================================================
def _sweep_point(model, shared: dict, *, layer: int | None, strength: float) -> tuple[dict, Any]:
    from .steering import generate, score_condition, steering_interventions

    prompts, gen = shared["prompts"], shared["gen"]
    if layer is None:
        ivs, label = [], "strength 0 (unsteered)"
    else:
        s = shared
        ivs = (s["make_interventions"](strength, layer) if s["make_interventions"] is not None else
               steering_interventions(s["vectors"], s["emotions"], layers=layer, strength=strength, kind=s["kind"],
                                      strength_mode=s["strength_mode"], position=s["position"], window=s["window"],
                                      model=model))
        label = (f"strength {strength:g} ({s['strength_mode']}) at {s['kind']}.{layer}, "
                 f"position mode {s['position']!r}")
    texts = generate(model, prompts, ivs, label=label, **gen)
    df = score_condition(model, prompts, texts, fluency=shared["fluency"])
    return {}, {"texts": texts, "scores": df.to_dict(orient="list"), "columns": list(df.columns)}


def sweep(model, prompts: Sequence[Any], vectors, emotions, *, strengths: Sequence[float], layers,
          kind: str = "resid_post", strength_mode: str = "norm", position: str = "all", window: Sequence[int] = (-1,),
          make_interventions: Callable[[float, int], list] | None = None,
          targets: Sequence[str] = ("joy_trust", "first_person_rate"), max_new_tokens: int = 32, batch_size: int = 32,
          fluency: bool = True, baseline=None, backend: "str | ScaleConfig | None" = None, progress: bool = False,
          **gen_kwargs: Any):
    """:func:`emolens.steering.sweep` with one shard per (layer, strength) point (plus the baseline).

    Same arguments and the same :class:`~emolens.steering.SweepResult`; replies are bitwise the
    local ones (greedy), scores equal to float rounding.
    """
    import pandas as pd

    from .steering import _sweep_grid, _sweep_result

    cfg = _as_config(backend)
    prompts, layer_list, svals, gen = _sweep_grid(prompts, layers, strengths, max_new_tokens, batch_size, gen_kwargs)
    shared = {"prompts": prompts, "vectors": vectors, "emotions": emotions, "kind": kind,
              "strength_mode": strength_mode, "position": position, "window": list(window),
              "make_interventions": make_interventions, "gen": gen, "fluency": fluency}
    fp = fingerprint("sweep", _model_id(model, cfg), shared)
    job = _job("sweep", fp)
    grid = [(L, s) for L in layer_list for s in svals]
    points = ([] if baseline is not None else [(None, 0.0)]) + grid
    shards = [Shard(f"{job}/{i:05d}", _sweep_point, {"layer": L, "strength": s}, fingerprint(fp, L, s))
              for i, (L, s) in enumerate(points)]
    outs = _execute(model, cfg, "sweep", shards, shared, progress)
    texts, scores = {}, {}
    if baseline is not None:
        texts[(None, 0.0)], scores[(None, 0.0)] = list(baseline[0]), baseline[1]
    for (L, s), (_, info) in zip(points, outs):
        texts[(L, s)] = info["texts"]
        scores[(L, s)] = pd.DataFrame(info["scores"], columns=info["columns"])
    res = _sweep_result(texts, scores, grid, emotions, targets, kind=kind, strength_mode=strength_mode,
                        position=position, window=window, max_new_tokens=max_new_tokens, n_prompts=len(prompts))
    res.settings["backend"] = cfg.backend
    return res


# =========================================================================================
# Command line
# =========================================================================================
def add_backend_args(parser) -> None:
    """Add ``--backend {local,ray}``, ``--address``, ``--workers``, ``--gpus-per-worker``,
    ``--threads-per-worker``, ``--shard-size`` to an argparse parser (see :func:`config_from_args`)."""
    g = parser.add_argument_group("scale-out (Ray)")
    g.add_argument("--backend", choices=BACKENDS, default="local",
                   help="where long sweeps run: this process (default) or Ray workers (pip install 'emolens[ray]')")
    g.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a new local "
                   "cluster)")
    g.add_argument("--workers", type=int, default=None, help="model workers (default: what the cluster allows)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per model worker (default 0: CPU)")
    g.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per worker (default 1)")
    g.add_argument("--shard-size", type=int, default=None, help="prompts / cells / grid points per shard")


def config_from_args(args, run_dir: str | Path | None = None, resume: bool = True) -> ScaleConfig | None:
    """The :class:`ScaleConfig` of parsed :func:`add_backend_args` options (``None`` for local)."""
    if getattr(args, "backend", "local") == "local":
        return None
    return ScaleConfig(backend=args.backend, address=args.address, workers=args.workers,
                       num_gpus=args.gpus_per_worker, threads=args.threads_per_worker, shard_size=args.shard_size,
                       run_dir=str(run_dir) if run_dir is not None else None, resume=resume,
                       model_kwargs={"device": getattr(args, "device", None)} if getattr(args, "device", None) else {})
