"""Local components (paper 2, step 4): MLP neuron and attention head scores, and their validation.

**Neurons (4a, analytic decomposition).** For emotion e and layer l, ``beta = W_out[l] @ v_mlp[e, l]``
(the projection of each neuron's output weights on the direction) and, per sample at t*,
``c_n = a_n * beta_n`` (activation x projection). ``sum_n c_n = mlp_out . v`` exactly. Scores:
``C_mean = mean_x c``, ``C_pos = mean_x max(c, 0)``, ``C_neg = mean_x max(-c, 0)``, ``H_mean = mean_x a``;
neurons are ranked by signed ``C_mean`` (positive = pushes toward v_e). For sandwich-norm models
(Gemma 2/3: a norm on the MLP output) the decomposition is taken with the norm linearised at each
sample (``mlp_out = gain * W_down a / scale``), which keeps it exact.

**Heads (4b).** The paper zeroes head h's ``hook_z`` at all positions of layer l and records the drop
of ``resid_mid[l][t*] . v_attn[e, l]``. Only layer l's own ``resid_mid`` at t* is read, so the drop is
``(z_h[t*] W_O[h]) . v`` exactly (for sandwich-norm models: ``(N(Y) - N(Y - z_h W_O[h])) . v`` with
``Y`` the pre-norm attention output): :func:`head_scores` computes it for every head from one cached
pass; :func:`head_scores_masked` is the paper's 1 + L*H masked passes (reference for tests and the
benchmark).

**Validation (4c, best reading).** :func:`component_curve`: ablate (zero) or enhance (add
``scale * dmu_e``) the top-k components of one layer, against k random components of the same
layer (drawn outside the top-k), and measure the emotion score ``s`` = projection of the layer's
state at t* on the layer's direction (``resid_post . v_mlp`` for neurons, ``resid_mid . v_attn`` for
heads), under P_emo prompts of that emotion. Because the readout is the intervened layer at t*,
interventions at t* alone are equivalent to all positions; each point is one prefix-cached
one-token pass.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float

from ..errors import InputError, ResultError
from ..interventions import Add, HookPlan, Reader, Zero
from ..progress import progress_bar
from ..results import Result, inputs_hash
from ..sites import Pos, Site, head, neuron
from . import _model
from .directions import SEVStats, _check_model

__all__ = ["neuron_scores_from_stats", "head_scores_from_stats", "neuron_scores", "head_scores",
           "head_scores_masked", "component_curve", "prefix_steppers", "curve_ratio", "layer_direction"]


def _as_layer_dirs(direction, model, sublayer: int | None = None) -> torch.Tensor:
    """``[L, d_model]`` float tensor from a tensor or a directions Result row."""
    d = direction.scores if isinstance(direction, Result) else torch.as_tensor(direction)
    if d.ndim == 3 and sublayer is not None:
        d = d[:, sublayer]
    if d.ndim != 2 or d.shape != (model.n_layers, model.d_model):
        raise InputError(f"Directions must be [n_layers, d_model] = [{model.n_layers}, {model.d_model}] for "
                         f"{model.name}; got {tuple(d.shape)} (pass directions.scores[e, :, sublayer]).")
    return d.float()


def layer_direction(directions: Result, emotion: str, sublayer: str) -> Float[torch.Tensor, "layer d_model"]:
    """One emotion's ``[L, d_model]`` directions for ``sublayer`` ``"attn"`` or ``"mlp"``."""
    emos = directions.labels.get("emotion", [])
    if emotion not in emos:
        raise InputError(f"No directions for emotion {emotion!r}; the directions hold {emos}.")
    subs = directions.labels.get("sublayer", ["attn", "mlp"])
    return directions.scores[emos.index(emotion), :, subs.index(sublayer)]


def _meta(model, metric, method, **kw) -> dict:
    """``model``: an EmoModel or a SEVStats ``model`` dict (name and fingerprint are recorded)."""
    if isinstance(model, dict):
        ident = {"model": model.get("name"), **({"model_fingerprint": model["fingerprint"]}
                                                 if model.get("fingerprint") else {})}
    else:
        ident = model.meta()
    return {**ident, "metric": metric, "method": method, **kw}


# ----------------------------------------------------------------------------------------- neurons
def _betas(model, v: torch.Tensor) -> torch.Tensor:
    """``[L, d_mlp]`` projections of each neuron's output row on the layer's direction."""
    out = []
    for l in range(model.n_layers):
        w = _model.w_out(model, l).float()  # [d_mlp, d_model]
        norm = _model.post_mlp_norm(model, l)
        if norm is not None:  # sandwich norm: fold its gain into the write (scale is per sample)
            gain, _ = _model.rms_norm_factors(norm, torch.zeros(1, model.d_model, device=w.device, dtype=w.dtype))
            w = w * gain.float()
        out.append((w @ v[l].to(w.device)).cpu())
    return torch.stack(out)


def neuron_scores_from_stats(model, stats: SEVStats, directions: Result, emotion: str) -> Result:
    """Neuron scores of one emotion from the streaming statistics (exact; no extra pass).

    ``C_mean = beta * mean(a')``, ``C_pos``/``C_neg`` from the means of the positive/negative parts of
    ``a'`` (``a' = a``, or ``a / scale`` under a post-MLP norm), ``H_mean = mean(a)``.

    Returns:
        Result kind ``"neurons"`` ``[layer, d_mlp]`` = ``C_mean`` (units: residual-stream projection),
        extra ``C_pos``, ``C_neg``, ``beta``, ``H_mean``.
    """
    _check_model(stats.model, model)  # statistics of another model (even of the same width) are refused
    if emotion not in stats.emotions:
        raise InputError(f"No statistics for {emotion!r}; have {list(stats.emotions)}.")
    e = stats.emotions.index(emotion)
    v = layer_direction(directions, emotion, "mlp")
    beta = _betas(model, v)
    n = stats.n_all[e].item()
    if n == 0:
        raise InputError(f"No accepted samples of {emotion!r}; cannot score neurons.")
    ar = stats.sums.get("ar_all", stats.sums["a_all"])[e].float() / n
    pos = stats.sums["ar_pos"][e].float() / n
    neg = stats.sums["ar_neg"][e].float() / n
    c_mean = beta * ar
    c_pos = torch.where(beta >= 0, beta * pos, -beta * neg)
    c_neg = torch.where(beta >= 0, beta * neg, -beta * pos)
    return Result("neurons", c_mean, ("layer", "neuron"), {},
                  {"C_pos": c_pos, "C_neg": c_neg, "beta": beta, "H_mean": stats.sums["a_all"][e].float() / n},
                  _meta(stats.model, "C_mean (activation x beta)", "analytic decomposition (paper 2 4a)",
                        emotion=emotion, samples=int(n), inputs_hash=stats.meta.get("inputs_hash")))


def neuron_scores(model, prompts, direction, *, batch_size: int = 16, progress: bool = False) -> Result:
    """Neuron scores from a per-sample pass (reference for :func:`neuron_scores_from_stats`).

    Args:
        prompts: P_emo message lists of one emotion (or any prompts; read at t*).
        direction: ``[L, d_model]`` MLP-state directions of that emotion.
    """
    v = _as_layer_dirs(direction, model)
    beta = _betas(model, v)
    L = model.n_layers
    acc = {k: torch.zeros(L, model.d_mlp, dtype=torch.float64) for k in ("c", "pos", "neg", "a")}
    norms = [_model.post_mlp_norm(model, l) for l in range(L)]
    wd = [_model.w_out(model, l) if norms[l] is not None else None for l in range(L)]

    def rd(layer):
        def fn(values, sel, tracker):
            a = values[sel].double()
            ar = a
            if norms[layer] is not None:
                _, scale = _model.rms_norm_factors(norms[layer], a.to(wd[layer].dtype) @ wd[layer])
                ar = a / scale.double()
            c = ar.cpu() * beta[layer].double()
            acc["c"][layer] += c.sum(0)
            acc["pos"][layer] += c.clamp(min=0).sum(0)
            acc["neg"][layer] += (-c).clamp(min=0).sum(0)
            acc["a"][layer] += a.sum(0).cpu()
            if layer == L - 1:
                raise _model.StopForward
        return fn

    plan = HookPlan(model, [], [Reader(neuron(l), rd(l), Pos.last()) for l in range(L)])
    prompts = list(prompts)
    with plan.hooks(), torch.no_grad():
        for s in progress_bar(range(0, len(prompts), batch_size), desc="neuron scores", disable=not progress):
            _model.forward_reads(model, plan, model.encode(prompts[s:s + batch_size], chat=True))
    n = len(prompts)
    return Result("neurons", acc["c"] / n, ("layer", "neuron"), {},
                  {"C_pos": acc["pos"] / n, "C_neg": acc["neg"] / n, "beta": beta, "H_mean": acc["a"] / n},
                  _meta(model, "C_mean (activation x beta)", "analytic decomposition (paper 2 4a)", samples=n,
                        inputs_hash=inputs_hash(prompts)))


# ------------------------------------------------------------------------------------------- heads
def head_scores_from_stats(model, stats: SEVStats, directions: Result, emotion: str) -> Result:
    """Head scores of one emotion from the streaming ``z`` moments (models without a post-attention norm).

    ``mean_importance[l, h] = mean_x(z_h) . (W_O[h] v_attn[l])`` (linear in z); the std uses the
    per-head second moments when they were collected (population std, ddof=0).

    Raises:
        InputError: the model has a post-attention norm (the closed form is not linear there; use
            :func:`head_scores`).
    """
    _check_model(stats.model, model)
    if any(_model.post_attn_norm(model, l) is not None for l in range(model.n_layers)):
        raise InputError(f"{model.architecture} normalises the attention output before the residual add, so head "
                         "scores are not linear in z; use head_scores(model, prompts, direction) instead.")
    e = stats.emotions.index(emotion)
    n = stats.n_all[e].item()
    v = layer_direction(directions, emotion, "attn")
    H, dh = model.n_heads, model.d_head
    means, stds = [], []
    for l in range(model.n_layers):
        u = torch.einsum("hdm,m->hd", _model.w_o(model, l).double().cpu(), v[l].double())  # [H, dh]
        mz = (stats.sums["z_all"][e, l] / n).reshape(H, dh)
        m = (mz * u).sum(-1)
        means.append(m)
        if "zz_all" in stats.sums:
            ezz = stats.sums["zz_all"][e, l] / n  # [H, dh, dh]
            second = torch.einsum("hi,hij,hj->h", u, ezz, u)
            stds.append((second - m ** 2).clamp(min=0).sqrt())
    extra = {"std_importance": torch.stack(stds)} if stds else {}
    return Result("heads", torch.stack(means).float(), ("layer", "head"), {}, extra,
                  _meta(stats.model, "mean_importance (drop of resid_mid . v_attn)",
                        "closed form from streaming z moments (paper 2 4b)", emotion=emotion, samples=int(n),
                        inputs_hash=stats.meta.get("inputs_hash")))


def _head_drops(model, layer: int, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[b, n_heads]`` drop of ``resid_mid[layer] . v`` when each head's z is zeroed (closed form)."""
    W = _model.w_o(model, layer).to(z.dtype)  # [H, dh, D]
    y = torch.einsum("bhd,hdm->bhm", z, W)  # each head's write
    vv = v.to(z.device, z.dtype)
    norm = _model.post_attn_norm(model, layer)
    if norm is None:
        return y @ vv
    Y = y.sum(1)
    b = _model.o_bias(model, layer)
    if b is not None:
        Y = Y + b.to(Y.dtype)
    full = norm(Y) @ vv  # [b]
    without = norm(Y[:, None, :] - y) @ vv  # [b, H]
    return full[:, None] - without


def head_scores(model, prompts, direction, *, batch_size: int = 16, progress: bool = False) -> Result:
    """Closed-form head scores from one cached pass per batch (equal to the masked-pass definition).

    Args:
        prompts: prompts (P_emo of one emotion), read at t*.
        direction: ``[L, d_model]`` attention-state (``resid_mid``) directions of that emotion.

    Returns:
        Result kind ``"heads"`` ``[layer, head]`` = mean drop of ``resid_mid[l][t*] . v[l]`` when the
        head's ``hook_z`` is zeroed at every position of layer l; extra ``std_importance``
        (population std over samples).
    """
    v = _as_layer_dirs(direction, model)
    L, H = model.n_layers, model.n_heads
    s1 = torch.zeros(L, H, dtype=torch.float64)
    s2 = torch.zeros(L, H, dtype=torch.float64)

    def rd(layer):
        def fn(values, sel, tracker):
            z = values[sel].reshape(-1, H, model.d_head).double()
            d = _head_drops(model, layer, z, v[layer].double()).cpu()
            s1[layer] += d.sum(0)
            s2[layer] += d.pow(2).sum(0)
            if layer == L - 1:
                raise _model.StopForward  # nothing later is needed
        return fn

    plan = HookPlan(model, [], [Reader(head(l), rd(l), Pos.last()) for l in range(L)])
    prompts = list(prompts)
    if not prompts:
        raise InputError("head_scores got no prompts.")
    with plan.hooks(), torch.no_grad():
        for s in progress_bar(range(0, len(prompts), batch_size), desc="head scores", disable=not progress):
            _model.forward_reads(model, plan, model.encode(prompts[s:s + batch_size], chat=True))
    n = len(prompts)
    m = s1 / n
    return Result("heads", m, ("layer", "head"), {}, {"std_importance": (s2 / n - m ** 2).clamp(min=0).sqrt()},
                  _meta(model, "mean_importance (drop of resid_mid . v_attn)",
                        "closed form, one cached pass (paper 2 4b)", samples=n, inputs_hash=inputs_hash(prompts)))


def head_scores_masked(model, prompts, direction, *, batch_size: int = 16, progress: bool = False) -> Result:
    """The paper's definition: 1 + L*H forward passes per batch, zeroing one head at all positions.

    Reference implementation for tests and ``benchmarks/circuits.py``; use :func:`head_scores`.
    """
    v = _as_layer_dirs(direction, model)
    L, H = model.n_layers, model.n_heads
    s1 = torch.zeros(L, H, dtype=torch.float64)
    s2 = torch.zeros(L, H, dtype=torch.float64)
    prompts = list(prompts)
    for s in progress_bar(range(0, len(prompts), batch_size), desc="masked head scores", disable=not progress):
        batch = model.encode(prompts[s:s + batch_size], chat=True)
        got: dict[int, torch.Tensor] = {}

        def rd(layer):
            def fn(values, sel, tracker):
                got[layer] = (values[sel].double() @ v[layer].double().to(values.device)).cpu()
            return fn

        base_plan = HookPlan(model, [], [Reader(Site("resid_mid", l), rd(l), Pos.last()) for l in range(L)])
        with base_plan.hooks(), torch.no_grad():
            base_plan.forward(batch)
        base = dict(got)
        for l in range(L):
            for h in range(H):
                plan = HookPlan(model, [Zero(head(l, h), pos=Pos.all())],
                                [Reader(Site("resid_mid", l), rd(l), Pos.last())])
                with plan.hooks(), torch.no_grad():
                    plan.forward(batch)
                d = base[l] - got[l]
                s1[l, h] += d.sum()
                s2[l, h] += d.pow(2).sum()
    n = len(prompts)
    m = s1 / n
    return Result("heads", m, ("layer", "head"), {}, {"std_importance": (s2 / n - m ** 2).clamp(min=0).sqrt()},
                  _meta(model, "mean_importance (drop of resid_mid . v_attn)",
                        "masked passes, 1 + L*H per batch (paper 2 4b reference)", samples=n,
                        inputs_hash=inputs_hash(prompts)))


# ---------------------------------------------------------------------------------- validation 4c
def _bootstrap_mean_ci(x: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    if len(x) < 2:
        return float(x.mean()), float(x.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def component_curve(model, prompts, scores: Result, direction, *, kind: str, layer: int, mode: str = "ablate",
                    payload: torch.Tensor | None = None, scale: float = 1.0, ks: Sequence[int] = tuple(range(11)),
                    n_random: int = 5, seed: int = 0, batch_size: int = 32, n_boot: int = 1000,
                    final_norm: bool = True, steppers: Sequence["_model.PrefixStepper"] | None = None,
                    progress: bool = False) -> dict[str, Result]:
    """Ablation / enhancement curve of the top-k components of one layer vs random-k (paper 2 4c).

    Best reading (the paper's protocol is not in its code): the emotion score is the projection of
    the intervened layer's state at t* on that layer's direction, averaged over P_emo prompts of the
    emotion; random controls are k components of the same layer outside the top-k.

    Args:
        prompts: P_emo prompts of the emotion (read at t*).
        scores: that emotion's neuron (``[layer, d_mlp]``) or head (``[layer, n_heads]``) scores;
            components are ranked by signed score, descending.
        direction: ``[L, d_model]`` directions of the matching state (MLP state for neurons,
            attention state for heads).
        kind: ``"neuron"`` or ``"head"``.
        layer: the layer whose components are intervened on and where the score is read.
        mode: ``"ablate"`` (zero) or ``"enhance"`` (add ``scale * payload`` to the components).
        payload: the emotion's difference vector at that layer (``[d_mlp]`` or ``[n_heads, d_head]``);
            needed for ``"enhance"``.
        ks: component counts (0 = no intervention).
        n_random: random draws per k (components outside the layer's top-k, seeded).
        steppers: prefix caches of ``prompts`` (:func:`prefix_steppers`, batch order) to share between
            curves of the same prompts; built here when None.

    Returns:
        ``{"top": Result, "random": Result}``: kind ``"curve"`` over axis ``k``; scores = mean change of
        the emotion score ``s`` (projection units) over prompts, extra ``ci_low``/``ci_high``
        (bootstrap over prompts, 95%); ``random`` averages the draws per prompt first and also has
        ``draw_std`` (spread of the draw means).
    """
    if kind not in ("neuron", "head"):
        raise InputError(f"kind must be 'neuron' or 'head', got {kind!r}.")
    if mode not in ("ablate", "enhance"):
        raise InputError(f"mode must be 'ablate' or 'enhance', got {mode!r}.")
    if mode == "enhance" and payload is None:
        raise InputError("mode='enhance' needs payload= (the emotion's difference vector at that layer).")
    if not 0 <= layer < model.n_layers:
        raise InputError(f"layer {layer} out of range 0..{model.n_layers - 1}.")
    v = _as_layer_dirs(direction, model)[layer].double()
    n_comp = model.d_mlp if kind == "neuron" else model.n_heads
    ks = [int(k) for k in ks]
    if any(k < 0 or k > n_comp for k in ks):
        raise InputError(f"ks must lie in 0..{n_comp} for {kind}s of {model.name}.")
    row = scores.scores[layer]
    if row.shape != (n_comp,):
        raise ResultError(f"scores row has shape {tuple(row.shape)}, expected ({n_comp},) {kind}s per layer.")
    order = torch.argsort(row, descending=True).tolist()
    rng = np.random.default_rng(seed)
    draws: dict[int, list[list[int]]] = {}
    for k in ks:
        rest = order[k:] if k < n_comp else []
        kk = min(k, len(rest))
        draws[k] = [sorted(rng.choice(rest, size=kk, replace=False).tolist()) if kk else [] for _ in range(n_random)]
    read_site = Site("resid_post", layer) if kind == "neuron" else Site("resid_mid", layer)
    fnorm = _model.final_norm(model) if (final_norm and kind == "neuron" and layer == model.n_layers - 1) else None
    mk = neuron if kind == "neuron" else head

    def ivs(idx: list[int], rows: tuple[int, ...]):
        if not idx:
            return []
        site = mk(layer, idx)
        if mode == "ablate":
            return [Zero(site, pos=Pos.last(), rows=rows)]
        p = payload.float()
        vec = p[idx] if kind == "neuron" else p.reshape(model.n_heads, model.d_head)[idx]
        return [Add(site, vec, strength=scale, pos=Pos.last(), rows=rows)]

    prompts = list(prompts)
    R = 1 + n_random  # one copy of each prompt for the top-k set and one per random draw
    if steppers is None:
        steppers = prefix_steppers(model, prompts, batch_size=batch_size, stop_layer=layer, repeats=R)
    if sum(st.n_prompts for st in steppers) != len(prompts):
        raise InputError("steppers do not cover the prompts; build them with prefix_steppers(model, prompts).")
    if any(st.stop_layer is not None and st.stop_layer < layer for st in steppers):
        raise InputError(f"The steppers cache layers up to {steppers[0].stop_layer} only; layer {layer} needs more.")
    if any(st.repeats < R for st in steppers):
        raise InputError(f"The steppers repeat each prompt {steppers[0].repeats} times; n_random={n_random} needs "
                         f"{R} (prefix_steppers(..., repeats=1 + n_random)).")
    top_d, rand_d = {k: [] for k in ks}, {k: [] for k in ks}
    rand_draw_means = {k: np.zeros(n_random) for k in ks}
    for stepper in progress_bar(steppers, desc=f"{mode} {kind}s L{layer}", disable=not progress):
        got = {}
        n_p, rep = stepper.n_prompts, stepper.repeats

        def fn(values, sel, tracker):
            h = values[sel]
            if fnorm is not None:
                h = fnorm(h)
            got["s"] = (h.double() @ v.to(h.device)).cpu().reshape(n_p, rep)
            raise _model.StopForward  # the score is read at this layer: skip the rest

        reader = stepper.readers([Reader(read_site, fn, Pos.last())])
        stepper.step([], reader)
        base = got["s"][:, 0].clone()
        for k in ks:
            specs = ivs(order[:k], stepper.block(0))
            for j, idx in enumerate(draws[k]):
                specs += ivs(idx, stepper.block(1 + j))
            stepper.step(specs, reader)
            top_d[k].append((got["s"][:, 0] - base).numpy())
            per = [(got["s"][:, 1 + j] - base).numpy() for j in range(len(draws[k]))]
            for j, d in enumerate(per):
                rand_draw_means[k][j] += d.sum()
            rand_d[k].append(np.mean(per, 0) if per else np.zeros(len(base)))
    n = len(prompts)
    out = {}
    for name, data in (("top", top_d), ("random", rand_d)):
        means, lo, hi = [], [], []
        for i, k in enumerate(ks):
            x = np.concatenate(data[k])
            means.append(x.mean())
            a, b = _bootstrap_mean_ci(x, n_boot, seed + i)
            lo.append(a)
            hi.append(b)
        extra = {"ci_low": torch.tensor(lo), "ci_high": torch.tensor(hi)}
        if name == "random":
            extra["draw_std"] = torch.tensor([float(np.std(rand_draw_means[k] / n)) for k in ks])
        out[name] = Result("curve", torch.tensor(means), ("k",), {"k": ks}, extra,
                           _meta(model, f"change of {read_site} . v at t*", f"{mode} {name}-k {kind}s "
                                 f"(paper 2 4c, best reading)", layer=layer, kind=kind, mode=mode, scale=scale,
                                 n_random=n_random, seed=seed, samples=n, top_components=order[:max(ks)],
                                 inputs_hash=inputs_hash(prompts)))
    return out


def prefix_steppers(model, prompts, *, batch_size: int = 32, stop_layer: int | None = None, repeats: int = 1
                    ) -> list["_model.PrefixStepper"]:
    """Prefix caches (prompt minus t*) of ``prompts`` in batches, for :func:`component_curve`
    (``repeats = 1 + n_random`` copies of each prompt so a step measures top-k and every draw)."""
    prompts = list(prompts)
    if not prompts:
        raise InputError("No prompts.")
    return [_model.PrefixStepper(model, model.encode(prompts[s:s + batch_size], chat=True), stop_layer=stop_layer,
                                 repeats=repeats) for s in range(0, len(prompts), batch_size)]


def curve_ratio(curves: Mapping[str, Result], k: int | None = None) -> float:
    """``|mean change (top-k)| / |mean change (random-k)|`` at ``k`` (default: the largest k)."""
    top, rnd = curves["top"], curves["random"]
    ks = top.labels["k"]
    k = max(ks) if k is None else k
    if k not in ks:
        raise InputError(f"k={k} not on the curve (ks={ks}).")
    i = ks.index(k)
    t, r = abs(float(top.scores[i])), abs(float(rnd.scores[i]))
    return float("inf") if r == 0 and t > 0 else (t / r if r > 0 else float("nan"))
