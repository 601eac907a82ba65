"""Context-agnostic emotion directions (paper 2, step 2) and the statistics pass behind them.

The recipe (per layer l, per sublayer p, at t*): for every context group g = (skeleton, valence)
whose six emotion prompts were all accepted, subtract the group's mean over emotions, average the
remainders per emotion, remove the (mathematically zero) global mean and L2-normalise::

    mu_g  = mean_e h[g, e]            delta = h[g, e] - mu_g
    c_e   = mean_g delta[g, e]        cbar  = mean_e c_e
    v_e   = (c_e - cbar) / (||c_e - cbar|| + 1e-12)

Sublayer states: "attention" = ``resid_mid[l]`` (resid_pre + attention output), "MLP" =
``resid_post[l]``; for the last layer the MLP state is the *final-normed* residual (HF's
``hidden_states[-1]``), as in the paper's code (``final_norm=True``; best reading of its TL equivalent).

Best readings (spec §7): groups are (skeleton, valence) with all emotions accepted (the released
step-5 MLP dump keyed groups by skeleton only, a bug); the step-5 difference vectors use the same
groups and stay un-normalised, as the paper's modulation loads them; t* is the last token of the
templated prompt.

**Streaming.** With one prompt per (group, emotion), ``c_e = mean_g h[g, e] - mean_{g,e} h[g, e]``
over complete groups, so the directions need only one running float64 sum per emotion, layer and
sublayer: memory is O(emotions x layers x d_model), independent of the number of prompts.
:func:`collect_sev_stats` runs the P_emo prompts once and accumulates, in the same pass, everything
the later steps need: directions, the emotion difference vectors of step 5 (neuron activations and
``hook_z`` at t*), sigma (mean RMS of each sublayer state), neuron-score moments (step 4a) and
head-score moments (step 4b, for architectures where the closed form is linear).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from jaxtyping import Float, Int

from ..errors import InputError, ResultError
from ..interventions import HookPlan, Reader
from ..progress import progress_bar
from ..results import Result, inputs_hash
from ..sites import Pos, Site
from . import _model
from .prompts import PromptSet, check_emotions

__all__ = ["group_mean_directions", "EmotionSums", "SEVStats", "collect_sev_stats", "complete_groups",
           "emotion_directions", "difference_vectors", "direction_cosines", "SUBLAYERS"]

#: Sublayer names in results (index 0 = attention state resid_mid, 1 = MLP state resid_post).
SUBLAYERS = ("attn", "mlp")
EPS = 1e-12


def group_mean_directions(acts: Float[torch.Tensor, "group emotion *dims"], eps: float = EPS
                          ) -> tuple[Float[torch.Tensor, "emotion *dims"], Float[torch.Tensor, "emotion *dims"]]:
    """Dense reference of the recipe on a full ``[group, emotion, ...]`` tensor.

    Returns ``(unit directions, centred centroids c_e - cbar)``, both ``[emotion, *dims]``; the
    norm is taken over the last dim. Memory O(samples): for tests and small inputs; the pipeline
    streams (:class:`EmotionSums`).
    """
    if acts.ndim < 3:
        raise InputError(f"group_mean_directions needs [group, emotion, ..., d], got shape {tuple(acts.shape)}.")
    x = acts.double()
    mu = x.mean(1, keepdim=True)  # per-group mean over emotions (the shared context)
    delta = x - mu
    c = delta.mean(0)  # [E, ...]
    cbar = c.mean(0, keepdim=True)  # == 0 when every group has all emotions; kept for fidelity
    cc = c - cbar
    return (cc / (cc.norm(dim=-1, keepdim=True) + eps)).float(), cc.float()


class EmotionSums:
    """Running float64 sums per emotion (one row per emotion), for streaming means.

    ``add(emotion_index [B], values [B, *dims], weight [B])``; :meth:`mean` gives ``[E, *dims]``;
    :meth:`centred` the recipe's ``c_e - cbar``; :meth:`directions` the unit vectors.
    """

    def __init__(self, n_emotions: int):
        self.n = n_emotions
        self.sum: torch.Tensor | None = None
        self.count = torch.zeros(n_emotions, dtype=torch.float64)

    def add(self, e_idx: Int[torch.Tensor, "b"], values: Float[torch.Tensor, "b *dims"],
            weight: Float[torch.Tensor, "b"] | None = None) -> None:
        v = values.detach().to(torch.float64)
        w = torch.ones(v.shape[0], dtype=torch.float64, device=v.device) if weight is None else \
            weight.to(device=v.device, dtype=torch.float64)
        if self.sum is None:
            self.sum = torch.zeros((self.n,) + tuple(v.shape[1:]), dtype=torch.float64, device=v.device)
        self.sum.index_add_(0, e_idx.to(v.device), v * w.reshape((-1,) + (1,) * (v.ndim - 1)))
        self.count.index_add_(0, e_idx.cpu(), w.cpu())

    def mean(self) -> torch.Tensor:
        if self.sum is None or (self.count == 0).any():
            missing = [] if self.sum is None else (self.count == 0).nonzero().flatten().tolist()
            raise InputError("No samples for some emotions (indices "
                             f"{missing or 'all'}); every emotion needs at least one complete context group.")
        c = self.count.to(self.sum.device).reshape((-1,) + (1,) * (self.sum.ndim - 1))
        return (self.sum / c).cpu()

    def centred(self) -> torch.Tensor:
        """``c_e - cbar`` (equal to the group-mean-subtracted centroid when groups are complete)."""
        m = self.mean()
        c = m - m.mean(0, keepdim=True)
        return c - c.mean(0, keepdim=True)  # "remove global mean" (a no-op; kept for fidelity)

    def directions(self, eps: float = EPS) -> torch.Tensor:
        c = self.centred()
        return (c / (c.norm(dim=-1, keepdim=True) + eps)).float()

    def merge(self, other: "EmotionSums") -> "EmotionSums":
        if other.sum is not None:
            self.sum = other.sum.clone() if self.sum is None else self.sum + other.sum.to(self.sum.device)
        self.count = self.count + other.count
        return self


def complete_groups(keys: Sequence[tuple], accepted: Mapping[tuple, bool] | None,
                    emotions: Sequence[str]) -> set:
    """Groups ``(skeleton, valence)`` whose prompts for every emotion were accepted."""
    have: dict[tuple, set] = {}
    for k in keys:
        if accepted is None or accepted.get(tuple(k), False):
            have.setdefault((k[0], k[1]), set()).add(k[2])
    need = set(emotions)
    return {g for g, es in have.items() if need <= es}


@dataclass
class SEVStats:
    """Everything step 2 (and the streaming parts of steps 4a, 4b, 5, 6) needs, per emotion.

    Tensors are float64 sums (``[emotion, layer, ...]``) over two sample sets: ``complete`` (samples
    of complete context groups: directions, difference vectors, sigma) and ``all`` (every accepted
    sample of that emotion: neuron and head scores).

    Attributes:
        emotions: emotion names (row order of every tensor).
        sums: ``resid_mid``, ``resid_post`` ``[E, L, d_model]``; ``neuron`` ``[E, L, d_mlp]``; ``z``
            ``[E, L, n_heads*d_head]`` (complete set); ``a_all``, ``ar_all``, ``ar_pos``, ``ar_neg``
            ``[E, L, d_mlp]`` (activations, activations over the post-MLP norm scale, and their
            positive/negative parts; all set); ``z_all`` ``[E, L, n_heads*d_head]`` and optionally
            ``zz_all`` ``[E, L, n_heads, d_head, d_head]`` (all set); ``rms`` ``[L, 2]``.
        n_complete, n_all: samples per emotion in each set.
        pca: ``{layer: [n, d_model]}`` per-sample ``resid_post`` at t* for the PCA figure.
        pca_emotions: emotion of each PCA row.
    """

    emotions: tuple[str, ...]
    model: dict
    sums: dict[str, torch.Tensor]
    n_complete: torch.Tensor
    n_all: torch.Tensor
    final_norm: bool = True
    pca: dict[int, torch.Tensor] = field(default_factory=dict)
    pca_emotions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        return int(self.n_complete.min().item()) if self.n_complete.numel() else 0

    def mean(self, key: str, which: str = "complete") -> torch.Tensor:
        n = self.n_complete if which == "complete" else self.n_all
        if (n == 0).any():
            bad = [e for e, c in zip(self.emotions, n.tolist()) if c == 0]
            raise InputError(f"No {which} samples for emotion(s) {bad}: with acceptance filtering on, every "
                             "emotion needs complete context groups (all six emotions accepted). Lower the "
                             "filter (Paper2Config.accept_filter=False) or use a model that follows P_emo.")
        s = self.sums[key]
        return s / n.to(s.dtype).reshape((-1,) + (1,) * (s.ndim - 1))

    def centred(self, key: str) -> torch.Tensor:
        m = self.mean(key, "complete")
        c = m - m.mean(0, keepdim=True)
        return c - c.mean(0, keepdim=True)

    def save(self, path: str | Path) -> Path:
        """Write ``PATH.safetensors`` + ``PATH.json`` atomically (temp file, fsync, rename)."""
        from ..io import write_json, write_safetensors

        p = Path(path).with_suffix(".safetensors")
        t = {f"sum.{k}": v for k, v in self.sums.items()}
        t.update({"n_complete": self.n_complete, "n_all": self.n_all})
        t.update({f"pca.{l}": v for l, v in self.pca.items()})
        write_safetensors(p, t, {"format": "emolens.SEVStats"})
        write_json(p.with_suffix(".json"), {
            "emotions": list(self.emotions), "model": self.model, "final_norm": self.final_norm,
            "pca_emotions": self.pca_emotions, "meta": self.meta})
        return p

    @classmethod
    def load(cls, path: str | Path) -> "SEVStats":
        from ..results import read_json, read_safetensors

        p = Path(path).with_suffix(".safetensors")
        if not p.exists():
            raise ResultError(f"No saved SEV statistics at {p}.")
        t, _ = read_safetensors(p)  # ResultError naming the file when truncated or corrupt
        info = read_json(p.with_suffix(".json"))
        if "emotions" not in info or "model" not in info or "n_complete" not in t:
            raise ResultError(f"{p} is not saved SEV statistics (SEVStats.save); pass the right file or recompute.")
        sums = {k[4:]: v for k, v in t.items() if k.startswith("sum.")}
        pca = {int(k[4:]): v for k, v in t.items() if k.startswith("pca.")}
        return cls(tuple(info["emotions"]), info["model"], sums, t["n_complete"], t["n_all"], info["final_norm"],
                   pca, info.get("pca_emotions", []), info.get("meta", {}))


def _check_model(stats_model: dict, model) -> None:
    fp = stats_model.get("fingerprint")
    if fp and fp != model.fingerprint:
        raise ResultError(f"These statistics were computed on {stats_model.get('name')!r} (fingerprint {fp}), but "
                          f"{model.name!r} has fingerprint {model.fingerprint}: other weights. Recompute them for "
                          "this model.")
    for k in ("n_layers", "d_model", "d_mlp", "n_heads", "d_head"):
        if stats_model.get(k) != getattr(model, k):
            raise ResultError(f"These statistics were computed on {stats_model.get('name')!r} ({k}="
                              f"{stats_model.get(k)}), but the model is {model.name!r} ({k}={getattr(model, k)}); "
                              "recompute them for this model.")


def collect_sev_stats(model, prompts: PromptSet, *, accepted: Mapping[tuple, bool] | None = None,
                      emotions: Sequence[str] | None = None, final_norm: bool = True,
                      head_moments: bool = True, pca_layers: Sequence[int] = (), batch_size: int = 16,
                      progress: bool = True) -> SEVStats:
    """One streaming pass over P_emo prompts at t*: the statistics of steps 2, 4a, 4b, 5 and 6.

    Args:
        model: an :class:`~emolens.model.EmoModel`.
        prompts: P_emo prompts (:func:`~emolens.circuits.prompts.emo_prompts`), one per
            (skeleton, valence, emotion).
        accepted: ``{(skeleton, valence, emotion): bool}`` from elicitation; rejected prompts are
            skipped and only complete groups feed the directions. None = accept all (no filter).
        emotions: emotion order of the result (default: the order in ``prompts``).
        final_norm: read the last layer's MLP state after the final norm (paper; HF ``hidden_states[-1]``).
        head_moments: also accumulate per-head second moments of ``z`` (for the std of head scores;
            ``L * n_heads * d_head^2`` floats per emotion).
        pca_layers: layers whose per-sample ``resid_post`` at t* is kept for the PCA figure.
        batch_size: prompts per forward pass.

    Returns:
        :class:`SEVStats` (CPU float64 sums). Memory does not grow with the number of prompts
        (except the optional PCA rows).
    """
    emos = check_emotions(emotions if emotions is not None else list(dict.fromkeys(prompts.emotions)))
    if any(e not in emos for e in prompts.emotions):
        raise InputError(f"Prompts name emotions {sorted(set(prompts.emotions) - set(emos))} outside {list(emos)}.")
    keys = prompts.keys
    if len(set(keys)) != len(keys):
        raise InputError("Two prompts share a (skeleton, valence, emotion) key; the direction recipe needs one "
                         "prompt per key (check for repeated skeleton_ids).")
    groups = complete_groups(keys, accepted, emos)
    rows = [i for i, k in enumerate(keys) if accepted is None or accepted.get(tuple(k), False)]
    if not rows:
        raise InputError("No accepted prompts; nothing to analyse. Turn the acceptance filter off or check the judge.")
    L, E = model.n_layers, len(emos)
    dev = model.device
    fnorm = _model.final_norm(model) if final_norm else None
    mlp_norms = [_model.post_mlp_norm(model, l) for l in range(L)]
    w_down = [(_model.w_out(model, l) if mlp_norms[l] is not None else None) for l in range(L)]

    def zeros(*shape):
        return torch.zeros(shape, dtype=torch.float64, device=dev)

    D, M, HZ = model.d_model, model.d_mlp, model.n_heads * model.d_head
    sums: dict[str, list[torch.Tensor]] = {
        "resid_mid": [zeros(E, D) for _ in range(L)], "resid_post": [zeros(E, D) for _ in range(L)],
        "neuron": [zeros(E, M) for _ in range(L)], "z": [zeros(E, HZ) for _ in range(L)],
        "a_all": [zeros(E, M) for _ in range(L)], "ar_pos": [zeros(E, M) for _ in range(L)],
        "ar_neg": [zeros(E, M) for _ in range(L)], "z_all": [zeros(E, HZ) for _ in range(L)],
    }
    if any(n is not None for n in mlp_norms):
        sums["ar_all"] = [zeros(E, M) for _ in range(L)]
    if head_moments:
        sums["zz_all"] = [zeros(E, model.n_heads, model.d_head, model.d_head) for _ in range(L)]
    rms = zeros(L, 2)
    pca: dict[int, list[torch.Tensor]] = {int(l): [] for l in pca_layers}
    cur: dict[str, torch.Tensor] = {}

    def at_t(values, sel):
        return values[sel].reshape((values.shape[0],) + tuple(values.shape[2:]))

    def rd_resid(kind: str, layer: int):
        col = 0 if kind == "resid_mid" else 1

        def fn(values, sel, tracker):
            h = at_t(values, sel)
            if fnorm is not None and kind == "resid_post" and layer == L - 1:
                h = fnorm(h)  # HF hidden_states[-1]: the final-normed state (paper §7.2)
            h = h.double()
            w = cur["wc"]
            sums[kind][layer].index_add_(0, cur["e"], h * w[:, None])
            rms[layer, col] += (h.pow(2).mean(-1).sqrt() * w).sum()
            if kind == "resid_post" and layer in pca:
                pca[layer].append(h.float().cpu())
            if kind == "resid_post" and layer == L - 1:
                raise _model.StopForward  # everything is read: skip the unembedding
        return fn

    def rd_neuron(layer: int):
        def fn(values, sel, tracker):
            a = at_t(values, sel).double()
            e, w = cur["e"], cur["wc"]
            sums["neuron"][layer].index_add_(0, e, a * w[:, None])
            sums["a_all"][layer].index_add_(0, e, a)
            if mlp_norms[layer] is not None:
                # Gemma-style post-MLP norm: mlp_out = gain * (W_down a) / scale, linear given the
                # per-sample scale, so c_n = (a_n / scale) * beta'_n is still an exact decomposition.
                y = a.to(w_down[layer].dtype) @ w_down[layer]
                _, scale = _model.rms_norm_factors(mlp_norms[layer], y)
                a = a / scale.double()
                sums["ar_all"][layer].index_add_(0, e, a)
            sums["ar_pos"][layer].index_add_(0, e, a.clamp(min=0))
            sums["ar_neg"][layer].index_add_(0, e, (-a).clamp(min=0))
        return fn

    def rd_z(layer: int):
        def fn(values, sel, tracker):
            z = at_t(values, sel).double()  # [b, n_heads, d_head]
            e, w = cur["e"], cur["wc"]
            flat = z.flatten(1)
            sums["z"][layer].index_add_(0, e, flat * w[:, None])
            sums["z_all"][layer].index_add_(0, e, flat)
            if head_moments:
                sums["zz_all"][layer].index_add_(0, e, torch.einsum("bhi,bhj->bhij", z, z))
        return fn

    readers = []
    for l in range(L):
        readers += [Reader(Site("resid_mid", l), rd_resid("resid_mid", l), Pos.last()),
                    Reader(Site("resid_post", l), rd_resid("resid_post", l), Pos.last()),
                    Reader(Site("neuron", l), rd_neuron(l), Pos.last()),
                    Reader(Site("head", l), rd_z(l), Pos.last())]
    plan = HookPlan(model, [], readers)
    e_of = {e: i for i, e in enumerate(emos)}
    n_complete = torch.zeros(E, dtype=torch.float64)
    n_all = torch.zeros(E, dtype=torch.float64)
    pca_emotions: list[str] = []
    starts = range(0, len(rows), batch_size)
    with plan.hooks(), torch.no_grad():
        for s in progress_bar(starts, desc="SEV statistics", disable=not progress or len(starts) < 2):
            idx = rows[s:s + batch_size]
            batch = model.encode([prompts.prompts[i] for i in idx], chat=True)
            e_idx = torch.tensor([e_of[prompts.emotions[i]] for i in idx])
            wc = torch.tensor([1.0 if (keys[i][0], keys[i][1]) in groups else 0.0 for i in idx], dtype=torch.float64)
            cur.update(e=e_idx.to(dev), wc=wc.to(dev))
            _model.forward_reads(model, plan, batch)
            n_complete.index_add_(0, e_idx, wc)
            n_all.index_add_(0, e_idx, torch.ones(len(idx), dtype=torch.float64))
            pca_emotions += [prompts.emotions[i] for i in idx]
    info = {k: getattr(model, k) for k in ("name", "n_layers", "d_model", "d_mlp", "n_heads", "d_head")}
    info["fingerprint"] = model.fingerprint
    out = {k: torch.stack(v).transpose(0, 1).contiguous().cpu() for k, v in sums.items()}
    n_c = n_complete.clamp(min=1)
    out["rms"] = (rms / n_c.sum()).cpu()
    return SEVStats(emos, info, out, n_complete, n_all, final_norm,
                    {l: torch.cat(v) for l, v in pca.items() if v}, pca_emotions if pca else [],
                    {"inputs_hash": inputs_hash([list(k) for k in keys]), "n_prompts": len(rows),
                     "n_groups": len(groups)})


def _meta(stats: SEVStats, metric: str, method: str) -> dict:
    fp = {"model_fingerprint": stats.model["fingerprint"]} if stats.model.get("fingerprint") else {}
    return {"model": stats.model.get("name"), **fp, "inputs_hash": stats.meta.get("inputs_hash"), "metric": metric,
            "method": method, "n_groups": stats.n_groups, "final_norm": stats.final_norm}


def emotion_directions(stats: SEVStats, eps: float = EPS) -> Result:
    """Unit emotion directions per layer and sublayer (step 2).

    Returns:
        Result kind ``"directions"``, scores ``[emotion, layer, sublayer, d_model]`` (sublayer 0 =
        attention state ``resid_mid``, 1 = MLP state ``resid_post``; last layer's MLP state
        final-normed when ``stats.final_norm``), extra ``norm`` (``||c_e - cbar||`` broadcast over
        d_model, in residual-stream units).
    """
    cs = [stats.centred("resid_mid"), stats.centred("resid_post")]
    c = torch.stack(cs, 2)  # [E, L, 2, D]
    n = c.norm(dim=-1, keepdim=True)
    v = c / (n + eps)
    return Result("directions", v.float(), ("emotion", "layer", "sublayer", "dim"),
                  {"emotion": list(stats.emotions), "sublayer": list(SUBLAYERS)},
                  {"norm": n.expand_as(c).float()},
                  _meta(stats, "unit direction", "group-mean-subtracted centroid (paper 2 step 2)"))


def difference_vectors(stats: SEVStats) -> tuple[Result, Result]:
    """Emotion difference vectors (step 5), NOT normalised (as used in the paper's modulation).

    ``dmu_e[l] = mean_g (X[g, e, l] - mean_e' X[g, e', l])`` for X = neuron activations (``mlp.hook_post``)
    and X = ``hook_z`` at t*.

    Returns:
        ``(neurons, heads)``: kind ``"neurons"`` ``[emotion, layer, d_mlp]`` and kind
        ``"head_vectors"`` ``[emotion, layer, head, d_head]`` (activation units).
    """
    mn = stats.centred("neuron").float()
    z = stats.centred("z").float()
    E, L = z.shape[:2]
    H = stats.model["n_heads"]
    zh = z.reshape(E, L, H, -1)
    return (Result("neurons", mn, ("emotion", "layer", "neuron"), {"emotion": list(stats.emotions)}, {},
                   _meta(stats, "activation difference", "group-mean-subtracted mean (paper 2 step 5)")),
            Result("head_vectors", zh, ("emotion", "layer", "head", "dim"), {"emotion": list(stats.emotions)}, {},
                   _meta(stats, "hook_z difference", "group-mean-subtracted mean (paper 2 step 5)")))


def direction_cosines(directions: Result, emotion: str) -> Result:
    """The ``2L x 2L`` cosine matrix of one emotion's directions, interleaved Attn0, MLP0, Attn1, ...

    Returns:
        Result kind ``"matrix"`` (row, col) with labels ``A0, M0, A1, M1, ...``.
    """
    if emotion not in directions.labels.get("emotion", []):
        raise InputError(f"No directions for {emotion!r}; have {directions.labels.get('emotion')}.")
    v = directions.scores[directions.labels["emotion"].index(emotion)]  # [L, 2, D]
    L = v.shape[0]
    flat = v.reshape(2 * L, -1).double()
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cos = (flat @ flat.T).float()
    lab = [f"{'A' if i % 2 == 0 else 'M'}{i // 2}" for i in range(2 * L)]
    return Result("matrix", cos, ("row", "col"), {"row": lab, "col": lab}, {},
                  {**directions.meta, "metric": "cosine", "emotion": emotion})
