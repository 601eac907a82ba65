"""Ablation and enhancement of components, top-k selection, random controls and effect curves.

Building blocks:

- :func:`ablate` turns components (:class:`~emolens.sites.Site` s: heads, neurons, sublayers,
  residual sites) into intervention specs: ``zero``, ``mean`` (over a reference set),
  ``resample`` (activations of other prompts), ``scale`` (multiply by ``s``: ablation < 1 <
  enhancement) or ``add`` (add a vector: paper 2's enhancement with Δμ).
- :func:`top_k_sites` reads the best components off any :class:`~emolens.results.Result`
  (attribution, patching, paper 2's neuron/head scores); :func:`random_k_sites` draws seeded
  random controls of the same kind.
- :func:`effect_curve` (over k) and :func:`scale_curve` (over the scale) measure a user
  ``measure(model, prompts, interventions) -> Tensor[n_prompts]`` for the top components and
  for ``n_random`` random draws, as effects against the unablated baseline (paired per prompt)
  with bootstrap CIs over prompts. :func:`metric_measure` turns any
  :class:`~emolens.metrics.Metric` (e.g. a projection) into such a measure.

Example::

    heads = attribute(m, clean, corrupt, metric)["heads"]
    curves = effect_curve(m, prompts, heads, metric_measure(projection(resid(12), v)), ks=(0, 1, 2, 4, 8))
    curves["top"].scores, curves["random"].extra["ci_low"]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float

from .errors import InputError, InterventionError, MetricError, ResultError
from .interventions import Add, Intervention, Mean, Replace, Scale, Zero
from .progress import progress_bar
from .results import Result, inputs_hash
from .sites import Pos, Site, as_sites

__all__ = ["ABLATION_KINDS", "ablate", "merge_sites", "top_k_sites", "random_k_sites", "effect_curve", "scale_curve",
           "metric_measure", "bootstrap_mean_ci"]

ABLATION_KINDS = ("zero", "mean", "resample", "scale", "add")
Measure = Callable[[Any, Sequence[Any], list[Intervention]], torch.Tensor]

# component families for random controls: kind -> result kinds that map to it
_FAMILY = {"head": "head", "heads": "head", "heads_pos": "head", "neuron": "neuron", "neurons": "neuron",
           "sublayer": "sublayer", "sublayers": "sublayer", "attn_out": "sublayer", "mlp_out": "sublayer"}


# =========================================================================================
# Sites
# =========================================================================================
def _components(sites: Sequence[Site], model=None) -> list[Site]:
    """Expand sites to single components (one head / one neuron each); others unchanged."""
    out: list[Site] = []
    for s in sites:
        if s.kind in ("head", "neuron") and (s.index is None or isinstance(s.index, tuple)):
            if s.index is None:
                if model is None:
                    raise InputError(f"Site {s} means all components; pass the model to expand it.")
                n = model.n_heads if s.kind == "head" else model.d_mlp
                idx = range(n)
            else:
                idx = s.index
            out.extend(Site(s.kind, s.layer, int(i)) for i in idx)
        else:
            out.append(s)
    return out


def merge_sites(sites: "Sequence[Site | str]") -> list[Site]:
    """Merge single heads/neurons of the same layer into one site each (fewer hooks); dedupe."""
    groups: dict[tuple[str, int], list[int] | None] = {}
    other: dict[Site, None] = {}
    for s in as_sites(sites) if sites else []:
        if s.kind in ("head", "neuron"):
            key = (s.kind, s.layer)
            if s.index is None or groups.get(key, []) is None:
                groups[key] = None
            else:
                groups.setdefault(key, [])
                groups[key] = sorted(set(groups[key]) | set(s.indices))  # type: ignore[arg-type]
        else:
            other[s] = None
    merged = [Site(k, L, None if idx is None else (idx[0] if len(idx) == 1 else tuple(idx)))
              for (k, L), idx in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return merged + list(other)


# =========================================================================================
# Ablation specs
# =========================================================================================
def _reference_pos(pos: Pos) -> Pos:
    """Where to average reference activations for mean ablation (prompt positions only)."""
    if pos.rule in ("all", "prompt", "last", "index", "slice"):
        return pos
    return Pos.last() if pos.rule == "from_last" else Pos.all()


def _vector_for(vector, site: Site):
    if callable(vector) and not isinstance(vector, torch.Tensor):
        return vector(site)
    if isinstance(vector, dict):
        for key in (site, str(site), site.layer):
            if key in vector:
                return vector[key]
        raise InterventionError(f"No vector for {site} in the vector dict (keys are layers or sites).")
    return vector


def _resample_sources(model, prompts, sites: list[Site], reference, seed: int, chat, system, batch_size: int
                      ) -> dict[str, torch.Tensor]:
    """Full-hook sources for ``encode(prompts)``: each row gets a donor prompt's activations.

    Donors are drawn with a seeded generator (never the row itself when the reference is the
    prompt list); donor positions are right-aligned on t*; positions the donor lacks take the
    donor's mean over its prompt positions.
    """
    from .capture import run_with_cache

    batch = model.encode(prompts, chat=chat, system=system)
    same = reference is None
    ref = list(prompts) if same else list(reference)
    if not ref or (same and len(ref) < 2):
        raise InputError("Resample ablation needs at least two prompts (or a reference set) to draw donors from.")
    g = torch.Generator().manual_seed(seed)
    donors = []
    for i in range(len(batch)):
        j = int(torch.randint(len(ref) - (1 if same else 0), (1,), generator=g))
        if same and j >= i:
            j += 1
        donors.append(j)
    full = list(dict.fromkeys(Site(s.kind, s.layer) for s in sites))
    B, T = batch.input_ids.shape
    src = {s.hook_name: None for s in full}
    uniq = sorted(set(donors))
    for start in range(0, len(uniq), batch_size):
        chunk = uniq[start:start + batch_size]
        rb = model.encode([ref[j] for j in chunk], chat=chat, system=system)
        _, cache = run_with_cache(model, rb, full)
        for s in full:
            act = cache[s.hook_name]
            if src[s.hook_name] is None:
                src[s.hook_name] = torch.zeros((B, T) + tuple(act.shape[2:]), dtype=act.dtype, device=act.device)
            out = src[s.hook_name]
            for c, j in enumerate(chunk):
                off, P = int(rb.pad_offset[c]), int(rb.prompt_len[c])
                real = act[c, off:off + P]  # donor prompt positions
                mean = real.mean(0)
                for i in [i for i, d in enumerate(donors) if d == j]:
                    o_i, P_i = int(batch.pad_offset[i]), int(batch.prompt_len[i])
                    n = min(P_i, P)
                    out[i, :] = mean
                    out[i, o_i + P_i - n:o_i + P_i] = real[P - n:]  # right-aligned on t*
    return src


def ablate(model, prompts: Sequence[Any] | None, components: "Site | str | Sequence[Site | str]",
           kind: str = "zero", *, scale: float | None = None, vector: Any = None, reference: Sequence[Any] | None = None,
           pos: Pos | str = "all", seed: int = 0, chat: bool | None = None, system: str | None = None,
           batch_size: int = 16) -> list[Intervention]:
    """Intervention specs that ablate or enhance ``components``.

    Args:
        model: the :class:`~emolens.model.EmoModel`.
        prompts: the prompts the specs will run on (needed by ``mean`` when no ``reference``
            is given, and by ``resample``); ignored by ``zero``/``scale``/``add``.
        components: sites (``head(L, h)``, ``neuron(L, n)``, ``attn_out(L)``, ``resid(L)`` ...);
            single heads/neurons of a layer are merged into one spec. Empty → ``[]`` (no-op).
        kind: ``"zero"`` (h = 0), ``"mean"`` (h = mean of h over ``reference`` prompts, or over
            ``prompts``, at the positions of ``pos``), ``"resample"`` (h = the activation of
            another prompt, right-aligned on t*; drawn with ``seed``), ``"scale"`` (h *= scale) or
            ``"add"`` (h += scale * vector, scale defaulting to 1).
        vector: for ``add``: a tensor (shared), a dict ``{layer or site: tensor}``, or
            ``fn(site) -> tensor``; shapes as :class:`~emolens.interventions.Add` accepts (for
            heads a ``[n_heads, d_head]`` or flattened layer vector is sliced to the heads).
        pos: position rule where the specs act (default every position).

    ``resample`` specs are :class:`~emolens.interventions.Replace` sources built for
    ``model.encode(prompts)``: run them on exactly that batch (one forward pass over all
    ``prompts``), not in generation.

    Returns:
        a list of :class:`~emolens.interventions.Intervention` specs.
    """
    if kind not in ABLATION_KINDS:
        raise InterventionError(f"Unknown ablation kind {kind!r}; use one of {', '.join(ABLATION_KINDS)}.")
    pos = Pos.from_dict(pos) if isinstance(pos, (str, dict)) else pos
    if components is None:
        return []
    comps = [components] if isinstance(components, (Site, str, dict)) else list(components)
    if not comps:
        return []
    sites = merge_sites(as_sites(comps))
    for s in sites:
        s.validate(model)
    if kind == "zero":
        return [Zero(s, pos=pos) for s in sites]
    if kind == "scale":
        if scale is None:
            raise InterventionError("kind='scale' needs scale= (e.g. 0.0 ablates, 2.0 doubles).")
        return [Scale(s, float(scale), pos=pos) for s in sites]
    if kind == "add":
        if vector is None:
            raise InterventionError("kind='add' needs vector= (a tensor, a {layer: tensor} dict or fn(site)).")
        strength = 1.0 if scale is None else float(scale)
        return [Add(s, _vector_for(vector, s), strength=strength, pos=pos) for s in sites]
    if kind == "mean":
        from .capture import capture

        ref = list(reference) if reference is not None else (list(prompts) if prompts is not None else [])
        if not ref:
            raise InputError("Mean ablation needs reference prompts (reference=) or the prompts themselves.")
        cap = capture(model, ref, sites, pos=_reference_pos(pos), reduce="mean", batch_size=batch_size, chat=chat,
                      system=system, progress=False, desc="mean ablation")
        return [Mean(s, cap[s], pos=pos) for s in sites]
    # resample
    if prompts is None:
        raise InputError("Resample ablation needs the prompts it will run on.")
    srcs = _resample_sources(model, list(prompts), sites, reference, seed, chat, system, batch_size)
    return [Replace(s, srcs[Site(s.kind, s.layer).hook_name], pos=pos) for s in sites]


# =========================================================================================
# Choosing components
# =========================================================================================
def _cell_site(result: Result, coords: dict) -> Site:
    kind = result.kind
    if kind in ("heads", "heads_pos"):
        return Site("head", coords["layer"], coords["head"])
    if kind == "neurons":
        return Site("neuron", coords["layer"], coords["neuron"])
    if kind == "sublayers":
        lab = result.label("sublayer", coords["sublayer"])
        name = {"attn": "attn_out", "mlp": "mlp_out", 0: "attn_out", 1: "mlp_out"}.get(lab, lab)
        return Site(name, coords["layer"])
    if kind == "layers":
        return Site(result.meta.get("site_kind", "resid_post"), coords["layer"])
    raise ResultError(f"top_k_sites cannot turn a {kind!r} result into sites; it takes 'heads', 'heads_pos', "
                      "'neurons', 'sublayers' or 'layers' results (use result.top(k) for positions).")


def top_k_sites(result: Result, k: int, largest: bool = True, *, by: str = "value") -> list[Site]:
    """The ``k`` best components of a result, best first (one site per head / neuron / sublayer).

    Args:
        result: a ``heads``, ``heads_pos`` (a head counts once, at its best position),
            ``neurons``, ``sublayers`` or ``layers`` result.
        k: how many; ``0`` gives ``[]``.
        largest: True → highest scores; False → lowest.
        by: ``"value"`` ranks signed scores, ``"abs"`` ranks magnitudes.
    """
    if k < 0:
        raise InputError(f"k={k}; pass k >= 0.")
    if by not in ("value", "abs"):
        raise InputError(f"by={by!r}; use 'value' or 'abs'.")
    if k == 0:
        return []
    _cell_site(result, {ax: 0 for ax in result.axes})  # kind check before ranking
    s = result.scores
    if result.kind == "heads_pos":  # collapse positions: best cell per head
        red = s.abs() if by == "abs" else s
        s = (red.nan_to_num(float("-inf")).amax(-1) if largest else red.nan_to_num(float("inf")).amin(-1))
        base = Result("heads", s, ("layer", "head"), meta=result.meta)
    else:
        base = result
    n_finite = int(torch.isfinite(base.scores).sum())
    if k > n_finite:
        raise ResultError(f"k={k} is larger than the number of scored components ({n_finite}) in this "
                          f"{result.kind!r} result; pass k <= {n_finite}.")
    rows = base.top(k, by=by, largest=largest)
    return [_cell_site(base, r) for r in rows]


def _family_of(kind: str) -> str:
    fam = _FAMILY.get(kind)
    if fam is None:
        raise InputError(f"Unknown component kind {kind!r}; use 'head', 'neuron' or 'sublayer'.")
    return fam


def _family_size(model, fam: str, layers: Sequence[int]) -> int:
    per = {"head": model.n_heads, "neuron": model.d_mlp, "sublayer": 2}[fam]
    return per * len(layers)


def _family_site(fam: str, layer: int, i: int) -> Site:
    if fam == "head":
        return Site("head", layer, i)
    if fam == "neuron":
        return Site("neuron", layer, i)
    return Site(("attn_out", "mlp_out")[i], layer)


def random_k_sites(model, kind: str, k: int, seed: int = 0, exclude: "Sequence[Site | str]" = (), *,
                   layers: Sequence[int] | None = None) -> list[Site]:
    """``k`` random components of a family, reproducible under ``seed``.

    Args:
        kind: ``"head"``, ``"neuron"`` or ``"sublayer"`` (plural and result kinds accepted).
        exclude: components never drawn (e.g. the top-k being compared against).
        layers: restrict the draw to these layers (default all).
    """
    fam = _family_of(kind)
    if k < 0:
        raise InputError(f"k={k}; pass k >= 0.")
    layers = list(range(model.n_layers)) if layers is None else [int(L) for L in layers]
    for L in layers:
        if not 0 <= L < model.n_layers:
            raise InputError(f"Layer {L} is out of range 0..{model.n_layers - 1}.")
    per = {"head": model.n_heads, "neuron": model.d_mlp, "sublayer": 2}[fam]
    excl = {(s.kind, s.layer, s.index) for s in _components(as_sites(exclude), model)} if exclude else set()
    N = per * len(layers)
    avail = N - sum(1 for (kd, L, _) in excl if L in layers and _FAMILY.get(kd, kd) == fam)
    if k > avail:
        raise InputError(f"k={k} is larger than the number of {fam} components available ({avail}); "
                         f"pass k <= {avail}.")
    g = torch.Generator().manual_seed(int(seed))
    out: list[Site] = []
    for flat in torch.randperm(N, generator=g).tolist():
        if len(out) == k:
            break
        s = _family_site(fam, layers[flat // per], flat % per)
        if (s.kind, s.layer, s.index) not in excl:
            out.append(s)
    return out


# =========================================================================================
# Measures and curves
# =========================================================================================
def metric_measure(metric, *, batch_size: int | None = None, chat: bool | None = None,
                   system: str | None = None) -> Measure:
    """A ``measure(model, prompts, interventions) -> Tensor[n_prompts]`` from a metric.

    Runs one forward pass per batch (``batch_size=None``: all prompts at once, which resample
    specs need) with the interventions, capturing the metric's sites, and returns the metric
    per prompt (e.g. ``projection(resid(12), v)`` → paper 2's emotion score at t*).
    """
    from .interventions import HookPlan, Reader
    from .metrics import as_metric

    metric = as_metric(metric)

    def measure(model, prompts, interventions):
        prompts = list(prompts)
        step = len(prompts) if batch_size is None else batch_size
        out = []
        for s in range(0, len(prompts), step):
            batch = metric.encode(model, prompts[s:s + step], chat=chat, system=system)
            cache: dict[str, torch.Tensor] = {}
            readers = [Reader(Site(st.kind, st.layer), (lambda name: lambda v, sel, tr: cache.__setitem__(name, v))(
                st.hook_name)) for st in metric.sites]
            plan = HookPlan(model, interventions, readers)
            with plan.hooks(), torch.no_grad():
                logits = plan.forward(batch, logits_to_keep=metric.trailing_logits(batch))
            out.append(metric.per_prompt(metric(logits, batch, cache)).detach().float().cpu())
        return torch.cat(out)

    measure.__name__ = f"metric_measure({metric.name})"
    return measure


def _call_measure(measure: Measure, model, prompts, ivs) -> torch.Tensor:
    out = measure(model, prompts, ivs)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out, dtype=torch.float32)
    out = out.detach().float().cpu()
    if out.shape != (len(prompts),):
        raise MetricError(f"The measure returned shape {tuple(out.shape)}; it must return one value per prompt "
                          f"([{len(prompts)}]).")
    if not torch.isfinite(out).all():
        raise MetricError("The measure returned NaN/inf values.")
    return out


def bootstrap_mean_ci(x: Float[torch.Tensor, "n"], n_boot: int = 1000, seed: int = 0, level: float = 0.95
                      ) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``x`` (over its entries)."""
    n = x.numel()
    if n < 2 or n_boot < 1:
        m = float(x.mean())
        return m, m
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(n, (n_boot, n), generator=g)
    means = x.double()[idx].mean(1)
    a = (1 - level) / 2
    return float(torch.quantile(means, a)), float(torch.quantile(means, 1 - a))


def _curve(name_axis: str, xs: Sequence[float], effects: list[torch.Tensor], raw: list[torch.Tensor], n_boot: int,
           seed: int, meta: dict, extra_std: list[float] | None = None) -> Result:
    means = torch.tensor([float(e.mean()) for e in effects])
    lo, hi = zip(*[bootstrap_mean_ci(e, n_boot, seed) for e in effects])
    extra = {"ci_low": torch.tensor(lo), "ci_high": torch.tensor(hi),
             "value": torch.tensor([float(r.mean()) for r in raw])}
    if extra_std is not None:
        extra["std_between_draws"] = torch.tensor(extra_std)
    return Result("curve", means, (name_axis,), {name_axis: list(xs)}, extra, meta)


class _CurveAcc:
    """Per-x effects (paired against the baseline) for the top set and the random draws."""

    def __init__(self):
        self.top_eff, self.top_raw, self.rnd_eff, self.rnd_raw, self.rnd_std = [], [], [], [], []

    def add(self, base: torch.Tensor, top: torch.Tensor, draws: list[torch.Tensor]) -> None:
        self.top_eff.append(top - base)
        self.top_raw.append(top)
        if draws:
            d = torch.stack(draws)  # [n_draws, n_prompts]
            self.rnd_eff.append((d - base).mean(0))
            self.rnd_raw.append(d.mean(0))
            self.rnd_std.append(float((d - base).mean(1).std()) if len(draws) > 1 else 0.0)
        else:
            nan = torch.full_like(base, float("nan"))
            self.rnd_eff.append(nan), self.rnd_raw.append(nan), self.rnd_std.append(float("nan"))

    def results(self, axis: str, xs: list, n_boot: int, seed: int, meta: dict) -> dict[str, Result]:
        return {"top": _curve(axis, xs, self.top_eff, self.top_raw, n_boot, seed, dict(meta, selection="top")),
                "random": _curve(axis, xs, self.rnd_eff, self.rnd_raw, n_boot, seed, dict(meta, selection="random"),
                                 self.rnd_std)}


def _family_from_result(result) -> str:
    if isinstance(result, Result):
        if result.kind not in _FAMILY:
            raise ResultError(f"Effect curves need a heads/neurons/sublayers result, got {result.kind!r}.")
        return _FAMILY[result.kind]
    fams = {_FAMILY.get(s.kind) for s in result}
    if len(fams) != 1 or None in fams:
        raise InputError("Pass components of one family (all heads, all neurons or all sublayers).")
    return fams.pop()


def effect_curve(model, prompts: Sequence[Any], result: Result, measure: Measure, *,
                 ks: Sequence[int] = (0, 1, 2, 4, 8), kind: str = "zero", n_random: int = 5, seed: int = 0,
                 scale: float | None = None, vector: Any = None, reference: Sequence[Any] | None = None,
                 pos: Pos | str = "all", n_boot: int = 1000, batch_size: int = 16, largest: bool = True,
                 by: str = "value", exclude_top: bool = True, chat: bool | None = None, system: str | None = None,
                 progress: bool = True) -> dict[str, Result]:
    """Effect of ablating/enhancing the top-k components vs k random ones, over k.

    For each ``k`` the top-k components of ``result`` (:func:`top_k_sites`) and ``n_random``
    seeded random draws of k components of the same family are turned into specs with
    :func:`ablate` (``kind``/``scale``/``vector``/``reference``/``pos``) and measured. The
    effect is ``measure(with specs) - measure(without)`` per prompt (paired), averaged over
    prompts (and draws); ``k=0`` is the unablated model, effect exactly 0.

    Args:
        measure: ``measure(model, prompts, interventions) -> Tensor[n_prompts]`` (see
            :func:`metric_measure`).
        exclude_top: random draws avoid the top-``max(ks)`` components.

    Returns:
        ``{"top": Result, "random": Result}``, kind ``"curve"``, axis ``("k",)``; ``extra`` has
        ``ci_low``/``ci_high`` (bootstrap over prompts of the mean effect), ``value`` (mean raw
        measure) and for ``random`` ``std_between_draws``.
    """
    prompts = list(prompts)
    if not prompts:
        raise InputError("No prompts to measure; pass at least one.")
    ks = [int(k) for k in ks]
    if any(k < 0 for k in ks):
        raise InputError(f"ks={ks}: every k must be >= 0.")
    if kind not in ABLATION_KINDS:
        raise InterventionError(f"Unknown ablation kind {kind!r}; use one of {', '.join(ABLATION_KINDS)}.")
    fam = _family_from_result(result)
    kmax = max(ks) if ks else 0
    top_all = top_k_sites(result, kmax, largest=largest, by=by) if kmax else []  # raises if kmax too large
    total = _family_size(model, fam, range(model.n_layers))
    if exclude_top and kmax > total - kmax:
        raise InputError(f"max(ks)={kmax}: not enough non-top {fam} components ({total - kmax}) left for random "
                         "controls; lower ks or pass exclude_top=False.")
    base = _call_measure(measure, model, prompts, [])
    abl_kw = dict(kind=kind, scale=scale, vector=vector, reference=reference, pos=pos, seed=seed, chat=chat,
                  system=system, batch_size=batch_size)
    acc = _CurveAcc()
    for k in progress_bar(ks, desc=f"effect curve ({kind})", disable=not progress):
        if k == 0:  # the unablated model: no specs, effect exactly 0
            acc.add(base, base, [base] * max(n_random, 1))
            continue
        vals = _call_measure(measure, model, prompts, ablate(model, prompts, top_all[:k], **abl_kw))
        draws = []
        for r in range(n_random):
            sites = random_k_sites(model, fam, k, seed=_draw_seed(seed, r, k), exclude=top_all if exclude_top else ())
            draws.append(_call_measure(measure, model, prompts, ablate(model, prompts, sites, **abl_kw)))
        acc.add(base, vals, draws)
    meta = {**model.meta(), "method": f"ablation:{kind}", "measure": getattr(measure, "__name__", "measure"),
            "n_prompts": len(prompts), "n_random": n_random, "seed": seed, "scale": scale, "family": fam,
            "source_kind": result.kind if isinstance(result, Result) else "sites",
            "inputs_hash": inputs_hash([str(p) for p in prompts]), "effect": "measure(ablated) - measure(base)"}
    return acc.results("k", ks, n_boot, seed, meta)


def _draw_seed(seed: int, r: int, k: int) -> int:
    return (int(seed) * 1_000_003 + r * 10_007 + k) % (2 ** 62)


def scale_curve(model, prompts: Sequence[Any], result: "Result | Sequence[Site]", measure: Measure, *,
                k: int = 4, scales: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0), kind: str = "scale",
                vector: Any = None, n_random: int = 5, seed: int = 0, pos: Pos | str = "all", n_boot: int = 1000,
                largest: bool = True, by: str = "value", exclude_top: bool = True, progress: bool = True
                ) -> dict[str, Result]:
    """Effect of scaling (``kind="scale"``: h *= s) or adding ``s * vector`` (``kind="add"``) over ``s``.

    Components: the top-``k`` of ``result`` or the given sites; random controls draw the same
    number of components of the same family. ``s = 1`` (scale) or ``s = 0`` (add) is the
    unmodified model (effect exactly 0).

    Returns:
        ``{"top": Result, "random": Result}``, kind ``"curve"``, axis ``("scale",)`` with
        ``ci_low``/``ci_high``/``value`` extras (as :func:`effect_curve`).
    """
    if kind not in ("scale", "add"):
        raise InterventionError(f"scale_curve kind must be 'scale' or 'add', got {kind!r}.")
    prompts = list(prompts)
    if not prompts:
        raise InputError("No prompts to measure; pass at least one.")
    fam = _family_from_result(result)
    sites = top_k_sites(result, k, largest=largest, by=by) if isinstance(result, Result) else _components(
        as_sites(result), model)
    n = len(sites)
    neutral = 1.0 if kind == "scale" else 0.0
    base = _call_measure(measure, model, prompts, [])
    rnd_sets = [random_k_sites(model, fam, n, seed=_draw_seed(seed, r, n), exclude=sites if exclude_top else ())
                for r in range(n_random)]
    acc = _CurveAcc()
    for s in progress_bar(list(scales), desc=f"scale curve ({kind})", disable=not progress):
        if float(s) == neutral or n == 0:  # the unmodified model
            acc.add(base, base, [base] * max(n_random, 1))
            continue
        kw = dict(kind=kind, scale=float(s), vector=vector, pos=pos)
        vals = _call_measure(measure, model, prompts, ablate(model, prompts, sites, **kw))
        draws = [_call_measure(measure, model, prompts, ablate(model, prompts, rs, **kw)) for rs in rnd_sets]
        acc.add(base, vals, draws)
    meta = {**model.meta(), "method": f"{kind}_curve", "measure": getattr(measure, "__name__", "measure"),
            "n_prompts": len(prompts), "n_random": n_random, "seed": seed, "k": n, "family": fam,
            "components": [str(x) for x in sites], "inputs_hash": inputs_hash([str(p) for p in prompts]),
            "effect": "measure(modified) - measure(base)"}
    return acc.results("scale", [float(s) for s in scales], n_boot, seed, meta)
