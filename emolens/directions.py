"""Directions in activation space: emotion vectors from contrastive pairs, their quality, and files.

A *direction* here is one ``[d_model]`` vector per site (usually the residual stream at each
layer). :func:`emotion_vectors` reads the activations of the two sides of contrastive pairs
("I'm so glad you came" vs "I'm aware you came") through :func:`emolens.capture.capture` and
builds, per emotion and per site,

- ``method="mean_diff"`` (default; paper 1, CAA): ``mean_j a_j⁺ − mean_j a_j⁻``, unnormalised;
- ``method="pca"``: the first principal axis of the paired differences ``a_j⁺ − a_j⁻``
  (repeng's ``pca_diff`` when ``center=True``), oriented so that the positive side projects
  higher and scaled to the mean projection of the differences, so a PCA vector has the same
  units as a mean-difference vector and the same strengths apply.

:func:`separation` measures how well a vector separates held-out pairs (Cohen's d of the
projections, AUROC, paired accuracy). :class:`EmotionVectors` holds the vectors keyed by emotion
and TransformerLens hook name (SAELens style: ``"blocks.8.hook_resid_post"``), with per-site
activation statistics (median norm and RMS, used for relative steering strengths), and saves
them as safetensors + JSON or as a llama.cpp / repeng control-vector GGUF.

Layer convention of the GGUF control-vector format
--------------------------------------------------
llama.cpp adds tensor ``direction.N`` to the *output* of block ``N`` (0-based; ``build_cvec``
runs right after the FFN residual add of layer ``il``), i.e. to emolens's ``resid_post.N`` —
the same as ``resid_pre.(N+1)``. repeng uses the same convention (it reads
``hidden_states[N + 1]`` and adds to the output of ``model.layers[N]``). llama.cpp never applies
``direction.0`` (its loader rejects it), so :meth:`EmotionVectors.to_gguf` writes
``resid_post.N`` → ``direction.N`` and ``resid_pre.N`` → ``direction.(N-1)``, warns about
``direction.0``, and refuses ``resid_pre.0`` (the embedding output has no GGUF slot);
:meth:`EmotionVectors.from_gguf` reads ``direction.N`` back as ``resid_post.N``.

Example::

    from emolens.datasets import load_contrastive_pairs
    from emolens.directions import emotion_vectors
    pairs = load_contrastive_pairs(emotions=["joy", "trust"], split="train")
    vecs = emotion_vectors(m, pairs, layers=range(m.n_layers))
    vecs.get("joy", "resid_post.8")          # [d_model]
    vecs.to_gguf("joy.gguf", "joy")          # for llama.cpp --control-vector-scaled joy.gguf:1.0
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from jaxtyping import Float

from .errors import InputError, InterventionError, ResultError, SiteError
from .results import Result, inputs_hash
from .sites import Pos, Site, as_sites

__all__ = ["Pair", "read_pairs", "pair_activations", "mean_difference", "pca_direction", "direction",
           "auroc", "separation", "emotion_vectors", "EmotionVectors", "METHODS", "TOKEN_REDUCTIONS"]

METHODS = ("mean_diff", "pca")
TOKEN_REDUCTIONS = ("last", "mean")
VECTORS_FORMAT = "emolens.EmotionVectors"


# =========================================================================================
# Pairs
# =========================================================================================
@dataclass(frozen=True)
class Pair:
    """One contrastive pair: the same content with (``positive``) and without (``negative``) the emotion."""

    positive: str
    negative: str
    emotion: str = "target"
    id: str = ""


def read_pairs(pairs: Any, *, emotion: str | None = None) -> list[Pair]:
    """Normalise pairs to :class:`Pair` and check them.

    Args:
        pairs: a ``datasets.Dataset`` or a sequence of dicts with ``positive``/``negative`` (and
            optionally ``emotion``, ``id``), of ``(positive, negative)`` tuples, or of :class:`Pair`.
        emotion: label for pairs that carry none (default ``"target"``).

    Raises:
        InputError: no pairs, or a pair with a missing / empty / non-string side (named by id or index).
    """
    if pairs is None:
        raise InputError("No pairs given; pass contrastive pairs, e.g. "
                         "emolens.datasets.load_contrastive_pairs(emotions=['joy'], split='train').")
    rows = list(pairs)
    if not rows:
        raise InputError("The pair list is empty; pass at least one (positive, negative) pair per emotion.")
    out: list[Pair] = []
    for i, r in enumerate(rows):
        if isinstance(r, Pair):
            p = r
        elif isinstance(r, Mapping):
            name = r.get("id") or f"#{i}"
            missing = [k for k in ("positive", "negative") if not isinstance(r.get(k), str) or not r.get(k).strip()]
            if missing:
                raise InputError(f"Pair {name} has no {' and no '.join(missing)} text; every pair needs a non-empty "
                                 "'positive' (with the emotion) and 'negative' (without it). Fix or drop that pair.")
            p = Pair(r["positive"], r["negative"], str(r.get("emotion") or emotion or "target"), str(r.get("id") or f"#{i}"))
        elif isinstance(r, (tuple, list)) and len(r) == 2:
            p = Pair(r[0], r[1], emotion or "target", f"#{i}")
        else:
            raise InputError(f"Pair #{i} is a {type(r).__name__}; pass dicts with 'positive' and 'negative', "
                             "(positive, negative) tuples, or emolens.directions.Pair objects.")
        for side in ("positive", "negative"):
            t = getattr(p, side)
            if not isinstance(t, str) or not t.strip():
                raise InputError(f"Pair {p.id or '#' + str(i)} has an empty or missing {side} side; every pair needs "
                                 "two non-empty texts. Fix or drop that pair.")
        out.append(p)
    return out


def _pos_rule(token_reduce: str) -> tuple[Pos, str]:
    if token_reduce == "last":
        return Pos.last(), "none"
    if token_reduce == "mean":
        # skip the first real token (BOS / <|im_start|>): its huge norm would dominate a mean
        return Pos.slice(1, None), "group_mean"
    raise InputError(f"Unknown token_reduce={token_reduce!r}; use one of {', '.join(TOKEN_REDUCTIONS)}.")


def pair_activations(model, pairs: Any, sites: "Site | str | Sequence[Site | str]", *, token_reduce: str = "last",
                     chat: bool | None = False, system: str | None = None, batch_size: int = 32,
                     progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[Pair]]:
    """Activations of both sides of every pair at ``sites``.

    Args:
        model: an :class:`~emolens.model.EmoModel`.
        pairs: see :func:`read_pairs`.
        sites: sites to read (e.g. ``[resid(L) for L in range(n_layers)]``).
        token_reduce: ``"last"`` (the exemplar's last token, CAA-style; default) or ``"mean"``
            (mean over its tokens, first token excluded).
        chat: ``False`` (default) reads the raw sentence with BOS; ``True`` wraps it as a user message.

    Returns:
        ``(pos, neg, pairs)``: ``pos[str(site)]`` and ``neg[str(site)]`` are ``[n_pairs, d]`` float32.
    """
    from .capture import capture

    plist = read_pairs(pairs)
    site_list = as_sites(sites)
    rule, reduce = _pos_rule(token_reduce)
    texts = [p.positive for p in plist] + [p.negative for p in plist]
    kw: dict[str, Any] = dict(pos=rule, reduce=reduce, batch_size=batch_size, chat=chat, system=system,
                              progress=progress, desc="pair activations")
    if reduce == "group_mean":
        kw["groups"] = list(range(len(texts)))
    res = capture(model, texts, site_list, **kw)
    n = len(plist)
    pos = {str(s): res[s][:n].float() for s in site_list}
    neg = {str(s): res[s][n:].float() for s in site_list}
    return pos, neg, plist


# =========================================================================================
# Vectors from activations
# =========================================================================================
def _check_acts(pos: torch.Tensor, neg: torch.Tensor, what: str, paired: bool) -> None:
    if pos.ndim != 2 or neg.ndim != 2:
        raise InputError(f"{what} needs [n, d] activations; got {tuple(pos.shape)} and {tuple(neg.shape)}.")
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise InputError(f"{what} got no activations on one side; pass at least one pair.")
    if pos.shape[1] != neg.shape[1]:
        raise InputError(f"{what}: positive width {pos.shape[1]} != negative width {neg.shape[1]}.")
    if paired and pos.shape[0] != neg.shape[0]:
        raise InputError(f"{what} is paired but has {pos.shape[0]} positive and {neg.shape[0]} negative rows.")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise InputError(f"{what}: the activations contain NaN or inf; check the model's dtype (try float32).")


def mean_difference(pos: Float[torch.Tensor, "n d"], neg: Float[torch.Tensor, "m d"]) -> Float[torch.Tensor, "d"]:
    """``mean(pos) − mean(neg)`` over rows (float64 accumulation), as float32 ``[d]``."""
    _check_acts(pos, neg, "mean_difference", paired=False)
    return (pos.double().mean(0) - neg.double().mean(0)).float()


def pca_direction(pos: Float[torch.Tensor, "n d"], neg: Float[torch.Tensor, "n d"], *, center: bool = False
                  ) -> Float[torch.Tensor, "d"]:
    """First principal axis of the paired differences ``pos[j] − neg[j]``.

    Args:
        pos, neg: paired activations (row j of each is one pair).
        center: subtract the mean difference before the SVD (repeng's ``pca_diff``, which then finds
            the main axis of *variation* between pairs). Default ``False``: the axis about the origin,
            which also captures the shift common to all pairs.

    Returns:
        ``[d]`` float32: the unit axis, oriented so most pairs project positive-side higher (repeng's
        rule) and scaled by the mean projection of the differences (same units as :func:`mean_difference`).
    """
    _check_acts(pos, neg, "pca_direction", paired=True)
    d = (pos.double() - neg.double())
    x = d - d.mean(0, keepdim=True) if center else d
    if d.shape[0] < 2 and center:
        raise InputError("pca_direction(center=True) needs at least 2 pairs.")
    if not torch.any(x != 0):
        raise InputError("pca_direction: all paired differences are zero; the pairs do not differ at this site.")
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axis = vh[0]
    proj = d @ axis
    if (proj > 0).double().mean() < (proj < 0).double().mean() or ((proj > 0).sum() == (proj < 0).sum() and proj.sum() < 0):
        axis, proj = -axis, -proj
    return (axis * proj.mean()).float()


def direction(pos: torch.Tensor, neg: torch.Tensor, method: str = "mean_diff", **kw) -> torch.Tensor:
    """Dispatch to :func:`mean_difference` (``"mean_diff"``) or :func:`pca_direction` (``"pca"``)."""
    if method == "mean_diff":
        return mean_difference(pos, neg)
    if method == "pca":
        return pca_direction(pos, neg, **kw)
    raise InputError(f"Unknown method {method!r}; use one of {', '.join(METHODS)}.")


# =========================================================================================
# Quality
# =========================================================================================
def auroc(pos_scores: Any, neg_scores: Any) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count ½.

    Computed exactly from ranks (Mann–Whitney U / (n⁺ n⁻)).
    """
    a = torch.as_tensor(pos_scores, dtype=torch.float64).flatten()
    b = torch.as_tensor(neg_scores, dtype=torch.float64).flatten()
    if a.numel() == 0 or b.numel() == 0:
        raise InputError("auroc needs at least one positive and one negative score.")
    # pairwise comparison is exact and cheap at the sizes used here (held-out pairs)
    gt = (a[:, None] > b[None, :]).double().sum()
    eq = (a[:, None] == b[None, :]).double().sum()
    return float((gt + 0.5 * eq) / (a.numel() * b.numel()))


def separation(vector: Float[torch.Tensor, "d"], pos: Float[torch.Tensor, "n d"], neg: Float[torch.Tensor, "m d"]
               ) -> dict[str, float]:
    """How well ``vector`` separates positive from negative activations (e.g. held-out pairs).

    Projections are onto the unit vector ``v / ||v||``.

    Returns:
        dict with ``auroc``; ``cohens_d`` (difference of mean projections / pooled SD);
        ``proj_gap`` (difference of mean projections, activation units); ``pair_accuracy`` (share
        of rows where the positive side projects higher; NaN unless ``n == m``); ``n_pos``, ``n_neg``.
    """
    v = torch.as_tensor(vector, dtype=torch.float64).flatten()
    if v.shape[0] != pos.shape[-1]:
        raise InputError(f"separation: vector width {v.shape[0]} != activation width {pos.shape[-1]}.")
    if not torch.isfinite(v).all() or float(v.norm()) == 0.0:
        raise InputError("separation: the vector is zero or not finite.")
    _check_acts(pos, neg, "separation", paired=False)
    u = v / v.norm()
    pp, pn = pos.double() @ u, neg.double() @ u
    gap = float(pp.mean() - pn.mean())
    var = ((pp.var(unbiased=True) if pp.numel() > 1 else torch.tensor(0.0)) * max(pp.numel() - 1, 0)
           + (pn.var(unbiased=True) if pn.numel() > 1 else torch.tensor(0.0)) * max(pn.numel() - 1, 0))
    dof = pp.numel() + pn.numel() - 2
    sd = math.sqrt(float(var) / dof) if dof > 0 else float("nan")
    return {"auroc": auroc(pp, pn), "cohens_d": gap / sd if sd and sd > 0 else float("nan"), "proj_gap": gap,
            "pair_accuracy": float((pp > pn).double().mean()) if pp.numel() == pn.numel() else float("nan"),
            "n_pos": int(pp.numel()), "n_neg": int(pn.numel())}


# =========================================================================================
# Container
# =========================================================================================
def _key(site: "Site | str") -> str:
    return Site.parse(site).hook_name


def _check_vector(v: Any, what: str, width: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float32).cpu()
    if t.ndim != 1:
        raise InterventionError(f"{what} has shape {tuple(t.shape)}; an emotion vector is 1-D [d_model].")
    if width is not None and t.shape[0] != width:
        raise InterventionError(f"{what} has width {t.shape[0]} but this model needs d_model = {width}; "
                                "the vector was computed on another model.")
    if not torch.isfinite(t).all():
        raise InterventionError(f"{what} contains NaN or inf values; recompute it (a zero-norm normalisation "
                                "or a half-precision overflow are the usual causes).")
    return t.contiguous()


@dataclass
class EmotionVectors:
    """Emotion vectors keyed by emotion and hook name, plus per-site activation statistics.

    Attributes:
        vectors: ``{emotion: {hook_name: [d_model] float32}}``.
        stats: ``{hook_name: {"norm_median": ..., "rms_median": ...}}`` of the activations the
            vectors were built from (used by norm-relative steering strengths).
        quality: ``{emotion: {hook_name: separation dict}}`` on held-out pairs, when measured.
        meta: model name, model type (GGUF hint), d_model, method, token reduction, number of pairs,
            inputs hash.
    """

    vectors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    quality: dict[str, dict[str, dict]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        width = self.meta.get("d_model")
        clean: dict[str, dict[str, torch.Tensor]] = {}
        for e, per in self.vectors.items():
            clean[str(e)] = {}
            for k, v in per.items():
                key = _key(k)
                t = _check_vector(v, f"Vector {e!r} at {key}", width)
                width = width or t.shape[0]
                clean[str(e)][key] = t
        self.vectors = clean
        if width is not None:
            self.meta["d_model"] = int(width)

    # -- access -------------------------------------------------------------------------------
    @property
    def emotions(self) -> list[str]:
        return list(self.vectors)

    def sites(self, emotion: str | None = None) -> list[Site]:
        """Sites with a vector (for ``emotion``, or for any emotion), by layer then kind."""
        keys = set()
        for e, per in self.vectors.items():
            if emotion is None or e == emotion:
                keys |= set(per)
        return sorted((Site.parse(k) for k in keys), key=lambda s: (s.layer, s.kind))

    def layers(self, emotion: str | None = None, kind: str | None = None) -> list[int]:
        return sorted({s.layer for s in self.sites(emotion) if kind is None or s.kind == kind})

    def get(self, emotion: str, site: "Site | str") -> Float[torch.Tensor, "d_model"]:
        """The ``[d_model]`` vector of ``emotion`` at ``site``."""
        if emotion not in self.vectors:
            raise InputError(f"No vectors for emotion {emotion!r}; have {', '.join(self.vectors) or 'none'}.")
        key = _key(site)
        if key not in self.vectors[emotion]:
            have = ", ".join(str(s) for s in self.sites(emotion))
            raise SiteError(f"No {emotion!r} vector at {Site.parse(site)}; vectors exist at: {have}.")
        return self.vectors[emotion][key]

    def __getitem__(self, item: "str | tuple[str, Site | str]") -> Any:
        if isinstance(item, tuple):
            return self.get(*item)
        if item not in self.vectors:
            raise InputError(f"No vectors for emotion {item!r}; have {', '.join(self.vectors) or 'none'}.")
        return self.vectors[item]

    def __contains__(self, item) -> bool:
        if isinstance(item, tuple):
            e, s = item
            return e in self.vectors and _key(s) in self.vectors[e]
        return item in self.vectors

    def set(self, emotion: str, site: "Site | str", vector: Any) -> None:
        """Store a vector (checked for width and finiteness)."""
        key = _key(site)
        t = _check_vector(vector, f"Vector {emotion!r} at {key}", self.meta.get("d_model"))
        self.meta.setdefault("d_model", int(t.shape[0]))
        self.vectors.setdefault(emotion, {})[key] = t

    def check(self, model) -> "EmotionVectors":
        """Raise :class:`InterventionError` if any vector does not fit ``model`` (width, layer)."""
        for e, per in self.vectors.items():
            for key, v in per.items():
                Site.parse(key).validate(model)
                _check_vector(v, f"Vector {e!r} at {key}", model.d_model)
        return self

    def reference_norm(self, site: "Site | str") -> float:
        """Median activation norm at ``site`` (for norm-relative strengths)."""
        key = _key(site)
        st = self.stats.get(key)
        if not st or "norm_median" not in st:
            raise InputError(f"No activation statistics at {Site.parse(site)}; norm-relative strengths need vectors "
                             "built by emotion_vectors() (or stats={hook_name: {'norm_median': ...}}).")
        return float(st["norm_median"])

    # -- derived ------------------------------------------------------------------------------
    def combine(self, emotions: "Sequence[str] | Mapping[str, float]", name: str | None = None, *,
                mean: bool = True) -> "EmotionVectors":
        """Add a combined emotion (weighted sum, or mean when ``mean``) at the sites all parts share."""
        weights = dict(emotions) if isinstance(emotions, Mapping) else {e: 1.0 for e in emotions}
        if not weights:
            raise InputError("combine() needs at least one emotion.")
        for e in weights:
            self[e]
        common = set.intersection(*(set(self.vectors[e]) for e in weights))
        if not common:
            raise InputError(f"The emotions {list(weights)} share no site; build them at the same layers.")
        total = sum(weights.values()) if mean else 1.0
        name = name or "+".join(weights)
        self.vectors[name] = {k: sum(w * self.vectors[e][k] for e, w in weights.items()) / total for k in sorted(common)}
        return self

    def norms(self, kind: str = "resid_post") -> Result:
        """Vector norms as a ``layers`` result with axes ``(emotion, layer)`` (NaN where missing)."""
        layers = self.layers(kind=kind)
        if not layers:
            raise ResultError(f"No {kind} vectors to measure.")
        z = torch.full((len(self.emotions), len(layers)), float("nan"))
        for i, e in enumerate(self.emotions):
            for j, L in enumerate(layers):
                k = Site(kind, L).hook_name
                if k in self.vectors[e]:
                    z[i, j] = float(self.vectors[e][k].norm())
        return Result("layers", z, ("emotion", "layer"), {"emotion": self.emotions, "layer": layers},
                      meta={**self._result_meta(), "metric": "vector L2 norm", "name": "norm"})

    def cosine_by_layer(self, a: str, b: str, kind: str = "resid_post") -> Result:
        """Cosine similarity of two emotions' vectors at each layer (``layers`` result)."""
        layers = sorted(set(self.layers(a, kind)) & set(self.layers(b, kind)))
        if not layers:
            raise ResultError(f"{a!r} and {b!r} share no {kind} layer.")
        z = torch.tensor([float(torch.nn.functional.cosine_similarity(self.get(a, Site(kind, L)),
                                                                      self.get(b, Site(kind, L)), dim=0))
                          for L in layers])
        return Result("layers", z, ("layer",), {"layer": layers},
                      meta={**self._result_meta(), "metric": f"cosine({a}, {b})", "name": f"cos({a},{b})"})

    def cosine_matrix(self, site: "Site | str | None" = None, emotion: str | None = None) -> Result:
        """Cosine matrix: between emotions at one ``site``, or between layers of one ``emotion``."""
        if (site is None) == (emotion is None):
            raise InputError("cosine_matrix takes either site= (emotions × emotions) or emotion= (layers × layers).")
        if site is not None:
            labels = [e for e in self.emotions if _key(site) in self.vectors[e]]
            m = torch.stack([self.vectors[e][_key(site)] for e in labels])
            what = f"cosine between emotions at {Site.parse(site)}"
        else:
            sites = self.sites(emotion)
            labels = [str(s) for s in sites]
            m = torch.stack([self.get(emotion, s) for s in sites])
            what = f"cosine between layers of {emotion}"
        u = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return Result("matrix", u @ u.T, ("row", "col"), {"row": labels, "col": labels},
                      meta={**self._result_meta(), "metric": what})

    def _result_meta(self) -> dict:
        return {k: self.meta[k] for k in ("model", "model_fingerprint", "method", "inputs_hash") if k in self.meta}

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``PATH.safetensors`` (tensors ``"{emotion}/{hook_name}"``) and ``PATH.json`` atomically.

        Both carry ``format: emolens.EmotionVectors`` and the model name and fingerprint.
        """
        from .io import write_json, write_safetensors
        from .results import _tensor_path

        p = _tensor_path(path)
        for e in self.vectors:
            if "/" in e:
                raise InputError(f"Emotion name {e!r} contains '/'; rename it before saving.")
        tensors = {f"{e}/{k}": v for e, per in self.vectors.items() for k, v in per.items()}
        if not tensors:
            raise ResultError("No vectors to save.")
        header = {"format": VECTORS_FORMAT, **{k: str(self.meta[k]) for k in ("model", "model_fingerprint", "d_model")
                                                if k in self.meta}}
        write_safetensors(p, tensors, header)
        write_json(p.with_suffix(".json"), {"format": VECTORS_FORMAT, "emotions": self.emotions, "stats": self.stats,
                                            "quality": self.quality, "meta": self.meta})
        return p

    @classmethod
    def load(cls, path: str | Path, *, model=None) -> "EmotionVectors":
        """Load vectors saved by :meth:`save`.

        With ``model``: refuse vectors made on another model (:class:`ResultError`; decided by the
        stored fingerprint, or a warning on a name mismatch for files without one), then check
        widths and layers fit it.
        """
        from .model import check_model_meta
        from .results import read_json, read_safetensors, saved_path

        p = saved_path(path, "emotion vectors")
        if not p.exists():
            raise ResultError(f"No saved emotion vectors at {p}; check the path (EmotionVectors.save writes "
                              "NAME.safetensors + NAME.json; a .gguf goes through EmotionVectors.from_gguf).")
        t, header = read_safetensors(p)
        info = read_json(p.with_suffix(".json"), required=False)
        fmt = info.get("format") or header.get("format")
        if fmt == "emolens.Result" or (fmt is None and "kind" in info and "scores" in t):
            raise ResultError(f"{p} holds a Result (scores over model components), not emotion vectors; load it with "
                              "emolens.Result.load(...).")
        if fmt not in (None, VECTORS_FORMAT) or any("/" not in k for k in t):
            raise ResultError(f"{p} is not a saved EmotionVectors file (format {fmt!r}, tensors "
                              f"{sorted(t)[:3]}); pass a file written by EmotionVectors.save.")
        vectors: dict[str, dict[str, torch.Tensor]] = {e: {} for e in info.get("emotions", [])}
        for name, v in t.items():
            e, _, k = name.partition("/")
            vectors.setdefault(e, {})[k] = v
        meta = info.get("meta") or {k: v for k, v in header.items() if k in ("model", "model_fingerprint")}
        out = cls(vectors, info.get("stats", {}), info.get("quality", {}), meta)
        if model is not None:
            check_model_meta(out.meta, model, f"Emotion vectors {p}", name_mismatch="warn")
            out.check(model)
        return out

    # -- GGUF control vectors (llama.cpp / repeng) ----------------------------------------------
    def gguf_layers(self, emotion: str) -> dict[int, torch.Tensor]:
        """``{N: vector}`` for ``direction.N`` (see the module docstring for the layer mapping)."""
        out: dict[int, torch.Tensor] = {}
        for key, v in self[emotion].items():
            s = Site.parse(key)
            if s.kind == "resid_post":
                n = s.layer
            elif s.kind == "resid_pre":
                if s.layer == 0:
                    raise InputError(f"{emotion!r} has a vector at resid_pre.0 (the embedding output), which the "
                                     "llama.cpp control-vector format cannot express; drop it before exporting.")
                n = s.layer - 1
            else:
                raise InputError(f"{emotion!r} has a vector at {s}; GGUF control vectors hold residual-stream "
                                 "vectors only (resid_pre / resid_post).")
            if n in out:
                raise InputError(f"{emotion!r} has vectors at both resid_post.{n} and resid_pre.{n + 1}, which are "
                                 f"the same point (GGUF direction.{n}); keep one.")
            out[n] = v
        return dict(sorted(out.items()))

    def to_gguf(self, path: str | Path, emotion: str | None = None, *, model_hint: str | None = None,
                scale: float = 1.0) -> Path:
        """Write one emotion's vectors as a llama.cpp / repeng control-vector GGUF.

        The file has ``general.architecture = "controlvector"``, ``controlvector.model_hint``
        (default: the model type, e.g. ``"llama"``), ``controlvector.layer_count`` (uint32, number of
        directions, as repeng writes it) and one float32 ``[d_model]`` tensor ``direction.N`` per
        layer. ``scale`` multiplies the vectors (llama.cpp adds them as-is times its own scale).
        """
        import gguf
        import numpy as np

        if emotion is None:
            if len(self.vectors) != 1:
                raise InputError(f"Pass emotion=; this container holds {', '.join(self.vectors) or 'no emotions'}.")
            emotion = self.emotions[0]
        dirs = self.gguf_layers(emotion)
        if not dirs:
            raise ResultError(f"{emotion!r} has no vectors to export.")
        if 0 in dirs:
            warnings.warn("direction.0 (resid_post.0) is written, but llama.cpp never applies a control vector to "
                          "layer 0 (its loader rejects direction.0); repeng accepts it.", stacklevel=2)
        if not math.isfinite(scale):
            raise InputError(f"scale={scale} is not finite.")
        hint = model_hint or self.meta.get("model_type") or self.meta.get("model") or "unknown"
        from .io import atomic_path

        p = Path(path)
        with atomic_path(p) as tmp:  # a reader never sees half a file
            w = gguf.GGUFWriter(str(tmp), "controlvector")
            w.add_string("controlvector.model_hint", str(hint))
            w.add_uint32("controlvector.layer_count", len(dirs))
            for n, v in dirs.items():
                w.add_tensor(f"direction.{n}", (v.double() * scale).float().numpy().astype(np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        return p

    @classmethod
    def from_gguf(cls, path: str | Path, *, emotion: str = "control", model=None,
                  kind: str = "resid_post") -> "EmotionVectors":
        """Read a control-vector GGUF (llama.cpp ``cvector-generator``, repeng ``export_gguf``).

        ``direction.N`` becomes the vector at ``resid_post.N`` (or ``resid_pre.(N+1)`` with
        ``kind="resid_pre"``), under the emotion name ``emotion``. With ``model``, widths and
        layers are checked against it.
        """
        import gguf

        p = Path(path)
        if not p.exists():
            raise ResultError(f"No GGUF file at {p}.")
        try:
            reader = gguf.GGUFReader(str(p))
        except Exception as e:  # gguf raises ValueError / struct errors on foreign files
            raise ResultError(f"{p} is not a readable GGUF file ({e}).") from None

        def field_str(name: str) -> str | None:
            f = reader.get_field(name)
            return None if f is None or not len(f.parts) else bytes(f.parts[-1]).decode("utf-8", errors="replace")

        arch = field_str("general.architecture")
        if arch != "controlvector":
            raise ResultError(f"{p} has architecture {arch!r}, not 'controlvector'; it is not a control vector.")
        hint = field_str("controlvector.model_hint")
        if kind not in ("resid_post", "resid_pre"):
            raise InputError(f"kind={kind!r}; control vectors live at 'resid_post' (default) or 'resid_pre'.")
        per: dict[str, torch.Tensor] = {}
        for t in reader.tensors:
            if not t.name.startswith("direction."):
                continue
            try:
                n = int(t.name.split(".", 1)[1])
            except ValueError:
                raise ResultError(f"{p}: tensor {t.name!r} is not named direction.<layer>.") from None
            v = torch.tensor(t.data.astype("float32").reshape(-1).copy())
            site = Site("resid_post", n) if kind == "resid_post" else Site("resid_pre", n + 1)
            per[site.hook_name] = v
        if not per:
            raise ResultError(f"{p} holds no direction.<layer> tensors.")
        # the file's model_hint (e.g. "llama") is kept; it is all a GGUF control vector says about its model
        meta = {"model_type": hint, "model_hint": hint, "source": str(p), "format": "gguf-controlvector"}
        out = cls({emotion: per}, meta=meta)
        if model is not None:
            mtype = getattr(getattr(getattr(model, "hf_model", None), "config", None), "model_type", None)
            if hint and hint not in ("unknown", mtype, model.name):
                warnings.warn(f"{p} says it was made for model {hint!r}, but {model.name!r} is a {mtype!r} model; "
                              "the widths fit, yet vectors from another model steer nothing meaningful. Use vectors "
                              "made on this model.", stacklevel=2)
            out.check(model)
        return out

    def __repr__(self) -> str:
        return (f"EmotionVectors(emotions={self.emotions}, sites={len(self.sites())}, "
                f"method={self.meta.get('method')!r}, model={self.meta.get('model')!r})")


# =========================================================================================
# Building vectors from pairs
# =========================================================================================
def emotion_vectors(model, pairs: Any, *, layers: "int | Iterable[int] | None" = None, kind: str = "resid_post",
                    sites: "Sequence[Site | str] | None" = None, method: str = "mean_diff", center: bool = False,
                    token_reduce: str = "last", chat: bool | None = False, heldout: Any = None,
                    batch_size: int = 32, progress: bool = True, activations: tuple | None = None) -> EmotionVectors:
    """Emotion vectors from contrastive pairs, one per emotion and site.

    Args:
        model: an :class:`~emolens.model.EmoModel`.
        pairs: training pairs (see :func:`read_pairs`); grouped by their ``emotion`` field.
        layers: layers to build at (default: all); combined with ``kind`` into sites.
        kind: residual site kind (``"resid_post"`` default, ``"resid_pre"``, ``"resid_mid"``, ...).
        sites: explicit sites instead of ``layers``/``kind``.
        method: ``"mean_diff"`` (default) or ``"pca"`` (see :func:`pca_direction`; ``center``).
        token_reduce: read each exemplar at its ``"last"`` token (default) or ``"mean"`` over tokens.
        chat: read exemplars as raw text (``False``, default) or wrapped in the chat template.
        heldout: optional held-out pairs; when given, :func:`separation` of each vector on them is
            stored in ``.quality`` (AUROC, Cohen's d, paired accuracy).
        activations: ``(pos, neg, pairs)`` from an earlier :func:`pair_activations` call on the same
            pairs and sites (e.g. to build mean-difference and PCA vectors from one capture).

    Returns:
        :class:`EmotionVectors` with ``stats`` (median activation norm and RMS per site over both sides).
    """
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}; use one of {', '.join(METHODS)}.")
    if sites is None:
        if layers is None:
            layers = range(model.n_layers)
        layers = [layers] if isinstance(layers, int) else list(layers)
        if not layers:
            raise InputError("layers is empty; pass at least one layer.")
        sites = [Site(kind, L) for L in layers]
    site_list = as_sites(sites)
    for s in site_list:
        s.validate(model)
        if s.kind in ("head", "neuron"):
            raise SiteError(f"emotion_vectors builds d_model vectors; {s} is not a residual/sublayer site.")
    if activations is None:
        activations = pair_activations(model, pairs, site_list, token_reduce=token_reduce, chat=chat,
                                       batch_size=batch_size, progress=progress)
    pos, neg, plist = activations
    missing = [str(s) for s in site_list if str(s) not in pos]
    if missing:
        raise InputError(f"The given activations lack site(s) {', '.join(missing)}; capture them with pair_activations().")
    emotions = list(dict.fromkeys(p.emotion for p in plist))
    idx = {e: torch.tensor([i for i, p in enumerate(plist) if p.emotion == e]) for e in emotions}
    vectors: dict[str, dict[str, torch.Tensor]] = {e: {} for e in emotions}
    stats: dict[str, dict[str, float]] = {}
    for s in site_list:
        k = str(s)
        both = torch.cat([pos[k], neg[k]])
        stats[s.hook_name] = {"norm_median": float(both.norm(dim=-1).median()),
                              "rms_median": float(both.pow(2).mean(-1).sqrt().median())}
        for e in emotions:
            vectors[e][s.hook_name] = direction(pos[k][idx[e]], neg[k][idx[e]], method,
                                                **({"center": center} if method == "pca" else {}))
    meta = {**model.meta(), "model_type": getattr(model.hf_model.config, "model_type", None),
            "d_model": model.d_model, "method": method, "center": center if method == "pca" else None,
            "token_reduce": token_reduce, "chat": chat,
            "n_pairs": {e: int(idx[e].numel()) for e in emotions},
            "inputs_hash": inputs_hash([(p.positive, p.negative, p.emotion) for p in plist])}
    out = EmotionVectors(vectors, stats, {}, meta)
    if heldout is not None:
        evaluate_vectors(model, out, heldout, token_reduce=token_reduce, chat=chat, batch_size=batch_size,
                         progress=progress)
    return out


def evaluate_vectors(model, vectors: EmotionVectors, pairs: Any, *, token_reduce: str | None = None,
                     chat: bool | None = None, batch_size: int = 32, progress: bool = True):
    """Separation of every vector on (held-out) pairs of its emotion; stored in ``vectors.quality``.

    Returns:
        a pandas DataFrame with one row per (emotion, site): ``auroc``, ``cohens_d``, ``proj_gap``,
        ``pair_accuracy``, ``n_pos``, ``n_neg``.
    """
    import pandas as pd

    token_reduce = token_reduce or vectors.meta.get("token_reduce", "last")
    chat = vectors.meta.get("chat", False) if chat is None else chat
    plist = read_pairs(pairs)
    known = [p for p in plist if p.emotion in vectors.vectors]
    if not known:
        raise InputError(f"None of the evaluation pairs is for an emotion with vectors "
                         f"({', '.join(vectors.emotions)}); pass held-out pairs of those emotions.")
    sites = vectors.sites()
    pos, neg, _ = pair_activations(model, known, sites, token_reduce=token_reduce, chat=chat,
                                   batch_size=batch_size, progress=progress)
    rows = []
    for e in dict.fromkeys(p.emotion for p in known):
        idx = torch.tensor([i for i, p in enumerate(known) if p.emotion == e])
        for s in vectors.sites(e):
            q = separation(vectors.get(e, s), pos[str(s)][idx], neg[str(s)][idx])
            vectors.quality.setdefault(e, {})[s.hook_name] = q
            rows.append({"emotion": e, "site": str(s), "layer": s.layer, **q})
    return pd.DataFrame(rows)
