"""Lean capture: read chosen sites over prompts or a whole dataset, in batches.

Only the hooks of the requested sites are registered (through the intervention engine's
:class:`~emolens.interventions.HookPlan`), and reductions stream: ``mean``, ``sum`` and
``group_mean`` keep one running float64 sum per site (and group), so memory is O(sites), not
O(dataset). ``reduce="none"`` keeps one row per item at the chosen positions.

Example::

    res = capture(m, texts, [resid(8), neuron(8)], pos=Pos.last(), reduce="group_mean", groups=labels)
    res["resid_post.8"]            # [n_groups, d_model]
    res.groups                     # group labels, in first-seen order
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Sequence

import torch
from jaxtyping import Float

from .errors import InputError, ResultError
from .interventions import HookPlan, Intervention, Reader
from .progress import progress_bar
from .sites import Pos, Site, as_sites

REDUCTIONS = ("mean", "sum", "group_mean", "none")


@dataclass
class CaptureResult:
    """Captured activations keyed by site string (``str(site)``, e.g. ``"resid_post.8"``).

    Shapes (``dims`` = the site's component shape: ``[d_model]``, ``[n_sel, d_head]``, ``[n_sel]``):
    ``mean``/``sum`` → ``[*dims]``; ``group_mean`` → ``[n_groups, *dims]``; ``none`` →
    ``[n_items, *dims]`` (``[n_items, k, *dims]`` when the rule selects k > 1 positions).
    """

    data: dict[str, torch.Tensor]
    reduce: str
    pos: Pos
    n_items: int
    counts: torch.Tensor  # selected positions per group (or total), for weighting/merging
    groups: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __getitem__(self, site: "Site | str") -> torch.Tensor:
        key = str(Site.parse(site)) if not isinstance(site, str) or site not in self.data else site
        if key not in self.data:
            raise ResultError(f"No capture for {key!r}; captured sites: {', '.join(self.data)}.")
        return self.data[key]

    def __contains__(self, site) -> bool:
        try:
            self[site]
            return True
        except Exception:
            return False

    @property
    def sites(self) -> list[Site]:
        return [Site.parse(k) for k in self.data]

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors) and ``path.with_suffix('.json')`` (metadata)."""
        from .io import write_json, write_safetensors

        p = Path(path).with_suffix(".safetensors")
        write_safetensors(p, dict(self.data) | {"__counts__": self.counts})
        write_json(p.with_suffix(".json"), {
            "reduce": self.reduce, "pos": self.pos.to_dict(), "n_items": self.n_items,
            "groups": [str(g) for g in self.groups], "meta": self.meta})
        return p

    @classmethod
    def load(cls, path: str | Path) -> "CaptureResult":
        from safetensors.torch import load_file

        p = Path(path).with_suffix(".safetensors")
        data = load_file(str(p))
        meta = json.loads(p.with_suffix(".json").read_text())
        counts = data.pop("__counts__")
        return cls(data, meta["reduce"], Pos.from_dict(meta["pos"]), meta["n_items"], counts, meta["groups"],
                   meta.get("meta", {}))


class _Accumulator:
    """Streaming per-site reduction; the reader callback of one site."""

    def __init__(self, reduce: str, n_groups: int):
        self.reduce = reduce
        self.n_groups = n_groups
        self.total: torch.Tensor | None = None  # [n_groups, *dims] float64
        self.items: list[torch.Tensor] = []
        self.group_ids: torch.Tensor | None = None  # for the current batch
        # When a list, each batch's float64 contribution is also kept (CPU) so that shards computed
        # elsewhere can be folded into one total in the local batch order (emolens.scale).
        self.record: list | None = None

    def __call__(self, values: torch.Tensor, sel: torch.Tensor, tracker) -> None:
        v = values.detach()
        if self.reduce == "none":
            k = int(sel[0].sum())
            if not (sel.sum(1) == k).all():
                raise InputError("reduce='none' needs a position rule that selects the same number of "
                                 "positions in every row (Pos.last(), Pos.index(...)).")
            per = v[sel].reshape(v.shape[0], k, *v.shape[2:])
            self.items.append((per[:, 0] if k == 1 else per).float().cpu())
            return
        flat = v.flatten(2)  # [b, p, D]
        w = sel.to(flat.dtype)  # [b, p]
        if self.total is None:
            self.total = torch.zeros((self.n_groups, flat.shape[-1]), dtype=torch.float64, device=v.device)
            self.dims = tuple(v.shape[2:])
        # Sum within the batch in the model dtype (cheap), accumulate across batches in float64.
        if self.n_groups == 1:
            part = torch.einsum("bp,bpd->d", w, flat).double()
            self.total[0] += part
        else:
            part = torch.einsum("bp,bpd->bd", w, flat).double()
            self.total.index_add_(0, self.group_ids, part)
        if self.record is not None:
            self.record.append(part.cpu())


def capture(model, prompts: "Sequence[Any] | Any", sites: "Site | str | Sequence[Site | str]", *,
            pos: Pos | str = "last", reduce: str = "mean", groups: Sequence[Hashable] | None = None,
            batch_size: int = 16, chat: bool | None = None, system: str | None = None,
            interventions: Sequence[Intervention] | None = None, progress: bool = True,
            desc: str = "capture", backend=None, attn: str = "auto") -> CaptureResult:
    """Capture ``sites`` over ``prompts`` with a streaming reduction.

    Args:
        model: an :class:`~emolens.model.EmoModel`.
        prompts: user strings / message lists (chat) or raw texts (``chat=False``), or a
            ``datasets.Dataset`` column.
        sites: sites to read (after any interventions).
        pos: position rule (default ``"last"``: t*, the last prompt token).
        reduce: ``mean``, ``sum``, ``group_mean`` (needs ``groups``) or ``none`` (per item).
        groups: one hashable label per prompt, for ``group_mean``.
        batch_size: prompts per forward pass.
        interventions: applied during capture (e.g. to read a steered model).
        backend: ``None``/``"local"`` (this process), ``"ray"`` or a :class:`~emolens.scale.ScaleConfig`:
            prompts split into shards over Ray workers; float64 sums are folded in the local batch
            order, so the result is bitwise the local one (see :func:`emolens.scale.capture`).
        attn: ``"auto"`` (default: the plain transformers modules with SDPA attention, which
            materialises no ``[heads, pos, pos]`` pattern; every capture site has a place there),
            ``"sdpa"`` or ``"eager"`` (the bridged model, TransformerLens's eager attention; same
            values to fp32 rounding). See :class:`~emolens.interventions.HookPlan`.

    Returns:
        :class:`CaptureResult`.
    """
    from .model import _positive_int, _prompt_list

    prompts = _prompt_list(prompts)  # one string is one prompt; None / non-strings: InputError naming the fix
    batch_size = _positive_int("batch_size", batch_size)
    if backend not in (None, "local"):
        from .scale import capture as scaled_capture

        return scaled_capture(model, prompts, sites, pos=pos, reduce=reduce, groups=groups, batch_size=batch_size,
                              chat=chat, system=system, interventions=interventions, backend=backend, attn=attn)
    pos, site_list, labels, gid_all = _prepare(prompts, sites, pos, reduce, groups)
    accs, counts = _stream(model, prompts, site_list, pos, reduce, gid_all, max(len(labels), 1), batch_size=batch_size,
                           chat=chat, system=system, interventions=interventions, progress=progress, desc=desc,
                           attn=attn)
    totals = {k: a.items if reduce == "none" else (a.total, a.dims) for k, a in accs.items()}
    return _finish(totals, reduce, pos, counts, labels, len(prompts), model.meta())


def _prepare(prompts: list, sites, pos, reduce: str, groups):
    """Checked arguments: (pos rule, sites, group labels in first-seen order, group id per prompt)."""
    if reduce not in REDUCTIONS:
        raise InputError(f"Unknown reduce={reduce!r}; use one of {', '.join(REDUCTIONS)}.")
    pos = Pos.from_dict(pos) if isinstance(pos, (str, dict)) else pos
    site_list = as_sites(sites)
    if reduce == "group_mean":
        if groups is None or len(groups) != len(prompts):
            raise InputError(f"reduce='group_mean' needs one group label per prompt "
                             f"({len(prompts)} prompts, {None if groups is None else len(groups)} labels).")
        labels = list(dict.fromkeys(groups))
        gid_all = torch.tensor([labels.index(g) for g in groups])
    else:
        labels, gid_all = [], torch.zeros(len(prompts), dtype=torch.long)
    return pos, site_list, labels, gid_all


def _stream(model, prompts: list, site_list: list, pos: Pos, reduce: str, gid_all: torch.Tensor, n_groups: int, *,
            batch_size: int, chat, system, interventions, progress: bool = False, desc: str = "capture",
            record: bool = False, attn: str = "auto") -> tuple[dict[str, _Accumulator], torch.Tensor]:
    """The batched capture loop: per-site accumulators and float64 selected-position counts per group.

    With ``record``, every accumulator also keeps each batch's float64 contribution (``.record``).
    """
    accs = {str(s): _Accumulator(reduce, n_groups) for s in site_list}
    if record:
        for a in accs.values():
            a.record = []
    readers = [Reader(s, accs[str(s)], pos) for s in site_list]
    plan = HookPlan(model, interventions, readers, attn=attn)
    counts = torch.zeros(n_groups, dtype=torch.float64)
    starts = range(0, len(prompts), batch_size)
    with plan.hooks(), torch.no_grad():
        for s in progress_bar(starts, desc=desc, disable=not progress or len(starts) < 2):
            batch = model.encode(prompts[s:s + batch_size], chat=chat, system=system)
            gids = gid_all[s:s + batch_size].to(model.device)
            for a in accs.values():
                a.group_ids = gids
            plan.forward(batch)
            plan.tracker.set_batch(batch)
            sel = plan.tracker.select(pos, len(batch), batch.input_ids.shape[1])
            counts.index_add_(0, gids.cpu(), sel.sum(1).to(torch.float64).cpu())
    return accs, counts


def _finish(totals: dict, reduce: str, pos: Pos, counts: torch.Tensor, labels: list, n_items: int,
            model_meta: dict) -> CaptureResult:
    """The result from float64 totals ``{site: (total [n_groups, D], dims)}`` (or item lists for ``none``)."""
    n_groups = counts.shape[0]
    if (counts == 0).any() and reduce in ("mean", "group_mean"):
        raise InputError(f"The position rule {pos} selected no positions"
                         + (f" for group {labels[int((counts == 0).nonzero()[0])]!r}" if labels else "")
                         + "; pick a rule that exists in the prompts.")
    data = {}
    for key, t in totals.items():
        if reduce == "none":
            data[key] = torch.cat(t)
            continue
        total, dims = t
        tot = total if reduce == "sum" else total / counts.to(total.device)[:, None]
        tot = tot.float().cpu().reshape((n_groups,) + tuple(dims))
        data[key] = tot if reduce == "group_mean" else tot[0]
    return CaptureResult(data, reduce, pos, n_items, counts.float(), labels, {**model_meta, "sites": list(data)})


def run_with_cache(model, prompts, sites: "Site | str | Sequence[Site | str]", *,
                   interventions: Sequence[Intervention] | None = None, chat: bool | None = None,
                   system: str | None = None, grad: bool = False, attn: str = "auto"
                   ) -> tuple[Float[torch.Tensor, "batch pos vocab"], dict[str, torch.Tensor]]:
    """One forward pass returning logits and the full activations of ``sites``.

    Returns ``(logits, cache)`` with ``cache[hook_name]`` of the full hook shape
    (``[batch, pos, d_model]``, ``[batch, pos, n_heads, d_head]``, ``[batch, pos, d_mlp]``), left-padded
    like the batch. With ``grad=True`` the tensors stay in the autograd graph (for attribution).
    ``attn`` as in :func:`capture` (default SDPA on the plain modules).
    """
    from .model import Batch

    batch = prompts if isinstance(prompts, Batch) else model.encode(prompts, chat=chat, system=system)
    cache: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(values, sel, tracker):
            cache[name] = values if grad else values.detach()
        return fn

    full = [Site(s.kind, s.layer) for s in as_sites(sites)]
    readers = [Reader(s, keep(s.hook_name)) for s in dict.fromkeys(full)]
    plan = HookPlan(model, interventions, readers, attn=attn)
    with plan.hooks():
        logits = plan.forward(batch, grad=grad)
    return logits, cache
