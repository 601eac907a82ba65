"""Global circuit assembly (paper 2, step 7).

Per emotion, a fixed budget of components is split between MLP neurons and attention heads
(0.7 : 0.3), and each kind's share is allocated across layers in proportion to the sublayer
influence of step 6, with a minimum quota per layer and a per-layer cap::

    K_total = budget_per_sublayer * (2 * n_layers)          (paper: 10 * 56 = 560)
    K_mlp   = round(K_total * mlp_ratio), K_attn = K_total - K_mlp        (392 / 168)
    w[l]    = max(I[l, p], 0); w_norm = w / sum_l w   (uniform when the sum is ~0)
    min quota per layer: 4 neurons, 2 heads (fallback when K_kind < L * min: 1 if K_kind >= L else 0)
    R       = K_kind - L * min;  k_add = floor(w_norm * R) capped at floor(cap_ratio * K_kind)
    remaining units by largest fractional part (respecting the cap);  k = min + k_add
    clip to availability (heads <= n_heads, neurons <= d_mlp); the deficit goes to the layers
    with the largest planned k that still have room

Then the top-k neurons of each layer by ``C_mean`` and the top-k heads by ``mean_importance``.
A :class:`Circuit` saves as JSON (the paper's layout plus the model's dimensions) and refuses to
load onto a model with other dimensions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError, ResultError
from ..results import Result
from ..sites import Site, head, neuron

__all__ = ["allocate", "Circuit", "assemble_circuit", "circuit_overlap"]

DIMS = ("n_layers", "n_heads", "d_head", "d_mlp", "d_model")


def _alloc_kind(w: Sequence[float], K: int, min_per_layer: int, cap_ratio: float, avail: int) -> tuple[list[int], int]:
    """Allocate ``K`` units over layers for one kind; returns ``(k per layer, effective min quota)``."""
    L = len(w)
    if K < 0:
        raise InputError(f"Budget {K} is negative.")
    if K > L * avail:
        raise InputError(f"Budget {K} exceeds the {L * avail} components available ({L} layers x {avail}); "
                         "lower the budget.")
    m = min_per_layer
    if K < L * m:
        m = 1 if K >= L else 0
    m = min(m, avail)
    R = K - L * m
    ws = [max(float(x), 0.0) if math.isfinite(float(x)) else 0.0 for x in w]
    tot = sum(ws)
    wn = [x / tot for x in ws] if tot > 1e-12 else [1.0 / L] * L
    cap = math.floor(cap_ratio * K)
    raw = [x * R for x in wn]
    add = [min(math.floor(r), cap) for r in raw]
    left = R - sum(add)
    frac_order = sorted(range(L), key=lambda i: (-(raw[i] - math.floor(raw[i])), i))
    while left > 0:
        progressed = False
        for i in frac_order:
            if left == 0:
                break
            if add[i] < cap:
                add[i] += 1
                left -= 1
                progressed = True
        if not progressed:  # every layer at the cap: ignore the cap for the rest (cannot place otherwise)
            for i in frac_order:
                if left == 0:
                    break
                add[i] += 1
                left -= 1
    k = [m + a for a in add]
    # clip to availability; refill the deficit into the layers with the largest planned k
    deficit = sum(max(0, x - avail) for x in k)
    k = [min(x, avail) for x in k]
    while deficit > 0:
        room = sorted([i for i in range(L) if k[i] < avail], key=lambda i: (-k[i], i))
        if not room:
            break
        for i in room:
            if deficit == 0:
                break
            k[i] += 1
            deficit -= 1
    return k, m


def allocate(importance: torch.Tensor, *, n_heads: int, d_mlp: int, budget_per_sublayer: float = 10.0,
             mlp_ratio: float = 0.7, min_neurons: int = 4, min_heads: int = 2, cap_ratio: float = 0.4,
             budget_total: int | None = None) -> dict:
    """Split the budget over layers and kinds from the ``[layer, 2]`` (attn, mlp) influence.

    Returns:
        dict with ``k_mlp``, ``k_attn`` (lists per layer), ``K_total``, ``K_mlp``, ``K_attn``,
        ``min_mlp``, ``min_attn`` (effective quotas), ``cap_mlp``, ``cap_attn``.
    """
    imp = torch.as_tensor(importance, dtype=torch.float64)
    if imp.ndim != 2 or imp.shape[1] != 2:
        raise InputError(f"importance must be [n_layers, 2] (attn, mlp), got {tuple(imp.shape)}.")
    L = imp.shape[0]
    if not 0 <= mlp_ratio <= 1:
        raise InputError(f"mlp_ratio must lie in [0, 1], got {mlp_ratio}.")
    if not 0 < cap_ratio <= 1:
        raise InputError(f"cap_ratio must lie in (0, 1], got {cap_ratio}.")
    K = int(budget_total) if budget_total is not None else int(round(budget_per_sublayer * 2 * L))
    K_mlp = int(round(K * mlp_ratio))
    K_attn = K - K_mlp
    k_mlp, m_mlp = _alloc_kind(imp[:, 1].tolist(), K_mlp, min_neurons, cap_ratio, d_mlp)
    k_attn, m_attn = _alloc_kind(imp[:, 0].tolist(), K_attn, min_heads, cap_ratio, n_heads)
    return {"k_mlp": k_mlp, "k_attn": k_attn, "K_total": K, "K_mlp": K_mlp, "K_attn": K_attn, "min_mlp": m_mlp,
            "min_attn": m_attn, "cap_mlp": math.floor(cap_ratio * K_mlp), "cap_attn": math.floor(cap_ratio * K_attn)}


@dataclass
class Circuit:
    """One emotion's global circuit: neurons and heads per layer.

    Attributes:
        emotion: the emotion.
        model: the model's name and dimensions (``n_layers``, ``n_heads``, ``d_head``, ``d_mlp``, ``d_model``).
        neurons: ``{layer: [neuron indices]}`` (ranked, best first).
        heads: ``{layer: [head indices]}`` (query heads, ranked).
        alloc: the allocation record (:func:`allocate` output and the influence weights).
    """

    emotion: str
    model: dict
    neurons: dict[int, list[int]]
    heads: dict[int, list[int]]
    alloc: dict = field(default_factory=dict)

    @property
    def n_neurons(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    @property
    def n_heads(self) -> int:
        return sum(len(v) for v in self.heads.values())

    def check(self, model) -> "Circuit":
        """Raise :class:`ResultError` if the circuit was built for a model with other dimensions."""
        bad = [(k, self.model.get(k), getattr(model, k)) for k in DIMS if self.model.get(k) != getattr(model, k)]
        if bad:
            desc = ", ".join(f"{k}={a} (model has {b})" for k, a, b in bad)
            raise ResultError(f"The {self.emotion} circuit was built for {self.model.get('name')!r} ({desc}); it "
                              f"cannot be applied to {model.name!r}. Rebuild the circuit for this model "
                              "(emolens circuit --model ...).")
        for l, idx in list(self.neurons.items()) + list(self.heads.items()):
            if not 0 <= int(l) < model.n_layers:
                raise ResultError(f"Circuit layer {l} out of range for {model.name}.")
        return self

    def sites(self) -> list[Site]:
        out = [neuron(l, idx) for l, idx in sorted(self.neurons.items()) if idx]
        out += [head(l, idx) for l, idx in sorted(self.heads.items()) if idx]
        return out

    def allocation(self) -> Result:
        """Counts per layer: Result kind ``"sublayers"`` ``[layer, sublayer]`` (attn heads, mlp neurons)."""
        L = self.model["n_layers"]
        c = torch.zeros(L, 2)
        for l, idx in self.heads.items():
            c[int(l), 0] = len(idx)
        for l, idx in self.neurons.items():
            c[int(l), 1] = len(idx)
        return Result("sublayers", c, ("layer", "sublayer"), {"sublayer": ["attn heads", "mlp neurons"]}, {},
                      {"model": self.model.get("name"), "metric": "components",
                       "method": "global circuit (paper 2 step 7)", "emotion": self.emotion})

    def to_dict(self) -> dict:
        L = self.model["n_layers"]
        layers = [{"layer": l, "mlp": {"k": len(self.neurons.get(l, [])), "neurons": list(self.neurons.get(l, []))},
                   "attention": {"k": len(self.heads.get(l, [])), "heads": list(self.heads.get(l, []))}}
                  for l in range(L)]
        return {"format": "emolens.circuit/1", "emotion": self.emotion, "model": self.model,
                "K_total": self.alloc.get("K_total", self.n_neurons + self.n_heads),
                "K_alloc": {"mlp": self.alloc.get("K_mlp", self.n_neurons),
                            "attention": self.alloc.get("K_attn", self.n_heads)},
                "min_per_layer": {"mlp": self.alloc.get("min_mlp"), "attention": self.alloc.get("min_attn")},
                "cap_ratio": self.alloc.get("cap_ratio"),
                "summary": {"neurons": self.n_neurons, "heads": self.n_heads},
                "alloc": self.alloc, "layers": layers}

    @classmethod
    def from_dict(cls, d: dict) -> "Circuit":
        try:
            neurons = {int(r["layer"]): [int(i) for i in r["mlp"]["neurons"]] for r in d["layers"]}
            heads = {int(r["layer"]): [int(i) for i in r["attention"]["heads"]] for r in d["layers"]}
            model = dict(d["model"])
            emotion = d["emotion"]
        except (KeyError, TypeError, ValueError) as e:
            raise ResultError(f"Not an emolens circuit file (missing or bad field: {e}); write it with "
                              "Circuit.save().") from None
        missing = [k for k in DIMS if k not in model]
        if missing:
            raise ResultError(f"The circuit file lacks the model dimensions {missing}; rebuild it with Circuit.save().")
        return cls(emotion, model, {l: v for l, v in neurons.items() if v}, {l: v for l, v in heads.items() if v},
                   d.get("alloc", {}))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1))
        return p

    @classmethod
    def load(cls, path: str | Path, model=None) -> "Circuit":
        """Load a circuit JSON; with ``model``, check its dimensions (width mismatch -> ResultError)."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except OSError as e:
            raise ResultError(f"Cannot read circuit file {p} ({e}).") from None
        except json.JSONDecodeError as e:
            raise ResultError(f"{p} is not JSON ({e.msg}); pass a circuit file written by Circuit.save().") from None
        c = cls.from_dict(d)
        if model is not None:
            c.check(model)
        return c


def _ranked(scores: torch.Tensor, k: int) -> list[int]:
    if k <= 0:
        return []
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    return torch.topk(s, k).indices.tolist()


def assemble_circuit(model, emotion: str, influence: Result, neuron_scores: Result, head_scores: Result, *,
                     budget_per_sublayer: float = 10.0, mlp_ratio: float = 0.7, min_neurons: int = 4,
                     min_heads: int = 2, cap_ratio: float = 0.4, budget_total: int | None = None) -> Circuit:
    """Assemble one emotion's global circuit (step 7).

    Args:
        influence: step-6 result ``[layer, 2]`` (attn, mlp) of this emotion.
        neuron_scores: step-4a ``[layer, d_mlp]`` (``C_mean``); head_scores: step-4b ``[layer, n_heads]``.
        budget_per_sublayer, mlp_ratio, min_neurons, min_heads, cap_ratio: paper defaults 10, 0.7, 4, 2, 0.4.
        budget_total: overrides ``budget_per_sublayer * 2L``.
    """
    L = model.n_layers
    if tuple(influence.scores.shape) != (L, 2):
        raise ResultError(f"influence has shape {tuple(influence.scores.shape)}, expected [{L}, 2].")
    if tuple(neuron_scores.scores.shape) != (L, model.d_mlp):
        raise ResultError(f"neuron scores have shape {tuple(neuron_scores.scores.shape)}, expected "
                          f"[{L}, {model.d_mlp}] for {model.name}.")
    if tuple(head_scores.scores.shape) != (L, model.n_heads):
        raise ResultError(f"head scores have shape {tuple(head_scores.scores.shape)}, expected [{L}, {model.n_heads}] "
                          f"for {model.name}.")
    a = allocate(influence.scores, n_heads=model.n_heads, d_mlp=model.d_mlp, budget_per_sublayer=budget_per_sublayer,
                 mlp_ratio=mlp_ratio, min_neurons=min_neurons, min_heads=min_heads, cap_ratio=cap_ratio,
                 budget_total=budget_total)
    a.update(cap_ratio=cap_ratio, budget_per_sublayer=budget_per_sublayer, mlp_ratio=mlp_ratio,
             weights_attn=influence.scores[:, 0].tolist(), weights_mlp=influence.scores[:, 1].tolist())
    neurons = {l: _ranked(neuron_scores.scores[l], a["k_mlp"][l]) for l in range(L)}
    heads = {l: _ranked(head_scores.scores[l], a["k_attn"][l]) for l in range(L)}
    info = {"name": model.name, **{k: getattr(model, k) for k in DIMS}}
    return Circuit(emotion, info, {l: v for l, v in neurons.items() if v}, {l: v for l, v in heads.items() if v}, a)


def circuit_overlap(circuits: Sequence[Circuit]) -> tuple[Result, Result]:
    """Pairwise Jaccard overlap of the circuits' neuron sets and head sets.

    Best reading: the paper reports overlaps (neurons 0.056, heads 0.454) without naming the metric.

    Returns:
        ``(neurons, heads)``: kind ``"matrix"`` ``[emotion, emotion]``.
    """
    names = [c.emotion for c in circuits]
    sets_n = [{(l, i) for l, idx in c.neurons.items() for i in idx} for c in circuits]
    sets_h = [{(l, i) for l, idx in c.heads.items() for i in idx} for c in circuits]

    def jac(sets):
        m = torch.zeros(len(sets), len(sets))
        for i, a in enumerate(sets):
            for j, b in enumerate(sets):
                u = len(a | b)
                m[i, j] = len(a & b) / u if u else 1.0
        return m

    meta = {"metric": "Jaccard overlap", "method": "circuit overlap (paper 2)"}
    return (Result("matrix", jac(sets_n), ("row", "col"), {"row": names, "col": names}, {}, dict(meta, what="neurons")),
            Result("matrix", jac(sets_h), ("row", "col"), {"row": names, "col": names}, {}, dict(meta, what="heads")))
