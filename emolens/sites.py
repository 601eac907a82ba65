"""Sites: a small typed vocabulary for the components of a transformer.

A :class:`Site` names *where* in the model something is read or written; a position rule
(:class:`Pos`) names *which token positions*. Both are plain, frozen, serialisable values.

=============  ==========================  ==============================  =========================
kind           hook (TransformerLens name)  activation shape at the hook    ``index`` selects
=============  ==========================  ==============================  =========================
resid_pre      ``blocks.L.hook_resid_pre``  ``[batch, pos, d_model]``       —
resid_mid      ``blocks.L.hook_resid_mid``  ``[batch, pos, d_model]``       —
resid_post     ``blocks.L.hook_resid_post`` ``[batch, pos, d_model]``       —
attn_out       ``blocks.L.hook_attn_out``   ``[batch, pos, d_model]``       —
mlp_out        ``blocks.L.hook_mlp_out``    ``[batch, pos, d_model]``       —
head           ``blocks.L.attn.hook_z``     ``[batch, pos, n_heads, d_head]`` query head(s) (GQA: per
                                                                            *query* head)
neuron         ``blocks.L.mlp.hook_post``   ``[batch, pos, d_mlp]``         neuron(s)
=============  ==========================  ==============================  =========================

``head`` and ``neuron`` sites with ``index=None`` mean "all heads / all neurons of the layer".

Positions are counted per row **over the row's real tokens** (left padding is invisible):
``0`` is the first real token, ``-1`` the last *prompt* token (t*). Positions at or after the
prompt length are generated tokens. The same rule means the same thing in a single forward
pass, in a batched pass with padding, and in KV-cached generation (where each step sees one
new position).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Bool, Int

from .errors import SiteError

RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
SUBLAYER_KINDS = ("attn_out", "mlp_out")
KINDS = RESID_KINDS + SUBLAYER_KINDS + ("head", "neuron")

_HOOK_TEMPLATES = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "head": "blocks.{L}.attn.hook_z",
    "neuron": "blocks.{L}.mlp.hook_post",
}
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|"
                      r"hook_mlp_out|attn\.hook_z|mlp\.hook_post)$")
_HOOK_TO_KIND = {v.split("{L}.")[1]: k for k, v in _HOOK_TEMPLATES.items()}


def _norm_index(index: Any) -> int | tuple[int, ...] | None:
    if index is None:
        return None
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    if isinstance(index, (list, tuple, range)):
        out = tuple(int(i) for i in index)
        if not out:
            raise SiteError("A site index list is empty: pass index=None for all components, "
                            "or at least one head/neuron index.")
        return out
    return int(index)


@dataclass(frozen=True)
class Site:
    """One component family at one layer, optionally narrowed to some heads or neurons.

    Args:
        kind: one of ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``,
            ``head``, ``neuron``.
        layer: block index, ``0 <= layer < n_layers``.
        index: for ``head``/``neuron``: an int, a tuple of ints, or ``None`` (all).

    Use the helpers :func:`resid`, :func:`head`, :func:`neuron`, :func:`attn_out`,
    :func:`mlp_out`, or :meth:`Site.parse` for strings such as ``"resid_post.8"``,
    ``"head.3.2"``, ``"neuron.5.100"`` or a TransformerLens hook name.
    """

    kind: str
    layer: int
    index: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SiteError(f"Unknown site kind {self.kind!r}; valid kinds: {', '.join(KINDS)}.")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "index", _norm_index(self.index))
        if self.index is not None and self.kind not in ("head", "neuron"):
            raise SiteError(f"Site kind {self.kind!r} takes no index (got {self.index!r}); "
                            "only 'head' and 'neuron' sites select components.")

    # -- naming -----------------------------------------------------------------------------
    @property
    def hook_name(self) -> str:
        """TransformerLens hook name (legacy alias, resolved by the bridge)."""
        return _HOOK_TEMPLATES[self.kind].format(L=self.layer)

    @property
    def indices(self) -> tuple[int, ...] | None:
        """The selected heads/neurons as a tuple (``None`` = all)."""
        if self.index is None:
            return None
        return (self.index,) if isinstance(self.index, int) else self.index

    def __str__(self) -> str:
        s = f"{self.kind}.{self.layer}"
        if self.index is None:
            return s
        if isinstance(self.index, int):
            return f"{s}.{self.index}"
        return s + "." + ",".join(str(i) for i in self.index)

    @classmethod
    def parse(cls, spec: "str | Site | dict") -> "Site":
        """Parse ``"resid_post.8"``, ``"head.3.2"``, ``"neuron.5.1,7"``, a hook name, or a dict."""
        if isinstance(spec, Site):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if not isinstance(spec, str):
            raise SiteError(f"Cannot read a site from {type(spec).__name__}; use a Site, a dict or a string.")
        m = _HOOK_RE.match(spec)
        if m:
            return cls(_HOOK_TO_KIND[m.group(2)], int(m.group(1)))
        parts = spec.split(".")
        if len(parts) in (2, 3) and parts[0] in KINDS:
            try:
                layer = int(parts[1])
                index = None
                if len(parts) == 3:
                    idx = [int(p) for p in parts[2].split(",")]
                    index = idx[0] if len(idx) == 1 else tuple(idx)
            except ValueError:
                pass
            else:
                return cls(parts[0], layer, index)
        raise SiteError(f"Cannot parse site {spec!r}. Write KIND.LAYER[.INDEX] with KIND in "
                        f"{', '.join(KINDS)} (e.g. 'resid_post.8', 'head.3.2', 'neuron.5.100'), "
                        "or a hook name such as 'blocks.8.hook_resid_post'.")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layer": self.layer,
                "index": list(self.index) if isinstance(self.index, tuple) else self.index}

    @classmethod
    def from_dict(cls, d: dict) -> "Site":
        try:
            return cls(d["kind"], d["layer"], d.get("index"))
        except KeyError as e:
            raise SiteError(f"Site dict {d!r} lacks key {e}; expected kind, layer[, index].") from None

    # -- shapes -----------------------------------------------------------------------------
    def component_dims(self, model) -> tuple[int, ...]:
        """Per-position shape of the full hook activation (``(d_model,)``, ``(n_heads, d_head)``, ...)."""
        if self.kind == "head":
            return (model.n_heads, model.d_head)
        if self.kind == "neuron":
            return (model.d_mlp,)
        return (model.d_model,)

    def value_width(self, model) -> int:
        """Width of a vector written to one selected component (d_model, d_head, or 1 per neuron)."""
        if self.kind == "head":
            return model.d_head
        if self.kind == "neuron":
            return 1
        return model.d_model

    def validate(self, model) -> "Site":
        """Check layer and index against ``model``; raise :class:`SiteError` listing valid ranges."""
        if not 0 <= self.layer < model.n_layers:
            raise SiteError(f"Layer {self.layer} is out of range for {model.name}: valid layers are "
                            f"0..{model.n_layers - 1}.")
        if self.indices is not None:
            n = model.n_heads if self.kind == "head" else model.d_mlp
            what = "heads" if self.kind == "head" else "neurons"
            bad = [i for i in self.indices if not 0 <= i < n]
            if bad:
                raise SiteError(f"{what.capitalize()} {bad} out of range at layer {self.layer} of "
                                f"{model.name}: valid {what} are 0..{n - 1}"
                                + (" (query heads; GQA models have "
                                   f"{model.n_kv_heads} KV heads)" if self.kind == "head" else "") + ".")
            if len(set(self.indices)) != len(self.indices):
                raise SiteError(f"Site {self} lists a component twice; pass each index once.")
        return self


def resid(layer: int, where: str = "post") -> Site:
    """Residual stream at ``layer``: ``where`` is ``"pre"``, ``"mid"`` or ``"post"``."""
    if where not in ("pre", "mid", "post"):
        raise SiteError(f"Residual position {where!r} unknown; use 'pre', 'mid' or 'post'.")
    return Site(f"resid_{where}", layer)


def head(layer: int, index: int | Sequence[int] | None = None) -> Site:
    """Attention head output(s) before W_O (``hook_z``), per *query* head."""
    return Site("head", layer, index)


def neuron(layer: int, index: int | Sequence[int] | None = None) -> Site:
    """MLP neuron activation(s) (``mlp.hook_post``; for gated MLPs act(gate)·up)."""
    return Site("neuron", layer, index)


def attn_out(layer: int) -> Site:
    """Attention sublayer output written to the residual stream."""
    return Site("attn_out", layer)


def mlp_out(layer: int) -> Site:
    """MLP sublayer output written to the residual stream."""
    return Site("mlp_out", layer)


# =========================================================================================
# Position rules
# =========================================================================================
POS_RULES = ("all", "prompt", "last", "generated", "from_last", "index", "slice", "mask")


@dataclass(frozen=True)
class Pos:
    """Which token positions an intervention or capture touches.

    Rules (positions are counted over each row's real tokens; ``P`` = that row's prompt length):

    - ``Pos.all()``: every position, prompt and generated.
    - ``Pos.prompt()``: prompt positions ``0..P-1`` only.
    - ``Pos.last()``: the last prompt token ``P-1`` (t*) only.
    - ``Pos.generated()``: every generated token (``>= P``).
    - ``Pos.from_last()``: t* and every generated token — what "the last position of each
      forward call" means under KV-cached generation (paper 2's steering semantics).
    - ``Pos.index(i, ...)``: prompt positions; negative counts from the prompt end (-1 = t*).
    - ``Pos.slice(start, stop)``: a Python slice over prompt positions (negatives from the end).
    - ``Pos.mask(m)``: an explicit ``[batch, prompt_len]`` bool mask, left-aligned on real tokens.
    """

    rule: str = "all"
    args: tuple = field(default=())

    def __post_init__(self) -> None:
        if self.rule not in POS_RULES:
            raise SiteError(f"Unknown position rule {self.rule!r}; valid rules: {', '.join(POS_RULES)}.")

    # constructors ----------------------------------------------------------------------------
    @classmethod
    def all(cls) -> "Pos":
        return cls("all")

    @classmethod
    def prompt(cls) -> "Pos":
        return cls("prompt")

    @classmethod
    def last(cls) -> "Pos":
        return cls("last")

    @classmethod
    def generated(cls) -> "Pos":
        return cls("generated")

    @classmethod
    def from_last(cls) -> "Pos":
        return cls("from_last")

    @classmethod
    def index(cls, *idx: int) -> "Pos":
        if not idx:
            raise SiteError("Pos.index needs at least one position.")
        return cls("index", tuple(int(i) for i in idx))

    @classmethod
    def slice(cls, start: int | None = None, stop: int | None = None) -> "Pos":
        return cls("slice", (start, stop))

    @classmethod
    def mask(cls, m: "Bool[torch.Tensor, 'batch pos'] | Sequence[Sequence[bool]]") -> "Pos":
        t = torch.as_tensor(m, dtype=torch.bool)
        if t.ndim != 2:
            raise SiteError(f"Pos.mask needs a [batch, prompt_len] bool mask, got shape {tuple(t.shape)}.")
        return cls("mask", tuple(tuple(bool(x) for x in row) for row in t.tolist()))

    # evaluation ------------------------------------------------------------------------------
    def select(self, rel: Int[torch.Tensor, "batch pos"], prompt_len: Int[torch.Tensor, "batch"],
               valid: Bool[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """Boolean mask of the positions this rule selects.

        Args:
            rel: position of each slot relative to the row's first real token (padding < 0).
            prompt_len: real prompt tokens per row.
            valid: False on padding slots.
        """
        P = prompt_len[:, None]
        r = self.rule
        if r == "all":
            sel = torch.ones_like(valid)
        elif r == "prompt":
            sel = rel < P
        elif r == "last":
            sel = rel == P - 1
        elif r == "generated":
            sel = rel >= P
        elif r == "from_last":
            sel = rel >= P - 1
        elif r == "index":
            sel = torch.zeros_like(valid)
            for i in self.args:
                target = P + i if i < 0 else torch.full_like(P, i)
                sel |= (rel == target) & (target >= 0) & (target < P)
        elif r == "slice":
            start, stop = self.args
            lo = torch.zeros_like(P) if start is None else (P + start if start < 0 else torch.full_like(P, start))
            hi = P if stop is None else (P + stop if stop < 0 else torch.minimum(P, torch.full_like(P, stop)))
            sel = (rel >= lo) & (rel < hi)
        else:  # mask
            m = torch.tensor(self.args, dtype=torch.bool, device=rel.device)
            if m.shape[0] != rel.shape[0]:
                raise SiteError(f"Pos.mask has {m.shape[0]} rows but the batch has {rel.shape[0]}; "
                                "give one mask row per prompt.")
            idx = rel.clamp(min=0)
            inside = (rel >= 0) & (rel < m.shape[1])
            sel = torch.gather(m, 1, idx.clamp(max=m.shape[1] - 1)) & inside & (rel < P)
        return sel & valid

    def counts_fixed(self) -> int | None:
        """Positions selected per row in a prompt pass when that count is fixed (else None)."""
        if self.rule == "last":
            return 1
        if self.rule == "index":
            return len(self.args)
        return None

    def to_dict(self) -> dict:
        return {"rule": self.rule, "args": [list(a) if isinstance(a, tuple) else a for a in self.args]}

    @classmethod
    def from_dict(cls, d: dict | str) -> "Pos":
        if isinstance(d, str):
            return cls(d)
        args = tuple(tuple(a) if isinstance(a, list) else a for a in d.get("args", ()))
        return cls(d["rule"], args)

    def __str__(self) -> str:
        return self.rule if not self.args or self.rule == "mask" else f"{self.rule}{self.args}"


def as_sites(sites: "Site | str | Iterable[Site | str]") -> list[Site]:
    """Normalise one or many site specs to a list of :class:`Site`."""
    if isinstance(sites, (Site, str, dict)):
        return [Site.parse(sites)]
    out = [Site.parse(s) for s in sites]
    if not out:
        raise SiteError("No sites given; pass at least one Site (e.g. emolens.resid(8)).")
    return out
