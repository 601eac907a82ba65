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


FORMAT = "emolens.Result"


def _tensor_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix(".safetensors") if p.suffix in ("", ".json", ".safetensors") else Path(str(p) + ".safetensors")


def saved_path(path: str | Path, what: str) -> Path:
    """``NAME.safetensors`` for ``NAME``, ``NAME.json`` or ``NAME.safetensors``; other existing files are refused."""
    p = Path(path)
    if p.suffix not in ("", ".safetensors", ".json") and p.is_file():
        raise ResultError(f"{p} is a {p.suffix or 'suffix-less'} file, not saved {what} (NAME.safetensors + NAME.json"
                          + ("; a llama.cpp .gguf goes through EmotionVectors.from_gguf" if what == "emotion vectors"
                             else "") + "); pass the .safetensors path.")
    return p.with_suffix(".safetensors") if p.suffix in ("", ".json", ".safetensors") else Path(str(p) + ".safetensors")


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; :class:`ResultError` naming the file if it is corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError / OSError on truncated files
        raise ResultError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]}): it is "
                          "truncated or corrupt. Delete it (and its .json) and recompute it.") from None


def read_json(path: str | Path, *, required: bool = True) -> dict:
    """A JSON object from ``path``; :class:`ResultError` naming the file when missing or corrupt."""
    path = Path(path)
    if not path.exists():
        if required:
            raise ResultError(f"{path} is missing (saved files come as NAME.safetensors + NAME.json); copy it along "
                              "or recompute the result.")
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultError(f"{path} is not valid JSON ({e}): it is truncated or corrupt. Delete it and recompute "
                          "it.") from None
    if not isinstance(obj, dict):
        raise ResultError(f"{path} holds a JSON {type(obj).__name__}, not an object; pass a file written by emolens.")
    return obj


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
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ResultError(f"top({k!r}): k must be a non-negative integer (the number of cells to list), e.g. "
                              "top(10).")
        if k > n:
            raise ResultError(f"top({k}) asked for more cells than the result has ({n}); pass k <= {n}.")
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
        """Write ``PATH.safetensors`` + ``PATH.json`` atomically; returns the safetensors path.

        Both carry ``format: emolens.Result``; ``meta`` (model name and fingerprint, inputs hash, ...)
        goes into the JSON and the safetensors header.
        """
        from .io import write_json, write_safetensors

        p = _tensor_path(path)
        meta = {"format": FORMAT, **{k: str(self.meta[k]) for k in ("model", "model_fingerprint") if k in self.meta}}
        write_safetensors(p, {"scores": self.scores, **{f"extra.{k}": v for k, v in self.extra.items()}}, meta)
        write_json(p.with_suffix(".json"), {"format": FORMAT, "kind": self.kind, "axes": list(self.axes),
                                            "labels": self.labels, "meta": self.meta})
        return p

    @classmethod
    def load(cls, path: str | Path, *, model=None) -> "Result":
        """Load a saved result; with ``model``, refuse one computed on another model (fingerprint, else name)."""
        from .model import check_model_meta

        p = saved_path(path, "results")
        if not p.exists():
            raise ResultError(f"No saved result at {p}; check the path (Result.save writes NAME.safetensors + "
                              "NAME.json).")
        t, header = read_safetensors(p)
        info = read_json(p.with_suffix(".json"))
        fmt = info.get("format") or header.get("format")
        if fmt == "emolens.EmotionVectors" or (fmt is None and "emotions" in info):
            raise ResultError(f"{p} holds emotion vectors, not a Result; load it with "
                              "emolens.EmotionVectors.load(...).")
        if "kind" not in info or "axes" not in info or "scores" not in t:
            raise ResultError(f"{p} is not a saved emolens Result (format {fmt!r}, no kind/axes/scores); pass a file "
                              "written by Result.save.")
        res = cls(info["kind"], t.pop("scores"), tuple(info["axes"]), info.get("labels", {}),
                  {k[6:]: v for k, v in t.items() if k.startswith("extra.")}, info.get("meta", {}))
        if model is not None:
            check_model_meta(res.meta, model, str(p), name_mismatch="error")
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
