"""Sublayer causal influence (paper 2, step 6).

For each sublayer (attention / MLP of every layer), inject a sigma-scaled pulse along the
(sign-aligned) local emotion direction into the sublayer's *output* at t*, under the neutral
prompt P_neu, and read how much the final state's projection on a reference direction moves::

    sigma[l, p] = mean over step-2 samples of RMS_d(h_p[l] at t*)     (h_attn = resid_mid, h_mlp = resid_post)
    v_ref[e]    = normalise(sum of sign-aligned v_e over {attn, mlp} x ref layers)   (paper: layers 21-25 of 28)
    v_loc       = sign_align(v_e_p[l], v_ref)
    s(x)        = h_final[t*] . v_ref          (h_final = final-normed residual, HF hidden_states[-1])
    I[l, p](a)  = (mean_x s_inj(x) - mean_x s_base(x)) / (a * sigma[l, p])
    I[l, p]     = mean over a in {0.1, 0.3, 0.5, 0.7};   I_norm = I / sum over all sublayers of I

The pulse and the readout are both at t*, so positions before t* never change: every (alpha,
sublayer) point is one prefix-cached one-token pass (:class:`~emolens.circuits._model.PrefixStepper`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float

from ..errors import InputError
from ..interventions import Add, HookPlan, Reader
from ..progress import progress_bar
from ..results import Result, inputs_hash
from ..sites import Pos, Site, attn_out, mlp_out
from . import _model
from .directions import SEVStats, SUBLAYERS

__all__ = ["sigma", "layers_from_fraction", "reference_direction", "local_directions", "sublayer_influence"]

#: Paper's alpha grid.
ALPHAS = (0.1, 0.3, 0.5, 0.7)


def sigma(stats: SEVStats) -> Result:
    """sigma: mean RMS (over d_model) of each sublayer state at t* over the step-2 samples.

    Returns:
        Result kind ``"sublayers"`` ``[layer, sublayer]`` (residual-stream units).
    """
    return Result("sublayers", stats.sums["rms"].float(), ("layer", "sublayer"), {"sublayer": list(SUBLAYERS)}, {},
                  {"model": stats.model.get("name"), "metric": "mean RMS at t*", "method": "sigma (paper 2 step 6)",
                   "inputs_hash": stats.meta.get("inputs_hash"), "final_norm": stats.final_norm})


def layers_from_fraction(n_layers: int, frac: tuple[float, float]) -> list[int]:
    """Layers ``l`` with ``lo <= l / n_layers <= hi`` (inclusive), e.g. (0.75, 0.9) -> 21..25 of 28.

    Paper ranges as fractions of depth: steering 11-20 of 28 = (0.39, 0.72); reference 21-25 of 28
    = (0.75, 0.9).
    """
    lo, hi = frac
    if not 0 <= lo <= hi <= 1:
        raise InputError(f"Layer fraction {frac} must satisfy 0 <= lo <= hi <= 1.")
    out = [l for l in range(n_layers) if lo - 1e-9 <= l / n_layers <= hi + 1e-9]
    if not out:
        out = [min(n_layers - 1, round(lo * n_layers))]
    return out


def _emotion_dirs(directions: Result, emotion: str) -> torch.Tensor:
    emos = directions.labels.get("emotion", [])
    if emotion not in emos:
        raise InputError(f"No directions for emotion {emotion!r}; have {emos}.")
    return directions.scores[emos.index(emotion)].float()  # [L, 2, D]


def reference_direction(directions: Result, emotion: str, ref_layers: Sequence[int]) -> Float[torch.Tensor, "d"]:
    """``v_ref``: normalised sum of the sign-aligned attn and MLP directions of ``ref_layers``.

    Order as in the paper: (attn l, mlp l) for each ref layer; the first vector is the sign anchor.
    """
    v = _emotion_dirs(directions, emotion)
    vs = [v[l, p] for l in ref_layers for p in (0, 1)]
    if not vs:
        raise InputError("reference_direction needs at least one reference layer.")
    ref0 = vs[0]
    tot = sum(x * (1.0 if float(x @ ref0) >= 0 else -1.0) for x in vs)
    return tot / tot.norm().clamp_min(1e-12)


def local_directions(directions: Result, emotion: str, v_ref: torch.Tensor) -> Float[torch.Tensor, "layer 2 d"]:
    """Unit directions of every sublayer, sign-aligned to ``v_ref``."""
    v = _emotion_dirs(directions, emotion)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sign = torch.where((v @ v_ref) >= 0, 1.0, -1.0)
    return v * sign[..., None]


def sublayer_influence(model, prompts, directions: Result, sig: Result, emotions: Sequence[str], *,
                       alphas: Sequence[float] = ALPHAS, ref_layers: Sequence[int] | None = None,
                       final_norm: bool = True, batch_size: int = 16, progress: bool = False) -> dict[str, Result]:
    """Causal influence of every sublayer on the final emotion representation, per emotion.

    Args:
        prompts: P_neu prompts (no emotion instruction); the same prompts serve every emotion in
            ``emotions`` (the paper uses the samples accepted for that emotion; without an
            acceptance filter these coincide).
        directions: step-2 directions (kind ``"directions"``).
        sig: :func:`sigma` result.
        emotions: emotions to measure.
        alphas: pulse sizes in units of sigma (paper: 0.1, 0.3, 0.5, 0.7).
        ref_layers: layers of the reference direction (default: 75-90% of depth, the paper's 21-25 of 28).
        final_norm: read the final-normed state (paper).
        batch_size: prompts per prefix cache (each step carries ``batch_size x len(emotions)`` rows).

    Returns:
        ``{emotion: Result}``, kind ``"sublayers"`` ``[layer, sublayer]`` = I (mean over alphas; units:
        change of the final projection per unit of injected norm), extra ``I_norm`` (I / sum I),
        ``alpha_std`` (std of I over alphas), ``dose`` (sigma); meta ``per_alpha`` and ``s_base``.
    """
    L = model.n_layers
    if ref_layers is None:
        ref_layers = layers_from_fraction(L, (0.75, 0.9))
    alphas = [float(a) for a in alphas]
    if not alphas or any(a <= 0 for a in alphas):
        raise InputError(f"alphas must be positive, got {alphas}.")
    sg = sig.scores.float()
    if sg.shape != (L, 2):
        raise InputError(f"sigma has shape {tuple(sg.shape)}, expected [{L}, 2] for {model.name}.")
    prompts = list(prompts)
    if not prompts:
        raise InputError("sublayer_influence got no prompts.")
    refs = {e: reference_direction(directions, e, ref_layers) for e in emotions}
    locs = {e: local_directions(directions, e, refs[e]) for e in emotions}
    fnorm = _model.final_norm(model) if final_norm else None
    n_a = len(alphas)
    tot_inj = {e: torch.zeros(n_a, L, 2, dtype=torch.float64) for e in emotions}
    tot_base = {e: 0.0 for e in emotions}
    E = len(emotions)
    V = torch.stack([refs[e] for e in emotions]).double()  # [E, D]

    starts = range(0, len(prompts), batch_size)
    bar = progress_bar(range(len(starts) * L * 2), desc="sublayer influence", disable=not progress)
    it = iter(bar)
    for s in starts:
        # one prefix per batch, each prompt repeated once per emotion: a step serves every emotion
        stepper = _model.PrefixStepper(model, model.encode(prompts[s:s + batch_size], chat=True), repeats=E)
        n_p = stepper.n_prompts
        got: dict[str, torch.Tensor] = {}

        def fn(values, sel, tracker):
            h = values[sel]
            if fnorm is not None:
                h = fnorm(h)
            h = h.double().reshape(n_p, E, -1)
            got["s"] = torch.einsum("ned,ed->ne", h, V.to(h.device)).cpu()  # [prompt, emotion]
            raise _model.StopForward  # skip the unembedding
        reader = Reader(Site("resid_post", L - 1), fn, Pos.last())
        stepper.step([], [reader])
        for j, e in enumerate(emotions):
            tot_base[e] += float(got["s"][:, j].sum())
        for l in range(L):
            for p, site in enumerate((attn_out(l), mlp_out(l))):
                ivs = [Add(site, locs[e][l, p], strength=0.0, pos=Pos.last(), rows=stepper.block(j))
                       for j, e in enumerate(emotions)]
                plan = HookPlan(model, ivs, [reader])
                for i, a in enumerate(alphas):
                    for iv in ivs:
                        iv.strength = a * float(sg[l, p])
                    stepper.step(plan=plan)
                    for j, e in enumerate(emotions):
                        tot_inj[e][i, l, p] += float(got["s"][:, j].sum())
                next(it, None)
    n = len(prompts)
    dose = torch.tensor(alphas, dtype=torch.float64)[:, None, None] * sg.double()[None]
    out = {}
    for e in emotions:
        base = tot_base[e] / n
        per_alpha = (tot_inj[e] / n - base) / dose.clamp_min(1e-12)  # [A, L, 2]
        I = per_alpha.mean(0)
        total = float(I.sum())
        out[e] = Result("sublayers", I.float(), ("layer", "sublayer"), {"sublayer": list(SUBLAYERS)},
                        {"I_norm": (I / total if abs(total) > 1e-12 else torch.zeros_like(I)).float(),
                         "alpha_std": per_alpha.std(0, unbiased=False).float(), "dose": sg.float()},
                        {**model.meta(), "metric": "d(h_final . v_ref) / dose",
                         "method": "sigma-scaled pulses at t* into sublayer outputs (paper 2 step 6)",
                         "emotion": e, "alphas": alphas, "ref_layers": list(ref_layers), "s_base": base,
                         "per_alpha": per_alpha.float().tolist(), "samples": n, "final_norm": final_norm,
                         "inputs_hash": inputs_hash(prompts)})
    return out
