"""One results type for scores over model components.

:class:`Result` holds a tensor of scores over labelled axes — ``("layer", "position")`` for a
residual sweep, ``("layer", "head")`` for heads, ``("layer", "neuron")`` for neurons,
``("layer", "sublayer")`` for attention/MLP sublayers, ``("k",)`` or ``("scale",)`` for effect
curves — plus optional same-shaped companions (``ci_low``, ``ci_high``, ``stderr``, ...) and
metadata (model, inputs' hash, metric, method, package version). Attribution, patching,
ablation, direction and circuit steps all return it, and every plot in
:mod:`emolens.viz` takes it.

Saved as ``NAME.safetensors`` (tensors) + ``NAME.json`` (axes, labels, metadata); no pickle.
"""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ResultError

#: Known result kinds and their axes (others are allowed; these are what the plots expect).
KINDS = {
    "resid_pos": ("layer", "position"),
    "heads": ("layer", "head"),
    "heads_pos": ("layer", "head", "position"),
    "neurons": ("layer", "neuron"),
    "sublayers": ("layer", "sublayer"),
    "layers": ("layer",),
    "curve": ("x",),
    "matrix": ("row", "col"),
}


def inputs_hash(*items: Any) -> str:
    """Short stable hash of the inputs (prompts, pairs, ...) a result was computed on."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class Result:
    """Scores over labelled axes.

    Attributes:
        kind: e.g. ``"heads"``, ``"neurons"``, ``"resid_pos"`` (see :data:`KINDS`).
        scores: float tensor; one dim per axis.
        axes: axis names, e.g. ``("layer", "head")``.
        labels: optional tick labels per axis (e.g. ``{"position": token strings}``).
        extra: same-shaped companion tensors (``ci_low``, ``ci_high``, ``stderr``, ...).
        meta: model, inputs_hash, metric, method, version and anything else JSON-able.
    """

    kind: str
    scores: torch.Tensor
    axes: tuple[str, ...]
    labels: dict[str, list] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores).detach().float().cpu()
        self.axes = tuple(self.axes)
        if self.scores.ndim != len(self.axes):
            raise ResultError(f"Result scores have {self.scores.ndim} dims but {len(self.axes)} axes {self.axes}.")
        for k, v in list(self.extra.items()):
            v = torch.as_tensor(v).detach().float().cpu()
            if v.shape != self.scores.shape:
                raise ResultError(f"extra[{k!r}] has shape {tuple(v.shape)}, scores {tuple(self.scores.shape)}.")
            self.extra[k] = v
        for ax, lab in self.labels.items():
            if ax not in self.axes:
                raise ResultError(f"labels for unknown axis {ax!r}; axes are {self.axes}.")
            n = self.scores.shape[self.axes.index(ax)]
            if len(lab) != n:
                raise ResultError(f"{len(lab)} labels for axis {ax!r} of length {n}.")
            self.labels[ax] = list(lab)
        from . import __version__

        self.meta.setdefault("version", __version__)

    # -- access ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.scores.shape)

    def label(self, axis: str, i: int) -> Any:
        lab = self.labels.get(axis)
        return lab[i] if lab is not None else i

    def top(self, k: int = 10, *, by: str = "abs", largest: bool = True) -> list[dict]:
        """The ``k`` highest-scoring cells, as dicts ``{axis: index, ..., "score": value}``.

        ``by="abs"`` ranks by magnitude, ``"value"`` by signed value (``largest`` picks the end).
        """
        n = self.scores.numel()
        if n == 0:
            raise ResultError("This result is empty; nothing to rank.")
        if not 0 <= k <= n:
            raise ResultError(f"top({k}) asked for more cells than the result has ({n}).")
        flat = self.scores.flatten()
        key = flat.abs() if by == "abs" else flat
        finite = torch.where(torch.isfinite(key), key, torch.tensor(float("-inf") if largest else float("inf")))
        idx = torch.topk(finite, k, largest=largest).indices
        out = []
        for i in idx.tolist():
            coords = torch.unravel_index(torch.tensor(i), self.scores.shape)
            row = {ax: int(c) for ax, c in zip(self.axes, coords)}
            for ax in self.axes:
                if ax in self.labels:
                    row[f"{ax}_label"] = self.labels[ax][row[ax]]
            row["score"] = float(flat[i])
            out.append(row)
        return out

    def to_dataframe(self):
        """Long-form ``pandas.DataFrame``: one row per cell, one column per axis, score, extras."""
        import pandas as pd

        grids = torch.meshgrid(*[torch.arange(n) for n in self.scores.shape], indexing="ij")
        cols: dict[str, Any] = {}
        for ax, g in zip(self.axes, grids):
            cols[ax] = g.flatten().numpy()
            if ax in self.labels:
                cols[f"{ax}_label"] = [self.labels[ax][i] for i in g.flatten().tolist()]
        cols["score"] = self.scores.flatten().numpy()
        for k, v in self.extra.items():
            cols[k] = v.flatten().numpy()
        return pd.DataFrame(cols)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``PATH.safetensors`` + ``PATH.json``; returns the safetensors path."""
        from safetensors.torch import save_file

        p = Path(path)
        p = p.with_suffix(".safetensors") if p.suffix in ("", ".json", ".safetensors") else Path(str(p) + ".safetensors")
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file({"scores": self.scores.contiguous(), **{f"extra.{k}": v.contiguous() for k, v in self.extra.items()}},
                  str(p))
        p.with_suffix(".json").write_text(json.dumps({"kind": self.kind, "axes": list(self.axes),
                                                      "labels": self.labels, "meta": self.meta},
                                                     indent=1, default=str))
        return p

    @classmethod
    def load(cls, path: str | Path, *, model=None) -> "Result":
        """Load a saved result; with ``model``, check it was computed on that model."""
        from safetensors.torch import load_file

        p = Path(path).with_suffix(".safetensors")
        if not p.exists():
            raise ResultError(f"No saved result at {p}.")
        t = load_file(str(p))
        info = json.loads(p.with_suffix(".json").read_text())
        res = cls(info["kind"], t.pop("scores"), tuple(info["axes"]), info.get("labels", {}),
                  {k[6:]: v for k, v in t.items() if k.startswith("extra.")}, info.get("meta", {}))
        if model is not None and res.meta.get("model") not in (None, model.name):
            raise ResultError(f"{p} was computed on {res.meta.get('model')!r}, not {model.name!r}; "
                              "recompute it for this model.")
        return res

    # -- display -------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"Result(kind={self.kind!r}, axes={self.axes}, shape={self.shape}, "
                f"method={self.meta.get('method')!r}, metric={self.meta.get('metric')!r})")

    def _repr_html_(self) -> str:
        """Notebook view: a heatmap when plotly is available, plus the top cells."""
        parts = [f"<b>{html.escape(repr(self))}</b>"]
        try:
            from .viz import notebook_html, plot

            parts.append(notebook_html(plot(self)))  # plotly.js embedded (offline-safe), once per session
        except Exception:  # plotting is a convenience here; the table always renders
            pass
        if self.scores.numel():
            import pandas as pd

            parts.append(pd.DataFrame(self.top(min(10, self.scores.numel()))).to_html(index=False))
        return "\n".join(parts)


def stack_results(results: Sequence[Result], axis: str, labels: Sequence[Any], kind: str | None = None) -> Result:
    """Stack same-shaped results along a new leading axis (e.g. one per emotion)."""
    if not results:
        raise ResultError("Nothing to stack.")
    r0 = results[0]
    return Result(kind or r0.kind, torch.stack([r.scores for r in results]), (axis,) + r0.axes,
                  {axis: list(labels), **r0.labels},
                  {k: torch.stack([r.extra[k] for r in results]) for k in r0.extra}, dict(r0.meta))
