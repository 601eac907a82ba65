"""The intervention engine: the one place where emolens registers hooks.

An intervention is a small, serialisable spec: *what* to do (:class:`Add`, :class:`Scale`,
:class:`Set`, :class:`Zero`, :class:`Mean`, :class:`Replace`), *where* (a :class:`~emolens.sites.Site`),
*when* (a :class:`~emolens.sites.Pos` rule) and optionally *which batch rows*. Steering,
ablation, enhancement, activation patching and circuit modulation are all lists of these.

:func:`run` (one forward pass), :func:`generate` (KV-cached generation) and
:mod:`emolens.capture` (streaming reads) all go through :class:`HookPlan`, which groups the
specs by hook, adds one position tracker on ``hook_embed`` so position rules mean the same thing
in a prompt pass and in every cached generation step, and registers everything through
``TransformerBridge.hooks`` (so hooks are always removed afterwards). For generation, and for
capture, patching and attribution (``HookPlan(attn="auto")``) whenever no hook needs the bridge's
eager attention, the same hook functions are placed on plain transformers modules sharing the
weights (:class:`HFPlacement`, SDPA attention), which runs at raw transformers speed.

Example::

    from emolens import load_model, resid, head, Pos
    from emolens.interventions import Add, Zero
    m = load_model()
    joy = ...  # [d_model] vector
    texts = m.generate(["How was your day?"], interventions=[
        Add(resid(8), joy, strength=4.0, pos=Pos.all()),     # steer
        Zero(head(10, 3)),                                   # ablate one head
    ])
"""

from __future__ import annotations

import contextlib
import json
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from jaxtyping import Bool, Float

from .errors import InterventionError, SiteError
from .sites import Pos, Site

__all__ = ["Intervention", "Add", "Scale", "Set", "Zero", "Mean", "Replace", "Reader", "HookReader", "HookPlan",
           "PrefixKV", "HFPlacement", "run", "generate", "rows_slice", "to_json", "from_json", "save_interventions", "load_interventions"]


# =========================================================================================
# Tensor helpers
# =========================================================================================
def _tensor(x: Any, what: str) -> torch.Tensor:
    try:
        t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise InterventionError(f"The {what} must be numbers (a tensor, array, list or float), not "
                                f"{type(x).__name__} {str(x)[:40]!r}.") from None
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = "NaN" if torch.isnan(t).any() else "inf"
        raise InterventionError(f"The {what} contains {bad} values; check how it was computed "
                                "(e.g. a direction normalised by a zero norm).")
    return t


def _tensor_to_json(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "data": t.detach().float().cpu().flatten().tolist()}


def _tensor_from_json(d: Any) -> Any:
    if isinstance(d, dict) and "shape" in d and "data" in d:
        return torch.tensor(d["data"], dtype=torch.float32).reshape(d["shape"])
    return d


def component_view(site: Site, act: torch.Tensor) -> torch.Tensor:
    """The selected components of a full hook activation.

    ``[b, p, d_model]`` for residual/sublayer sites, ``[b, p, n_sel, d_head]`` for heads,
    ``[b, p, n_sel]`` for neurons (``n_sel`` = all when ``index`` is None).
    """
    idx = site.indices
    if idx is None:
        return act
    return act[:, :, list(idx)]


def _write_components(site: Site, act: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    idx = site.indices
    if idx is None:
        return new
    out = act.clone()  # out of place: keeps autograd intact for attribution
    out[:, :, list(idx)] = new
    return out


def _site_rms(site: Site, act: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
    """RMS at each position: over d_model (residual), d_head (per head), or all d_mlp (neurons)."""
    if site.kind == "neuron":
        return act.float().pow(2).mean(-1, keepdim=True).add(1e-12).sqrt().to(act.dtype)
    return sub.float().pow(2).mean(-1, keepdim=True).add(1e-12).sqrt().to(act.dtype)


# =========================================================================================
# Specs
# =========================================================================================
OPS: dict[str, type["Intervention"]] = {}


@dataclass
class Intervention:
    """Base spec. ``rows`` limits it to some batch rows (``None`` = all)."""

    site: Site
    pos: Pos = field(default_factory=Pos.all, kw_only=True)
    rows: tuple[int, ...] | None = field(default=None, kw_only=True)
    op: ClassVar[str] = ""
    _tensor_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.op:
            OPS[cls.op] = cls

    def __post_init__(self) -> None:
        self.site = Site.parse(self.site)
        if isinstance(self.pos, (str, dict)):
            self.pos = Pos.from_dict(self.pos)
        if self.rows is not None:
            self.rows = tuple(int(r) for r in self.rows)

    # -- to implement ------------------------------------------------------------------------
    def candidate(self, act: torch.Tensor, sub: torch.Tensor, model) -> torch.Tensor:
        """New values for the selected components (same shape as ``sub``)."""
        raise NotImplementedError

    def check(self, model) -> None:
        """Validate against a model (widths, ranges); raise InterventionError/SiteError."""
        self.site.validate(model)
        if self.site.kind == "resid_mid" and not (isinstance(self, Add) and not self.rms):
            raise InterventionError(
                f"{type(self).__name__} cannot write {self.site}: TransformerLens reads resid_mid at the MLP "
                "norm's input, where an edit would reach the MLP but not the residual stream. Use Add "
                "(without rms) on resid_mid, which emolens applies to the attention output, or write "
                f"attn_out.{self.site.layer} / resid_post.{self.site.layer - 1} instead.")

    @property
    def write_hook(self) -> str:
        """Hook where the edit happens. ``resid_mid`` aliases the MLP norm's input, so an additive
        resid_mid edit is applied to the attention output (identical effect on the residual)."""
        if self.site.kind == "resid_mid":
            return f"blocks.{self.site.layer}.hook_attn_out"
        return self.site.hook_name

    # -- engine ------------------------------------------------------------------------------
    def apply(self, act: torch.Tensor, sel: Bool[torch.Tensor, "batch pos"], model) -> torch.Tensor:
        sub = component_view(self.site, act)
        cand = self.candidate(act, sub, model).to(sub.dtype)
        m = sel.reshape(sel.shape + (1,) * (sub.ndim - 2))
        return _write_components(self.site, act, torch.where(m, cand, sub))

    def _vector_shape(self, model, v: torch.Tensor, what: str) -> torch.Tensor:
        """Broadcastable payload for the selected components (checks width)."""
        s = self.site
        n_sel = len(s.indices) if s.indices is not None else (model.n_heads if s.kind == "head" else
                                                              model.d_mlp if s.kind == "neuron" else 1)
        if s.kind == "head":
            if v.ndim == 1 and v.numel() == model.d_head:
                return v
            if v.numel() == n_sel * model.d_head:
                return v.reshape(n_sel, model.d_head)
            if s.indices is not None and v.numel() == model.n_heads * model.d_head:  # flattened full layer
                return v.reshape(model.n_heads, model.d_head)[list(s.indices)]
            exp = f"[{model.d_head}] or [{n_sel}, {model.d_head}]"
        elif s.kind == "neuron":
            if v.ndim == 0 or v.numel() == n_sel:
                return v.reshape(-1) if v.ndim else v
            if s.indices is not None and v.numel() == model.d_mlp:  # full layer vector
                return v.reshape(-1)[list(s.indices)]
            exp = f"a scalar or [{n_sel}]"
        else:
            if v.ndim == 0 or v.shape == (model.d_model,):
                return v
            exp = f"[{model.d_model}] (d_model)"
        raise InterventionError(f"{type(self).__name__} {what} at {s} has shape {tuple(v.shape)}; "
                                f"{model.name} needs {exp}.")

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict[str, Any] = {"op": self.op, "site": self.site.to_dict(), "pos": self.pos.to_dict(),
                             "rows": list(self.rows) if self.rows is not None else None}
        for f in fields(self):
            if f.name in ("site", "pos", "rows"):
                continue
            v = getattr(self, f.name)
            d[f.name] = _tensor_to_json(v) if isinstance(v, torch.Tensor) else v
        return d

    @staticmethod
    def from_dict(d: dict) -> "Intervention":
        d = dict(d)
        op = d.pop("op", None)
        if op not in OPS:
            raise InterventionError(f"Unknown intervention op {op!r}; valid ops: {', '.join(sorted(OPS))}.")
        kw = {k: _tensor_from_json(v) for k, v in d.items()}
        kw["site"] = Site.from_dict(kw["site"])
        kw["pos"] = Pos.from_dict(kw.get("pos", "all"))
        return OPS[op](**kw)


@dataclass
class Add(Intervention):
    """``h += strength * vector`` (times the site's RMS at that position when ``rms=True``).

    ``vector``: ``[d_model]`` for residual/sublayer sites; ``[d_head]`` or ``[n_sel, d_head]`` (or
    the flattened ``[n_heads*d_head]`` layer vector) for heads; a scalar or ``[n_sel]`` (or
    ``[d_mlp]``) for neurons.

    Per-request steering: ``per_row=True`` makes ``vector`` ``[batch, *payload]`` (row ``i`` steers
    prompt ``i``), and ``strength`` may be one number per row (``[batch]``); both cover the whole
    prompt list of :meth:`~emolens.model.EmoModel.generate` (sliced per chunk, :func:`rows_slice`).
    """

    vector: torch.Tensor = None  # type: ignore[assignment]
    strength: Any = 1.0
    rms: bool = False
    per_row: bool = False
    op: ClassVar[str] = "add"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vector is None:
            raise InterventionError("Add needs a vector.")
        self.vector = _tensor(self.vector, "Add vector")
        if isinstance(self.strength, bool):
            raise InterventionError(f"Add strength must be a number, not {self.strength!r}; pass e.g. strength=2.0.")
        if isinstance(self.strength, numbers.Real) or (isinstance(self.strength, torch.Tensor)
                                                       and self.strength.ndim == 0):
            self.strength = float(self.strength)
            if not torch.isfinite(torch.tensor(float(self.strength))):
                raise InterventionError(f"Add strength {self.strength} is not finite.")
        else:  # one strength per batch row (per-request steering)
            if isinstance(self.strength, str) or not isinstance(self.strength, (torch.Tensor, Sequence)):
                raise InterventionError(f"Add strength must be a number or one number per batch row, not "
                                        f"{type(self.strength).__name__} {self.strength!r}; pass e.g. strength=2.0.")
            self.strength = _tensor(self.strength, "Add strength").float()
            if self.strength.ndim != 1:
                raise InterventionError(f"Add strength has shape {tuple(self.strength.shape)}; pass a number or "
                                        "one strength per batch row ([batch]).")

    @property
    def n_rows(self) -> int | None:
        """Rows the per-row payload covers (``None`` when the spec applies the same edit to every row)."""
        if self.per_row:
            return self.vector.shape[0]
        if isinstance(self.strength, torch.Tensor):
            return self.strength.shape[0]
        return None

    def check(self, model) -> None:
        super().check(model)
        if self.per_row:
            if self.vector.ndim < 1 or self.vector.shape[0] < 1:
                raise InterventionError("Add(per_row=True) needs a vector with a leading batch axis [batch, ...].")
            self._vector_shape(model, self.vector[0], "vector row")
        else:
            self._vector_shape(model, self.vector, "vector")
        if self.per_row and isinstance(self.strength, torch.Tensor) and self.strength.shape[0] != self.vector.shape[0]:
            raise InterventionError(f"Add has {self.vector.shape[0]} vector rows but {self.strength.shape[0]} "
                                    "strengths; pass one of each per batch row.")

    def rows_slice(self, start: int, stop: int) -> "Add":
        """The same spec for batch rows ``start..stop-1`` (per-row payloads are sliced; for chunked runs)."""
        if self.n_rows is None:
            return self
        if stop > self.n_rows:
            raise InterventionError(f"A per-row Add covers {self.n_rows} rows but the prompts have at least {stop}; "
                                    "pass one vector/strength per prompt.")
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.per_row:
            kw["vector"] = self.vector[start:stop]
        if isinstance(self.strength, torch.Tensor):
            kw["strength"] = self.strength[start:stop]
        return Add(**kw)

    def candidate(self, act, sub, model):
        B = act.shape[0]
        if self.n_rows is not None and self.n_rows != B:
            raise InterventionError(f"A per-row Add at {self.site} has {self.n_rows} rows but the batch has {B}; "
                                    "pass one vector/strength per prompt of the batch.")
        if self.per_row:
            v = self._row_payload(model).to(sub.device, sub.dtype)
            v = v.reshape((B, 1) + v.shape[1:])  # [B, 1, ...]: broadcast over positions
        else:
            v = self._vector_shape(model, self.vector, "vector").to(sub.device, sub.dtype)
        s = self.strength
        if isinstance(s, torch.Tensor):
            s = s.to(sub.device, sub.dtype).reshape((B,) + (1,) * (sub.ndim - 1))
        delta = s * v
        if self.rms:
            delta = delta * _site_rms(self.site, act, sub)
        return sub + delta

    def _row_payload(self, model) -> torch.Tensor:
        """``[B, *payload]``: each row's vector shaped like a single spec's payload."""
        return torch.stack([self._vector_shape(model, r, "vector row") for r in self.vector])


@dataclass
class Scale(Intervention):
    """``h *= factor``: a scalar, or one factor per selected head/neuron (``[n_sel]``).

    Enhancement (factor > 1) and attenuation (factor < 1) of components.
    """

    factor: Any = 1.0
    op: ClassVar[str] = "scale"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.factor = _tensor(self.factor, "Scale factor")

    def _n_sel(self, model) -> int:
        s = self.site
        return len(s.indices) if s.indices is not None else (model.n_heads if s.kind == "head" else model.d_mlp)

    def check(self, model) -> None:
        super().check(model)
        if self.factor.ndim and (self.site.kind not in ("head", "neuron")
                                 or self.factor.shape != (self._n_sel(model),)):
            raise InterventionError(f"Scale factor at {self.site} has shape {tuple(self.factor.shape)}; use a "
                                    "scalar, or one factor per selected head/neuron "
                                    f"([{self._n_sel(model)}]).")

    def candidate(self, act, sub, model):
        f = self.factor.to(sub.device, sub.dtype)
        if f.ndim and self.site.kind == "head":
            f = f[:, None]
        return sub * f


@dataclass
class Set(Intervention):
    """``h = value`` (a scalar or a vector shaped like :class:`Add`'s). Zero/mean ablation."""

    value: Any = 0.0
    op: ClassVar[str] = "set"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.value = _tensor(self.value, f"{type(self).__name__} value")

    def check(self, model) -> None:
        super().check(model)
        if self.value.ndim:
            self._vector_shape(model, self.value, "value")

    def candidate(self, act, sub, model):
        v = self.value if not self.value.ndim else self._vector_shape(model, self.value, "value")
        return torch.zeros_like(sub) + v.to(sub.device, sub.dtype)


@dataclass
class Zero(Set):
    """Zero ablation: ``h = 0``."""

    op: ClassVar[str] = "zero"

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("value", None)
        return d


@dataclass
class Mean(Set):
    """Mean ablation: ``h = mean`` (a mean activation over a reference set; see :mod:`emolens.capture`)."""

    op: ClassVar[str] = "mean"


@dataclass
class Replace(Intervention):
    """``h = source`` at the selected positions: activation patching.

    ``source`` is a full hook activation from another run of the *same padded length*
    (``[batch or 1, pos, ...]``, e.g. ``capture.run_with_cache(...)[site.hook_name]``); rows map
    to rows (a source batch of 1 broadcasts).
    """

    source: torch.Tensor = None  # type: ignore[assignment]
    op: ClassVar[str] = "replace"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source is None:
            raise InterventionError("Replace needs a source activation.")
        self.source = _tensor(self.source, "Replace source")

    def check(self, model) -> None:
        super().check(model)
        dims = self.site.component_dims(model)
        if tuple(self.source.shape[2:]) != dims:
            raise InterventionError(f"Replace source at {self.site} has per-position shape "
                                    f"{tuple(self.source.shape[2:])}; the hook {self.site.hook_name} has {dims}. "
                                    "Pass the full hook activation from the other run.")

    def candidate(self, act, sub, model):
        src = self.source.to(act.device, act.dtype)
        if src.shape[1] != act.shape[1] or src.shape[0] not in (1, act.shape[0]):
            raise InterventionError(f"Replace source at {self.site} has shape {tuple(src.shape[:2])} "
                                    f"[batch, pos] but the run has {tuple(act.shape[:2])}; patch between "
                                    "batches of equal padded length (encode them together), or pick "
                                    "positions with a rule that exists in both.")
        return component_view(self.site, src).expand_as(sub)


# =========================================================================================
# Readers (capture) and the hook plan
# =========================================================================================
@dataclass
class Reader:
    """Read a site's activation after interventions: ``fn(values, sel, tracker)``.

    ``values`` is the component view (see :func:`component_view`), ``sel`` the ``[batch, pos]``
    mask of the rule ``pos``.
    """

    site: Site
    fn: Callable[[torch.Tensor, torch.Tensor, "PositionTracker"], None]
    pos: Pos = field(default_factory=Pos.all)


@dataclass
class HookReader:
    """Read any bridge hook point by its TransformerLens name: ``fn(act, tracker)``.

    Low-level companion of :class:`Reader` for hook points that are not :class:`Site` kinds
    (``blocks.L.attn.hook_q``/``hook_k``/``hook_v``/``hook_pattern``/``hook_rot_q``/``hook_attn_scores``,
    ``blocks.L.ln1.hook_in``, ``ln_final.hook_in``, ...). ``act`` is the full hook tensor after
    any interventions registered on the same name; with ``grad=True`` it stays in the autograd
    graph (attribution uses this for per-head gradients and the AtP* QK fix).
    """

    hook_name: str
    fn: Callable[[torch.Tensor, "PositionTracker"], None]


class PrefixKV:
    """Keys/values of positions ``0..prefix-1`` per layer, served to the attention as its KV cache.

    ``kv[layer] = (keys, values)``, each ``[rows, n_kv_heads, prefix, d_head]`` (keys after RoPE,
    as the attention caches them). Used by :meth:`HookPlan.forward_from` to recompute only the
    positions after a shared prefix; each run gets a fresh transformers ``DynamicCache`` filled
    through its public ``update`` (the run appends its own keys/values to it).
    """

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.kv = kv

    @property
    def length(self) -> int:
        return next(iter(self.kv.values()))[0].shape[-2]

    def prefix(self, p: int, reps: int = 1) -> "PrefixKV":
        """Positions ``0..p-1`` only, the rows stacked ``reps`` times (copy-major, as :func:`tile_batch`)."""
        return PrefixKV({L: tuple(t[:, :, :p].repeat(reps, 1, 1, 1) for t in kv) for L, kv in self.kv.items()})

    def cache(self):
        from transformers import DynamicCache

        c = DynamicCache()
        for L in sorted(self.kv):
            k, v = self.kv[L]
            c.update(k, v, L)
        return c


class _PassThrough(torch.nn.Module):
    """Stands in for a skipped decoder layer: returns the residual stream it is given."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class PositionTracker:
    """Knows which padded positions the current forward call covers.

    A hook on ``hook_embed`` records where each call starts: 0 for a prompt pass, then
    ``T, T+1, ...`` for KV-cached generation steps.
    """

    def __init__(self) -> None:
        self.batch = None
        self.seen = 0
        self.start = 0
        self._memo: dict = {}

    def set_batch(self, batch) -> None:
        self.batch, self.seen, self.start, self._memo = batch, 0, 0, {}

    def on_embed(self, x: torch.Tensor, hook) -> None:
        self.start = self.seen
        self.seen += x.shape[1]
        self._memo = {}

    def select(self, pos: Pos, B: int, S: int, rows: tuple[int, ...] | None = None
               ) -> Bool[torch.Tensor, "batch pos"]:
        key = (pos, B, S, rows)
        if key in self._memo:
            return self._memo[key]
        b = self.batch
        if b is None or B != len(b):
            raise InterventionError(f"The forward pass has batch size {B} but the engine was given "
                                    f"{None if b is None else len(b)} rows (beam search and "
                                    "num_return_sequences>1 are not supported with interventions).")
        dev = b.input_ids.device
        rel = torch.arange(self.start, self.start + S, device=dev)[None, :] - b.pad_offset[:, None]
        sel = pos.select(rel, b.prompt_len, rel >= 0)
        if rows is not None:
            keep = torch.zeros(B, dtype=torch.bool, device=dev)
            keep[list(rows)] = True
            sel = sel & keep[:, None]
        self._memo[key] = sel
        return sel


_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(hf_model) -> str:
    """The keyword a transformers model's ``forward`` takes its KV cache under: ``"cache"`` (transformers
    >= 5.24; ``past_key_values`` still works there but is deprecated, to be removed in 5.40) or
    ``"past_key_values"`` (5.23)."""
    import inspect

    tp = type(hf_model)
    if tp not in _CACHE_KWARG:
        params = inspect.signature(hf_model.forward).parameters
        _CACHE_KWARG[tp] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[tp]


def _cache_kwarg_shim(model) -> None:
    """Let the bridge's attention see the KV cache whatever transformers calls it (once per model).

    transformers >= 5.24 passes a decoder layer's KV cache to its attention as ``cache=``; the
    TransformerLens 4.3 attention bridges read ``past_key_values=`` (or ``layer_past=``) and would
    silently run without the cache (cached generation forgetting the prompt, prefix replay in
    patching attending to the suffix only). A forward pre-hook on each attention bridge copies
    ``cache`` to ``past_key_values`` when only the former is given; with older transformers it never
    fires.
    """
    if model.__dict__.get("_emolens_cache_shim"):
        return

    def pre(mod, args, kwargs):
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            kwargs = dict(kwargs)
            kwargs["past_key_values"] = kwargs["cache"]
            return args, kwargs
        return None

    for blk in model.bridge.blocks:
        attn = getattr(blk, "attn", None)
        if isinstance(attn, torch.nn.Module):
            attn.register_forward_pre_hook(pre, with_kwargs=True)
    model.__dict__["_emolens_cache_shim"] = True


@contextlib.contextmanager
def _grad_through_frozen(hf_model, grad: bool):
    """With ``grad`` on a model whose weights are frozen (``requires_grad_(False)``), make the token
    embeddings a leaf that requires grad, so activations downstream carry gradients (attribution
    reads d metric / d activation, never weight gradients)."""
    emb = hf_model.get_input_embeddings()
    if not grad or any(p.requires_grad for p in emb.parameters()):
        yield
        return
    handle = emb.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


ATTN_CHOICES = ("eager", "auto", "sdpa")


class HookPlan:
    """Interventions and readers grouped by hook, registered together through ``bridge.hooks``.

    ``attn`` decides which module tree a pass runs on (per plan, from the hooks it needs):

    - ``"eager"`` (default): the bridged model (TransformerLens hook points, eager attention that
      materialises ``[batch, heads, pos, pos]`` patterns; every hook point exists).
    - ``"sdpa"``: the plain transformers modules of :class:`HFPlacement` (SDPA attention: no
      ``[pos, pos]`` tensor is materialised, though attention's FLOPs stay quadratic in length);
      the same hook functions are placed there. Raises if a hook has no place there.
    - ``"auto"``: ``"sdpa"`` when every hook of the plan has a place on the plain modules, else
      ``"eager"``. Hooks that exist only inside the bridge's attention (``hook_pattern``,
      ``hook_attn_scores``, ``hook_rot_q``/``hook_rot_k``, ``hook_result``...) therefore always
      run eager: nothing is silently skipped.

    Both give the same values up to SDPA-vs-eager fp32 rounding (tests/test_sdpa_paths.py).
    """

    def __init__(self, model, interventions: Iterable[Intervention] | None = None,
                 readers: Iterable[Reader] | None = None, *, attn: str = "eager"):
        if attn not in ATTN_CHOICES:
            raise InterventionError(f"Unknown attention choice attn={attn!r}; use 'auto' (SDPA unless a hook needs "
                                    "the bridge's eager attention), 'sdpa' or 'eager'.")
        self.model = model
        self.attn = attn
        self._target = None  # the transformers model the current hooks() block runs
        self._layers = None
        self.kv: "PrefixKV | None" = None
        if isinstance(interventions, Intervention):  # one spec where a list was expected
            interventions = [interventions]
        _cache_kwarg_shim(model)
        self.interventions = list(interventions or [])
        self.readers = list(readers or [])
        for iv in self.interventions:
            if not isinstance(iv, Intervention):
                raise InterventionError(f"Expected Intervention specs, got {type(iv).__name__}; build them "
                                        "with emolens.interventions.Add/Scale/Set/Zero/Mean/Replace.")
            iv.check(model)
        for r in self.readers:
            if isinstance(r, HookReader):
                if r.hook_name not in model.bridge.hook_dict:
                    raise SiteError(f"{model.name} has no hook point {r.hook_name!r}; see "
                                    "model.bridge.hook_dict for the names it has.")
            else:
                r.site.validate(model)
        self.tracker = PositionTracker()
        by_hook: dict[str, tuple[list, list]] = {}
        for iv in self.interventions:
            by_hook.setdefault(iv.write_hook, ([], []))[0].append(iv)
        for r in self.readers:
            name = r.hook_name if isinstance(r, HookReader) else r.site.hook_name
            by_hook.setdefault(name, ([], []))[1].append(r)
        self._by_hook = by_hook

    def _hook_fn(self, ivs: list[Intervention], readers: list[Reader]):
        tracker, model = self.tracker, self.model

        def fn(act: torch.Tensor, hook):
            B, S = act.shape[:2]
            for iv in ivs:
                sel = tracker.select(iv.pos, B, S, iv.rows)
                act = iv.apply(act, sel, model)
            for r in readers:
                if isinstance(r, HookReader):
                    r.fn(act, tracker)
                else:
                    r.fn(component_view(r.site, act), tracker.select(r.pos, B, S), tracker)
            return act

        return fn

    @property
    def empty(self) -> bool:
        return not self._by_hook

    def placement(self) -> "HFPlacement | None":
        """The plain-module placement this plan runs on (``None``: the bridged model), per ``attn``."""
        if self.attn == "eager":
            return None
        pl = HFPlacement.of(self.model)
        if pl is not None and (self.empty or self.hf_placeable(pl)):
            return pl
        if self.attn == "sdpa":
            if pl is None:
                why = f"{self.model.name} has no plain-module placement (e.g. a multi-device map)"
            else:
                need = [n for n in self._by_hook if pl.resolve(n) is None or not pl.convertible(n)]
                why = f"{', '.join(need[:4])} exist only inside the bridge's eager attention"
            raise InterventionError(f"attn='sdpa' cannot run this plan on the plain transformers modules: {why}; "
                                    "use attn='auto' (picks eager for these hooks) or attn='eager'.")
        return None

    @property
    def runs_sdpa(self) -> bool:
        """Whether the current :meth:`hooks` block runs the plain SDPA modules."""
        return self._target is not None and self._target is not self.model.hf_model

    @contextlib.contextmanager
    def hooks(self):
        """Register the plan's hooks for the duration of the block (on the tree ``attn`` picks)."""
        pl = self.placement()
        if pl is not None:
            with self.hf_hooks(pl):
                self._target, self._layers = pl.model, pl.layers
                try:
                    yield self
                finally:
                    self._target = self._layers = None
            return
        self._target, self._layers = self.model.hf_model, None
        try:
            if self.empty:
                yield self
                return
            fwd = [("hook_embed", self.tracker.on_embed)]
            fwd += [(name, self._hook_fn(ivs, rd)) for name, (ivs, rd) in self._by_hook.items()]
            with self.model.bridge.hooks(fwd_hooks=fwd):
                yield self
        finally:
            self._target = None

    def hf_placeable(self, placement: "HFPlacement") -> bool:
        """Whether every hook of the plan has a place on the plain transformers modules (raw
        :class:`HookReader` hooks too, when their tensor has the bridge's shape there)."""
        return not self.empty and all(placement.resolve(name) is not None and placement.convertible(name)
                                      for name in self._by_hook)

    @contextlib.contextmanager
    def hf_hooks(self, placement: "HFPlacement"):
        """Register the plan's hooks on the plain (un-bridged) transformers modules of ``placement``.

        The same hook functions as :meth:`hooks` (same specs, position tracker and readers), placed
        as PyTorch forward (pre-)hooks on the modules whose inputs/outputs the bridge's hook points
        wrap; for generation at raw transformers speed (SDPA attention, no idle hook points).
        """
        handles = [placement.attach("hook_embed", lambda act, hook: self.tracker.on_embed(act, hook))]
        try:
            for name, (ivs, rd) in self._by_hook.items():
                handles.append(placement.attach(name, self._hook_fn(ivs, rd)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def forward(self, batch, *, grad: bool = False, logits_to_keep: int | None = None,
                keep_kv: bool = False) -> Float[torch.Tensor, "batch pos vocab"]:
        """One forward pass of ``batch`` (call inside :meth:`hooks`).

        With ``logits_to_keep=k`` only the last ``k`` positions are unembedded (the others are zeros
        in the returned ``[batch, pos, vocab]`` tensor): for metrics that read logits at t* or
        after it only, this skips most of the unembedding. With ``keep_kv`` the attention
        keys/values of every layer (all positions, keys after RoPE) are kept in ``self.kv``
        (:class:`PrefixKV`; for :meth:`forward_from` with a prefix), on either tree.
        """
        self.tracker.set_batch(batch)
        hf = self._target if self._target is not None else self.model.hf_model
        kw: dict[str, Any] = {"use_cache": False}
        if keep_kv:
            from transformers import DynamicCache

            cache = DynamicCache()  # no config: a full (not sliding) layer per decoder layer
            kw = {cache_kwarg(hf): cache, "use_cache": True}
        if logits_to_keep:
            kw["logits_to_keep"] = int(logits_to_keep)
        with torch.set_grad_enabled(grad), _grad_through_frozen(hf, grad):
            out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, **kw)
        if keep_kv:
            self.kv = PrefixKV({L: (lay.keys, lay.values) for L, lay in enumerate(cache.layers)})
        return _pad_logits(out.logits, batch.input_ids.shape[1])

    def forward_from(self, layer: int, resid: Float[torch.Tensor, "rows pos d_model"], batch, *, grad: bool = False,
                     logits_to_keep: int | None = None, prefix: int = 0,
                     prefix_kv: "PrefixKV | None" = None) -> Float[torch.Tensor, "rows pos vocab"]:
        """Run the model from block ``layer`` on a given residual stream (call inside :meth:`hooks`).

        Blocks ``0..layer-1`` are skipped: ``resid`` is the input of block ``layer``
        (``hook_resid_pre``; ``layer == n_layers`` means the final residual, only the final norm and
        unembedding run). ``batch`` is the :class:`~emolens.model.Batch` of ``resid``'s rows (e.g.
        ``k`` stacked copies of a batch, :func:`~emolens.attribution.tile_batch`; position rules and
        ``rows=`` refer to it). Hooks and interventions at layers ``>= layer`` fire as in a full
        pass; the logits equal a full forward whose blocks before ``layer`` produced ``resid``
        (``logits_to_keep`` as in :meth:`forward`).

        Version-independent: this is the transformers model's own forward (its masks, rotary
        embeddings, final norm, soft-capping), called with ``inputs_embeds=resid`` while the decoder
        layers before ``layer`` are swapped for pass-throughs; nothing depends on what a decoder
        layer's signature is.

        With ``prefix > 0`` only positions ``prefix..T-1`` are computed: ``resid`` holds those
        positions and ``prefix_kv`` the attention keys/values of the earlier ones at every layer
        (valid when the run cannot change them, e.g. patches after the first position where two
        prompts differ), served as a KV cache as in cached generation. Hooks see suffix-length
        tensors; position rules and ``rows=`` keep their meaning. The returned logits cover all
        ``T`` positions (zeros before ``prefix``).
        """
        n = self.model.n_layers
        if not 0 <= layer <= n:
            raise SiteError(f"forward_from layer {layer} is out of range 0..{n}.")
        if len(batch) != resid.shape[0]:
            raise InterventionError(f"forward_from: batch has {len(batch)} rows but resid has {resid.shape[0]}.")
        if prefix and prefix_kv is None:
            raise InterventionError("forward_from(prefix > 0) needs prefix_kv (the prefix keys/values).")
        T = batch.input_ids.shape[1]
        if prefix + resid.shape[1] != T:
            raise InterventionError(f"forward_from: resid covers {resid.shape[1]} positions after a prefix of {prefix}; "
                                    f"the batch has {T}.")
        self.tracker.set_batch(batch)
        self.tracker.start = self.tracker.seen = prefix  # hooks see positions prefix..T-1
        hf = self._target if self._target is not None else self.model.hf_model
        layers = self._layers if self._layers is not None else _decoder_layers(self.model)
        saved = [layers[i] for i in range(layer)]
        kw: dict[str, Any] = {"use_cache": False}
        if prefix:
            kw = {cache_kwarg(hf): prefix_kv.cache(), "use_cache": True}
        if logits_to_keep:
            kw["logits_to_keep"] = int(logits_to_keep)
        skip = _PassThrough()
        try:
            for i in range(layer):
                layers[i] = skip
            with torch.set_grad_enabled(grad):
                out = hf(inputs_embeds=resid, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids[:, prefix:], **kw)
        finally:
            for i, blk in enumerate(saved):
                layers[i] = blk
        return _pad_logits(out.logits, T)


def _decoder_layers(model) -> torch.nn.ModuleList:
    """The transformers model's list of decoder layers (the ModuleList holding the bridge's blocks)."""
    cache = model.__dict__.setdefault("_emolens_layers", {})
    if "l" not in cache:
        first = model.bridge.blocks[0]
        found = [mod for mod in model.hf_model.modules()
                 if isinstance(mod, torch.nn.ModuleList) and len(mod) == model.n_layers and mod[0] is first]
        if not found:
            raise InterventionError(f"Cannot find {model.name}'s decoder layers inside the transformers model.")
        cache["l"] = found[0]
    return cache["l"]


def _pad_logits(logits: torch.Tensor, T: int) -> torch.Tensor:
    """Left-pad logits computed for the last positions only back to ``T`` positions (zeros)."""
    k = logits.shape[1]
    if k >= T:
        return logits
    # one [B, T, V] buffer written in place: a cat would copy the (large) zero block a second time
    out = logits.new_zeros((logits.shape[0], T, logits.shape[2]))
    out[:, T - k:] = logits
    return out


def run(model, batch, *, interventions: Iterable[Intervention] | None = None,
        readers: Iterable[Reader] | None = None, grad: bool = False) -> Float[torch.Tensor, "batch pos vocab"]:
    """One forward pass with interventions and readers; returns logits ``[batch, pos, d_vocab]``."""
    plan = HookPlan(model, interventions, readers)
    with plan.hooks():
        return plan.forward(batch, grad=grad)


def generate(model, batch, *, interventions: Iterable[Intervention] | None = None,
             readers: Iterable[Reader] | None = None, max_new_tokens: int = 40, do_sample: bool = False,
             backend: str = "auto", **kw: Any) -> list[torch.Tensor]:
    """KV-cached generation from a prompt batch; returns each row's new token ids (eos-trimmed).

    ``backend``: ``"hf"`` places the plan's hooks on plain transformers modules that share the
    model's weights (SDPA attention, no idle hook points: raw ``generate`` speed); ``"bridge"``
    runs the bridged model (eager attention, TransformerLens hook points); ``"auto"`` (default)
    takes ``"hf"`` whenever every hook of the plan has a place there (every :class:`Site` kind, raw
    hooks at module boundaries such as ``attn.hook_q``; not ``hook_pattern``/``hook_attn_scores``/
    ``hook_rot_k``, which exist only in the bridge's attention), else ``"bridge"``. Both give the same greedy
    tokens up to SDPA-vs-eager rounding (tested per site kind).
    """
    if backend not in ("auto", "hf", "bridge"):
        raise InterventionError(f"Unknown generation backend {backend!r}; use 'auto', 'hf' or 'bridge'.")
    plan = HookPlan(model, interventions, readers)
    tok = model.tokenizer
    gen_kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id)
    if not do_sample:
        gen_kw.update(temperature=None, top_p=None, top_k=None)
    gen_kw.update(kw)
    plan.tracker.set_batch(batch)
    placement = HFPlacement.of(model) if backend != "bridge" else None
    use_hf = placement is not None and (plan.empty or plan.hf_placeable(placement))
    if backend == "hf" and not use_hf:
        raise InterventionError("backend='hf' cannot place these hooks on the plain transformers modules "
                                "(a HookReader, or a model layout emolens does not map); "
                                "use backend='auto' or 'bridge'.")
    if use_hf:
        ctx, hf = plan.hf_hooks(placement), placement.model
    else:
        ctx, hf = plan.hooks(), model.hf_model
    with ctx, torch.no_grad():
        out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **gen_kw)
    T = batch.input_ids.shape[1]
    eos = model.hf_model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id}
    rows = []
    for r in out[:, T:]:
        ids = r.tolist()
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        rows.append(r[:cut])
    return rows


def rows_slice(interventions: Iterable[Intervention] | None, start: int, stop: int) -> list[Intervention]:
    """The specs for batch rows ``start..stop-1`` of a larger prompt list (per-row payloads sliced)."""
    return [iv.rows_slice(start, stop) if isinstance(iv, Add) else iv for iv in (interventions or [])]


# =========================================================================================
# Plain-transformers placement (generation at raw speed)
# =========================================================================================
def _unwrap(mod):
    """The transformers module a bridge component wraps (the module itself when it wraps none)."""
    while True:
        inner = getattr(mod, "_original_component", None) or getattr(mod, "original_component", None)
        if not isinstance(inner, torch.nn.Module):
            return mod
        mod = inner


class HFPlacement:
    """Plain transformers modules sharing a bridged model's weights, and where each hook point sits.

    The TransformerBridge swaps bridge components into the transformers model in place (eager
    attention, ~40 hook points per layer). This builds a second, un-bridged module tree of the same
    class on the meta device and binds every parameter and buffer to the bridged model's own
    tensors (no copy), with SDPA attention. A bridge hook point ``X.hook_in``/``X.hook_out`` maps to
    a forward pre-hook/forward hook on the transformers module that component ``X`` wraps
    (``blocks.L.hook_in`` → decoder layer input, ``blocks.L.attn.o.hook_in`` → ``o_proj`` input,
    ``blocks.L.mlp.out.hook_in`` → ``down_proj`` input, ...), so the engine's hook functions run
    unchanged. Built once per model (:meth:`of`); ``None`` when the layout cannot be mapped.
    """

    def __init__(self, model):
        import copy

        self.emo = model
        hf = model.hf_model
        cfg = copy.deepcopy(hf.config)
        try:
            cfg._attn_implementation = "sdpa"
        except Exception:  # noqa: BLE001 - a model without SDPA keeps its own attention
            pass
        with torch.device("meta"):
            shell = type(hf)(cfg)
        self._by_orig: dict[int, torch.nn.Module] = {}
        for path, mod in shell.named_modules():
            orig = self._find(hf, path)
            if orig is None:
                raise InterventionError(f"no counterpart for {path}")
            self._by_orig[id(orig)] = mod
            for kind in ("_parameters", "_buffers"):
                for k, mine in list(getattr(mod, kind).items()):
                    if mine is None:
                        continue
                    t = getattr(orig, kind).get(k)
                    if t is None and kind == "_buffers" and k in getattr(orig, "__dict__", {}):
                        t = orig.__dict__[k]
                    if t is None:
                        t = getattr(orig, k, None)
                    if not isinstance(t, torch.Tensor) or t.is_meta:
                        raise InterventionError(f"no tensor for {path}.{k}")
                    getattr(mod, kind)[k] = t
            for k, v in list(vars(mod).items()):  # plain tensor attributes (e.g. rotary inv_freq copies)
                if isinstance(v, torch.Tensor) and v.is_meta:
                    ov = getattr(orig, k, None)
                    if not isinstance(ov, torch.Tensor):
                        raise InterventionError(f"no tensor for {path}.{k}")
                    setattr(mod, k, ov)
        shell.generation_config = hf.generation_config
        self.model = shell.eval()
        self._hooks: dict[str, tuple] = {}
        first = self._by_orig.get(id(_unwrap(model.bridge.blocks[0])))
        found = [m for m in shell.modules() if isinstance(m, torch.nn.ModuleList)
                 and len(m) == model.n_layers and m[0] is first]
        if not found:
            raise InterventionError("no decoder layer list")
        self.layers = found[0]  # the plain tree's decoder layers (for forward_from)

    @staticmethod
    def _find(root, path: str):
        mod = _unwrap(root)
        for part in filter(None, path.split(".")):
            nxt = getattr(mod, part, None)
            if nxt is None and part.isdigit() and isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
                nxt = mod[int(part)]
            if not isinstance(nxt, torch.nn.Module):
                return None
            mod = _unwrap(nxt)
        return mod

    @classmethod
    def of(cls, model) -> "HFPlacement | None":
        """The cached placement of ``model`` (``None`` when it cannot be built, e.g. a device map)."""
        cache = model.__dict__.setdefault("_emolens_hf_placement", {})
        if "p" not in cache:
            dev_map = getattr(model.hf_model, "hf_device_map", None)
            try:
                cache["p"] = None if dev_map and len(set(dev_map.values())) > 1 else cls(model)
            except Exception:  # noqa: BLE001 - unmapped layouts fall back to the bridge
                cache["p"] = None
        return cache["p"]

    def resolve(self, hook_name: str) -> tuple[torch.nn.Module, str] | None:
        """``(module, "in"|"out")`` for a bridge hook name (aliases resolved), or ``None``."""
        if hook_name in self._hooks:
            return self._hooks[hook_name]
        out = None
        hp = self.emo.bridge.hook_dict.get(hook_name)
        name = getattr(hp, "name", None) or ""
        comp, _, which = name.rpartition(".")
        if which in ("hook_in", "hook_out") and comp:
            try:
                bc = self.emo.bridge.get_submodule(comp)
            except AttributeError:
                bc = None
            if bc is not None:
                mod = self._by_orig.get(id(_unwrap(bc)))
                if mod is not None and _unwrap(bc) is not bc:
                    out = (mod, which[5:])
        self._hooks[hook_name] = out
        return out

    def _per_head(self, hook_name: str) -> bool:
        """Whether the bridge shows this hook's tensor split into heads ``[b, p, n, d_head]``."""
        if _hook_kind(hook_name) == "head":
            return True
        conv = getattr(self.emo.bridge.hook_dict.get(hook_name), "hook_conversion", None)
        return type(conv).__name__ == "ReshapeForAttentionHeads"

    def convertible(self, hook_name: str) -> bool:
        """Whether the plain module's tensor at ``hook_name`` can be shown in the bridge's shape:
        Site hooks, and raw hooks without a conversion or with the per-head reshape (hook_q/k/v)."""
        if _hook_kind(hook_name) is not None or hook_name == "hook_embed":
            return True
        conv = getattr(self.emo.bridge.hook_dict.get(hook_name), "hook_conversion", None)
        return conv is None or self._per_head(hook_name)

    def attach(self, hook_name: str, fn):
        """Register ``fn(act, hook)`` (returning the new activation, or None) at ``hook_name``."""
        mod, where = self.resolve(hook_name)
        heads = self._per_head(hook_name)
        dh = self.emo.d_head

        def call(x):
            shp = x.shape
            act = x.reshape(shp[0], shp[1], shp[-1] // dh, dh) if heads else x
            new = fn(act, None)
            return x if new is None else new.reshape(shp)

        if where == "in":
            def pre(m, args, kwargs):
                if args:
                    return (call(args[0]),) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = call(kwargs["hidden_states"])
                return args, kwargs
            return mod.register_forward_pre_hook(pre, with_kwargs=True)

        def post(m, args, output):
            if isinstance(output, tuple):
                return (call(output[0]),) + tuple(output[1:])
            return call(output)
        return mod.register_forward_hook(post)


def _hook_kind(hook_name: str) -> str | None:
    try:
        return Site.parse(hook_name).kind
    except SiteError:
        return None


# =========================================================================================
# Serialisation
# =========================================================================================
def to_json(interventions: Sequence[Intervention]) -> str:
    """JSON text of a list of specs (tensors inline as shape + flat data)."""
    return json.dumps([iv.to_dict() for iv in interventions])


def from_json(text: str) -> list[Intervention]:
    return [Intervention.from_dict(d) for d in json.loads(text)]


def save_interventions(path: str | Path, interventions: Sequence[Intervention]) -> Path:
    """Save specs as JSON (no pickle)."""
    p = Path(path)
    p.write_text(to_json(interventions))
    return p


def load_interventions(path: str | Path) -> list[Intervention]:
    return from_json(Path(path).read_text())
