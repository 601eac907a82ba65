"""Checkpoints shared by the pipelines: finished steps survive a crash and are not recomputed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

log = logging.getLogger("emolens")


class StepStore:
    """Raw results of one pipeline run under ``root``; a step is redone only when its marker is missing.

    ``root/run_config.json`` holds the run's fingerprint (config + model). A folder that holds a
    run with another fingerprint, or ``resume=False``, starts over: its step markers and the
    ``stale`` glob patterns are removed.
    """

    def __init__(self, root: Path, fingerprint: dict, resume: bool, *, label: str = "pipeline",
                 stale: Iterable[str] = ()):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "steps").mkdir(exist_ok=True)
        self.times: dict[str, float] = {}
        fp = json.loads(json.dumps(fingerprint, default=str))
        fp_path = self.root / "run_config.json"
        old = json.loads(fp_path.read_text()) if fp_path.exists() else None
        if old is not None and (old != fp or not resume):
            if resume:
                log.warning("emolens: %s holds a %s run with another configuration or model; recomputing.",
                            self.root, label)
            for pattern in ("steps/*.json", *stale):
                for p in self.root.glob(pattern):
                    p.unlink()
        fp_path.write_text(json.dumps(fp, indent=1))

    def done(self, step: str) -> bool:
        return (self.root / "steps" / f"{step}.json").exists()

    def mark(self, step: str, seconds: float, **info) -> None:
        self.times[step] = seconds
        (self.root / "steps" / f"{step}.json").write_text(json.dumps({"seconds": round(seconds, 2), **info},
                                                                     default=str))

    def seconds(self, step: str) -> float:
        p = self.root / "steps" / f"{step}.json"
        return float(json.loads(p.read_text()).get("seconds", 0.0)) if p.exists() else 0.0

    def path(self, name: str) -> Path:
        return self.root / name

    def save_json(self, name: str, obj: Any, default=str) -> None:
        self.path(name).write_text(json.dumps(obj, indent=1, default=default))

    def load_json(self, name: str) -> Any:
        return json.loads(self.path(name).read_text())

    def save_df(self, name: str, df: pd.DataFrame) -> None:
        df.to_parquet(self.path(f"{name}.parquet"), index=False)

    def load_df(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path(f"{name}.parquet"))

    def has_df(self, name: str) -> bool:
        return self.path(f"{name}.parquet").exists()
