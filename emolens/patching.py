"""Exact activation patching, batched, and verification of attribution scores.

:func:`patch` sets one node at a time to its value on the clean prompt while running the
corrupted prompt, and reports ``M(patched) - M(corrupted)`` averaged over prompt pairs (the
denoising convention of :mod:`emolens.attribution` and of TransformerLens's
``transformer_lens.patching`` helpers, whose values it reproduces).

It is fast because no patched run repeats work that the patch cannot change:

- one corrupted forward pass records every layer's input residual;
- a patch at layer ``L`` starts at block ``L`` from the cached residual
  (:meth:`~emolens.interventions.HookPlan.forward_from`: the transformers model's own forward
  with blocks ``0..L-1`` passed through, so nothing depends on a decoder layer's signature);
- many patches of the same layer run as stacked copies of the batch in one forward pass
  (``batch_size`` rows at most), each copy with its own patch.

Nodes (``nodes=``): ``"resid"`` (layer × position; ``hook_resid_pre``, or post with
``resid_site="post"``), ``"heads"`` (layer × query head, all positions, ``hook_z``),
``"heads_pos"`` (layer × head × position), ``"neurons"`` (layer × neuron, all positions,
``mlp.hook_post``; pass ``candidates`` for large models) and ``"sublayers"`` (layer ×
[attn, mlp] outputs, all positions).

:func:`verify` patches the top-k cells of an attribution result (plus random control cells)
exactly and reports Spearman/Pearson correlation and top-k overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .attribution import _Recorder, prepare_pairs, tile_batch
from .errors import InputError, MetricError, ResultError
from .interventions import HookPlan, Intervention, PrefixKV, Replace
from .metrics import Metric, as_metric
from .progress import progress_bar
from .results import Result
from .sites import Site

__all__ = ["patch", "verify", "PATCH_NODES"]

PATCH_NODES = ("resid", "heads", "heads_pos", "neurons", "sublayers")
_SUBLAYER = {"attn": 0, "mlp": 1, "attn_out": 0, "mlp_out": 1}


def _all_cells(model, nodes: str, n_pos: int) -> list[tuple[int, ...]]:
    nL = model.n_layers
    if nodes == "resid":
        return [(L, j) for L in range(nL) for j in range(n_pos)]
    if nodes == "heads":
        return [(L, h) for L in range(nL) for h in range(model.n_heads)]
    if nodes == "heads_pos":
        return [(L, h, j) for L in range(nL) for h in range(model.n_heads) for j in range(n_pos)]
    if nodes == "neurons":
        return [(L, n) for L in range(nL) for n in range(model.d_mlp)]
    return [(L, s) for L in range(nL) for s in (0, 1)]


def _shape(model, nodes: str, n_pos: int) -> tuple[int, ...]:
    nL = model.n_layers
    return {"resid": (nL, n_pos), "heads": (nL, model.n_heads), "heads_pos": (nL, model.n_heads, n_pos),
            "neurons": (nL, model.d_mlp), "sublayers": (nL, 2)}[nodes]


def _norm_cells(model, nodes: str, candidates, n_pos: int) -> list[tuple[int, ...]]:
    """Candidate cells as int tuples matching the result axes; checked against the shape."""
    if candidates is None:
        return _all_cells(model, nodes, n_pos)
    if isinstance(candidates, dict):
        candidates = [(int(L), i) for L, idx in candidates.items() for i in ([idx] if isinstance(idx, int) else idx)]
    cells: list[tuple[int, ...]] = []
    for c in candidates:
        if isinstance(c, (Site, str)):
            s = Site.parse(c)
            if nodes in ("heads", "neurons") and s.kind == ("head" if nodes == "heads" else "neuron"):
                idx = s.indices if s.indices is not None else range(model.n_heads if nodes == "heads" else model.d_mlp)
                cells += [(s.layer, int(i)) for i in idx]
                continue
            if nodes == "sublayers" and s.kind in ("attn_out", "mlp_out"):
                cells.append((s.layer, _SUBLAYER[s.kind]))
                continue
            raise InputError(f"Candidate {s} does not name a {nodes!r} cell.")
        c = tuple(c)
        if nodes == "sublayers" and len(c) == 2 and isinstance(c[1], str):
            if c[1] not in _SUBLAYER:
                raise InputError(f"Unknown sublayer {c[1]!r}; use 'attn' or 'mlp'.")
            c = (c[0], _SUBLAYER[c[1]])
        cells.append(tuple(int(x) for x in c))
    shape = _shape(model, nodes, n_pos)
    for c in cells:
        if len(c) != len(shape) or any(not 0 <= x < n for x, n in zip(c, shape)):
            raise InputError(f"Candidate {c} is outside the {nodes!r} grid of shape {shape}.")
    if not cells:
        raise InputError("The candidate list is empty; pass at least one cell (or candidates=None for all).")
    return list(dict.fromkeys(cells))


def patch(model, clean, corrupted, metric, *, nodes: str = "resid", candidates: Any = None, batch_size: int = 64,
          align: str | None = None, resid_site: str = "pre", normalize: bool = False, skip_prefix: bool = True,
          chat: bool | None = None, system: str | None = None, progress: bool = True, backend=None,
          attn: str = "auto") -> Result:
    """Exact activation patching of every cell (or of ``candidates``), batched.

    Args:
        model: the :class:`~emolens.model.EmoModel`.
        clean, corrupted: paired prompts (see :func:`~emolens.attribution.prepare_pairs`).
        metric: a :class:`~emolens.metrics.Metric` or callable ``(logits, batch, cache) -> [B]``.
        nodes: ``"resid"``, ``"heads"``, ``"heads_pos"``, ``"neurons"`` or ``"sublayers"``.
        candidates: cells to patch: int tuples in the result's axis order (``(layer, head)``,
            ``(layer, position)``, ``(layer, "attn")`` ...), sites (``head(3, 1)``,
            ``neuron(5, [1, 2])``, ``mlp_out(4)``) or ``{layer: [indices]}``; default all.
        batch_size: rows per forward pass (copies of the batch × prompt rows).
        resid_site: ``"pre"`` or ``"post"`` for ``nodes="resid"``.
        normalize: divide by ``M(clean) - M(corrupted)``.
        skip_prefix: recompute only positions from the first one where the clean and corrupted
            prompts differ (earlier positions are identical in every patched run); exact.
        backend: ``None``/``"local"``, ``"ray"`` or a :class:`~emolens.scale.ScaleConfig`: cells split
            into shards over Ray workers (:func:`emolens.scale.patch`; equal to the local result to 1e-6).
        attn: ``"auto"`` (default) runs every pass on the plain transformers modules with SDPA
            attention (no ``[heads, pos, pos]`` pattern tensors; the metric's sites permitting),
            ``"eager"`` on the bridged model; same values to fp32 rounding. See
            :class:`~emolens.interventions.HookPlan`.

    Returns:
        a :class:`~emolens.results.Result` (kinds ``resid_pos``/``heads``/``heads_pos``/``neurons``/
        ``sublayers``) of mean effects ``M(patched) - M(corrupted)``; cells not patched are NaN
        (``extra["patched"]`` marks patched cells), ``extra["stderr"]`` is the standard error over
        prompt pairs.
    """
    if backend not in (None, "local"):
        from .scale import patch as scaled_patch

        return scaled_patch(model, clean, corrupted, metric, nodes=nodes, candidates=candidates, batch_size=batch_size,
                            align=align, resid_site=resid_site, normalize=normalize, skip_prefix=skip_prefix,
                            chat=chat, system=system, backend=backend, progress=progress, attn=attn)
    metric = as_metric(metric)
    if nodes not in PATCH_NODES:
        raise InputError(f"Unknown patching nodes {nodes!r}; use one of {', '.join(PATCH_NODES)}.")
    if resid_site not in ("pre", "post"):
        raise InputError(f"resid_site={resid_site!r}; use 'pre' or 'post'.")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}; use at least 1.")
    pairs = prepare_pairs(model, clean, corrupted, metric, align=align, chat=chat, system=system)
    cells = _norm_cells(model, nodes, candidates, pairs.n_pos)
    nL = model.n_layers
    r_per = pairs.rows_per_prompt
    per_chunk = max(1, batch_size // r_per)
    chunks = pairs.chunks(per_chunk)
    by_layer: dict[int, list[tuple[int, ...]]] = {}
    for c in cells:
        by_layer.setdefault(c[0], []).append(c)

    # the activation family being patched
    if nodes == "resid":
        fam = [Site(f"resid_{resid_site}", L) for L in by_layer]
    elif nodes in ("heads", "heads_pos"):
        fam = [Site("head", L) for L in by_layer]
    elif nodes == "neurons":
        fam = [Site("neuron", L) for L in by_layer]
    else:
        fam = [Site(k, L) for L in by_layer for k in ("attn_out", "mlp_out")]
    starts = [Site("resid_pre", L) for L in range(nL)] + [Site("resid_post", nL - 1)]
    metric_sites = [Site(s.kind, s.layer) for s in metric.sites]

    # per-prompt effects and metrics, pre-allocated: each chunk writes its columns in place
    n = pairs.n_prompts
    effects = torch.empty(len(cells), n)
    cell_row = {c: i for i, c in enumerate(cells)}
    m_clean, m_corr = torch.empty(n), torch.empty(n)
    chunk_rows = [min(per_chunk, pairs.n_prompts - s) * r_per for s in range(0, pairs.n_prompts, per_chunk)]
    n_work = sum(math.ceil(len(v) / max(1, batch_size // max(1, rows))) for rows in chunk_rows
                 for v in by_layer.values())
    bar = progress_bar(range(len(chunks) + n_work), desc=f"patching ({nodes})", disable=not progress)
    it = iter(bar)
    n_forwards = 0
    prefix_used = []
    for ch in chunks:
        r = len(ch.corr)
        rec_c = _Recorder(model, fam + metric_sites, [])
        plan = HookPlan(model, [], rec_c.readers, attn=attn)
        with plan.hooks(), torch.no_grad():
            lg = plan.forward(ch.clean, logits_to_keep=metric.trailing_logits(ch.clean))
            m_clean[ch.prompts] = metric.per_prompt(metric(lg, ch.clean, rec_c.store)).float().cpu()
            ca = dict(rec_c.store)
            rec_x = _Recorder(model, fam + starts + metric_sites, [])
            plan = HookPlan(model, [], rec_x.readers, attn=attn)
            with plan.hooks():  # the corrupted run keeps every layer's keys/values for the prefix skip
                lg = plan.forward(ch.corr, logits_to_keep=metric.trailing_logits(ch.corr), keep_kv=skip_prefix)
            kv = plan.kv if skip_prefix and plan.kv is not None and len(plan.kv.kv) == nL else None
            base = metric.per_prompt(metric(lg, ch.corr, rec_x.store)).float()
            m_corr[ch.prompts] = base.cpu()
            xa = dict(rec_x.store)
        n_forwards += 2
        next(it, None)
        # Positions before the first one where clean and corrupted differ are identical in every
        # patched run (causal attention): recompute only the suffix, reusing the prefix keys/values.
        p0 = _shared_prefix(ch) if kv is not None else 0
        prefix_used.append(p0)
        ctx = _Ctx(ch, ca, xa, metric, metric_sites, p0, lg, kv, attn)
        copies = max(1, batch_size // r)
        for L, lcells in sorted(by_layer.items()):
            if nodes == "resid":  # a residual position inside the shared prefix is identical in both runs
                skip = [c for c in lcells if not bool(((ch.aligned == c[1]) & (torch.arange(
                    ch.aligned.shape[1], device=ch.aligned.device) >= p0)).any())]
                for c in skip:
                    effects[cell_row[c], ch.prompts] = 0.0
                lcells = [c for c in lcells if c not in set(skip)]
            for g0 in range(0, len(lcells), copies):
                group = lcells[g0:g0 + copies]
                vals = _run_group(model, nodes, resid_site, L, group, ctx)
                n_forwards += 1
                eff = vals.reshape(len(group), ch.n) - base[None]  # [copies, n_chunk]
                for c, e in zip(group, eff):
                    effects[cell_row[c], ch.prompts] = e.cpu()
                next(it, None)
        del ca, xa, ctx, lg, kv

    mc, mx = m_clean, m_corr
    scale = 1.0
    if normalize:
        gap = float(mc.mean() - mx.mean())
        if abs(gap) < 1e-8 * (1 + abs(float(mc.mean()))):
            raise MetricError("normalize=True but the metric is the same on clean and corrupted prompts.")
        scale = 1.0 / gap
    shape = _shape(model, nodes, pairs.n_pos)
    scores = torch.full(shape, float("nan"))
    stderr = torch.full(shape, float("nan"))
    patched = torch.zeros(shape)
    for c, i in cell_row.items():
        x = effects[i] * scale
        scores[c] = x.mean()
        stderr[c] = x.std() / n ** 0.5 if n > 1 else 0.0
        patched[c] = 1.0
    kind, axes = {"resid": ("resid_pos", ("layer", "position")), "heads": ("heads", ("layer", "head")),
                  "heads_pos": ("heads_pos", ("layer", "head", "position")),
                  "neurons": ("neurons", ("layer", "neuron")),
                  "sublayers": ("sublayers", ("layer", "sublayer"))}[nodes]
    labels: dict[str, list] = {"layer": [f"L{L}" for L in range(nL)]}
    if "position" in axes:
        labels["position"] = pairs.position_labels
    if nodes == "sublayers":
        labels["sublayer"] = ["attn", "mlp"]
    extra = {"stderr": stderr, "patched": patched}
    from .attribution import CONVENTION

    meta = {**model.meta(), "inputs_hash": pairs.inputs_hash, "metric": metric.name, "method": "exact",
            "n_prompts": n, "convention": CONVENTION, "clean_metric": float(mc.mean()),
            "corrupted_metric": float(mx.mean()), "normalized": normalize, "align": align, "node_group": nodes,
            "resid_site": f"resid_{resid_site}", "n_cells": len(cells), "n_forward_passes": n_forwards,
            "shared_prefix_skipped": prefix_used}
    return Result(kind, scores, axes, labels, extra, meta)


@dataclass
class _Ctx:
    """What the batched patched runs of one chunk share."""

    ch: Any
    ca: dict
    xa: dict
    metric: Metric
    metric_sites: list
    p0: int
    corr_logits: torch.Tensor
    kv: PrefixKV | None  # the corrupted run's keys/values, all positions
    attn: str = "auto"
    _kv: dict = field(default_factory=dict)

    def prefix_kv(self, model, reps: int) -> PrefixKV:
        if reps not in self._kv:
            self._kv[reps] = self.kv.prefix(self.p0, reps)
        return self._kv[reps]


def _shared_prefix(ch) -> int:
    """First padded position where any clean and corrupted row differ (token or padding)."""
    diff = (ch.clean.input_ids != ch.corr.input_ids) | (ch.clean.attention_mask != ch.corr.attention_mask)
    cols = diff.any(0).nonzero()
    T = ch.corr.input_ids.shape[1]
    return int(cols[0]) if cols.numel() else T - 1


def _run_group(model, nodes: str, resid_site: str, L: int, group: list[tuple[int, ...]], ctx: _Ctx) -> torch.Tensor:
    """One batched forward: ``len(group)`` copies of the chunk, copy ``c`` patched at ``group[c]``."""
    ch, ca, xa, metric, p0 = ctx.ch, ctx.ca, ctx.xa, ctx.metric, ctx.p0
    reps, r = len(group), len(ch.corr)
    tb = tile_batch(ch.corr, reps)
    valid, aligned = ch.valid[:, p0:], ch.aligned[:, p0:]
    ivs: list[Intervention] = []

    def both(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return ca[name][:, p0:], xa[name][:, p0:]

    def rows(c: int) -> slice:
        return slice(c * r, (c + 1) * r)

    site = None
    if nodes == "resid":
        site = Site(f"resid_{resid_site}", L)
        clean_a, corr_a = both(site.hook_name)
        start = L if resid_site == "pre" else L + 1
        resid_in = corr_a.repeat(reps, 1, 1)
        for c, (_, j) in enumerate(group):
            m = (aligned == j)[..., None]
            resid_in[rows(c)] = torch.where(m, clean_a, corr_a)
    else:
        start = L
        resid_in = xa[Site("resid_pre", L).hook_name][:, p0:].repeat(reps, 1, 1)
        if nodes in ("heads", "heads_pos", "neurons"):
            fsite = Site("head" if nodes != "neurons" else "neuron", L)
            clean_a, corr_a = both(fsite.hook_name)
            # siblings of a patched component at layer L are unaffected by it, so the stacked source can
            # carry the cached corrupted values everywhere else
            src = corr_a.repeat((reps,) + (1,) * (corr_a.ndim - 1))
            for c, cell in enumerate(group):
                i = cell[1]
                m = (aligned == cell[2]) if nodes == "heads_pos" else valid
                m = m.reshape(m.shape + (1,) * (clean_a.ndim - 3))
                src[rows(c), :, i] = torch.where(m, clean_a[:, :, i], corr_a[:, :, i])
            ivs.append(Replace(fsite, src))
        else:  # sublayers: the MLP output depends on a patched attention output → restrict by rows
            for c, (_, s) in enumerate(group):
                ssite = Site(("attn_out", "mlp_out")[s], L)
                clean_a, corr_a = both(ssite.hook_name)
                src = torch.where(valid[..., None], clean_a, corr_a).repeat(reps, 1, 1)
                ivs.append(Replace(ssite, src, rows=tuple(range(c * r, (c + 1) * r))))
    # metric sites: corrupted values before the start layer and in the shared prefix
    cache = {s.hook_name: xa[s.hook_name].repeat((reps,) + (1,) * (xa[s.hook_name].ndim - 1)) for s in ctx.metric_sites}
    if nodes == "resid":
        for s in ctx.metric_sites:
            if s == site:
                cache[s.hook_name][:, p0:] = resid_in
    rec = _Recorder(model, list(ctx.metric_sites), [])
    plan = HookPlan(model, ivs, rec.readers, attn=ctx.attn)
    T = ch.corr.input_ids.shape[1]
    keep = metric.trailing_logits(tb)
    kw = {"prefix": p0, "prefix_kv": ctx.prefix_kv(model, reps)} if p0 else {}
    with plan.hooks(), torch.no_grad():
        logits = plan.forward_from(start, resid_in, tb, logits_to_keep=keep, **kw)
    if p0 and (keep is None or T - keep < p0):  # the metric reads logits inside the shared prefix
        logits[:, :p0] = ctx.corr_logits[:, :p0].repeat(reps, 1, 1)
    for name, v in rec.store.items():
        cache[name][:, p0:] = v
    return metric.per_prompt(metric(logits, tb, cache)).float()


# =========================================================================================
# Verification
# =========================================================================================
_KIND_TO_NODES = {"heads": "heads", "heads_pos": "heads_pos", "neurons": "neurons", "resid_pos": "resid",
                  "sublayers": "sublayers"}


def verify(model, attribution_result: Result, clean, corrupted, metric, k: int = 20, *, n_control: int | None = None,
           seed: int = 0, batch_size: int = 64, align: str | None = None, chat: bool | None = None,
           system: str | None = None, progress: bool = True) -> dict:
    """Patch an attribution result's top-k cells (and random controls) exactly and compare.

    Args:
        attribution_result: a ``heads``, ``heads_pos``, ``neurons``, ``resid_pos`` or ``sublayers``
            result from :func:`~emolens.attribution.attribute` (same prompts and metric).
        k: top cells by ``|score|``.
        n_control: extra random cells (seeded) patched as controls so correlations and overlap
            are not computed on the top-k alone (default ``k``; all remaining cells when fewer).

    Returns:
        ``{"spearman", "pearson", "topk_overlap", "exact", "cells", "attribution_values",
        "exact_values", "n_cells"}``: correlations over the patched cells; ``topk_overlap`` =
        |top-k by |attribution| ∩ top-k by |exact|| / k among them; ``exact`` is the patching
        :class:`~emolens.results.Result` (NaN outside the patched cells).
    """
    from scipy import stats

    res = attribution_result
    nodes = _KIND_TO_NODES.get(res.kind)
    if nodes is None:
        raise ResultError(f"verify() takes heads/heads_pos/neurons/resid_pos/sublayers results, not {res.kind!r}.")
    flat = res.scores.flatten()
    n_cells = flat.numel()
    if not 1 <= k <= n_cells:
        raise InputError(f"k={k}: the result has {n_cells} cells; pass 1 <= k <= {n_cells}.")
    key = torch.where(torch.isfinite(flat), flat.abs(), torch.tensor(-1.0))
    order = torch.argsort(key, descending=True)
    top = order[:k].tolist()
    rest = order[k:]
    n_control = k if n_control is None else int(n_control)
    g = torch.Generator().manual_seed(int(seed))
    ctrl = rest[torch.randperm(rest.numel(), generator=g)[:n_control]].tolist() if n_control > 0 else []
    idx = top + ctrl
    cells = [tuple(int(x) for x in torch.unravel_index(torch.tensor(i), res.shape)) for i in idx]
    resid_site = str(res.meta.get("resid_site", "resid_pre")).replace("resid_", "")
    exact = patch(model, clean, corrupted, metric, nodes=nodes, candidates=cells, batch_size=batch_size, align=align,
                  resid_site=resid_site, normalize=bool(res.meta.get("normalized", False)), chat=chat, system=system,
                  progress=progress)
    if exact.shape != res.shape:
        raise ResultError(f"The attribution result has shape {res.shape} but patching these inputs gives "
                          f"{exact.shape}; verify with the prompts the attribution was computed on.")
    a = torch.stack([res.scores[c] for c in cells]).double()
    e = torch.stack([exact.scores[c] for c in cells]).double()
    if len(cells) >= 3 and a.std() > 0 and e.std() > 0:
        sp = float(stats.spearmanr(a.numpy(), e.numpy()).statistic)
        pe = float(stats.pearsonr(a.numpy(), e.numpy()).statistic)
    else:
        sp = pe = float("nan")
    top_e = set(torch.argsort(e.abs(), descending=True)[:k].tolist())
    top_a = set(torch.argsort(a.abs(), descending=True)[:k].tolist())
    overlap = len(top_e & top_a) / k
    if res.meta.get("metric") not in (None, exact.meta["metric"]):
        exact.meta["warning"] = (f"attribution used metric {res.meta.get('metric')!r}, verification "
                                 f"{exact.meta['metric']!r}")
    return {"spearman": sp, "pearson": pe, "topk_overlap": overlap, "exact": exact, "cells": cells,
            "attribution_values": a.float(), "exact_values": e.float(), "n_cells": len(cells)}
