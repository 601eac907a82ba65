"""circuitsvis attention patterns that render offline.

circuitsvis's default string form (``str(obj)``) imports its JavaScript from a CDN and is blank
without network. Here the package's bundled ``iife.js`` (~1.3 MB) is embedded **once per page**
as a classic ``<script>`` (so ``CircuitsVis`` is a global), and each widget is a small
``<div>`` + ``CircuitsVis.render(...)`` call.

- :func:`attention_heads_html` turns patterns ``[heads, query, key]`` + tokens into an HTML snippet.
  With ``include_bundle=False`` (what the report uses) it expects the page to carry
  :func:`bundle_script` once; the snippet carries :data:`NEEDS_BUNDLE` so
  :mod:`emolens.report` knows to add it.
- :class:`AttentionView` wraps a snippet for notebooks (``_repr_html_`` includes the bundle, so it
  works offline) and for reports (a :class:`~emolens.sections.Section` figure may be an
  ``AttentionView`` or its HTML).
- :func:`head_patterns` computes patterns of chosen heads on one prompt through the emolens hook
  engine (a read-only reader on ``blocks.L.attn.hook_pattern``).
"""

from __future__ import annotations

import functools
import html
import json
import re
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float

from ..errors import InputError, MissingDependencyError, ResultError, SiteError

#: Marker comment in snippets that need the circuitsvis bundle on the page.
NEEDS_BUNDLE = "<!--emolens:circuitsvis-->"

__all__ = ["NEEDS_BUNDLE", "bundle_js", "bundle_script", "attention_heads_html", "AttentionView", "head_patterns",
           "attention_heads", "strip_bundle", "standalone_html"]


@functools.lru_cache(maxsize=1)
def bundle_js() -> str:
    """The circuitsvis IIFE bundle source (defines the global ``CircuitsVis``), safe to inline."""
    try:
        import circuitsvis
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise MissingDependencyError("circuitsvis is not installed; `pip install circuitsvis`.") from e
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        raise MissingDependencyError(f"circuitsvis is installed without its bundle ({path}); reinstall circuitsvis.")
    js = path.read_text(encoding="utf-8")
    # An inline "</script" would end the element early; "<\/script" means the same inside JS strings.
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


def bundle_script() -> str:
    """``<script>`` element that defines ``CircuitsVis`` globally (include once per page)."""
    return f'<script data-emolens="circuitsvis-bundle">\n{bundle_js()}\n</script>'


def _props_json(props: dict) -> str:
    # JSON in a <script>: escape "</" and HTML comment openers so the text cannot close the element.
    return json.dumps(props).replace("</", "<\\/").replace("<!--", "<\\u0021--")


def attention_heads_html(pattern: Float[torch.Tensor, "head query key"], tokens: Sequence[str],
                         head_names: Sequence[str] | None = None, *, include_bundle: bool = False,
                         max_value: float | None = None, min_value: float | None = None,
                         mask_upper_tri: bool = True) -> str:
    """HTML for circuitsvis ``AttentionHeads`` (head thumbnails + a zoomed pattern with tokens).

    Args:
        pattern: attention probabilities ``[n_heads, n_query, n_key]`` (rows sum to 1).
        tokens: ``n_query`` token strings (``n_query == n_key``).
        head_names: one name per head (default ``"head i"``).
        include_bundle: prepend the circuitsvis bundle (for a standalone page or notebook cell).
        max_value, min_value: colour range (default: the data's range as circuitsvis computes it).
        mask_upper_tri: hide the upper triangle (causal attention).

    Returns:
        An HTML snippet: ``<div>`` + ``<script>CircuitsVis.render(...)</script>``.
    """
    p = torch.as_tensor(pattern).detach().float().cpu()
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.numel() == 0:
        raise ResultError(f"attention_heads_html() needs a non-empty pattern [heads, query, key], got shape "
                          f"{tuple(p.shape)}.")
    if p.shape[1] != len(tokens) or p.shape[2] != len(tokens):
        raise InputError(f"attention_heads_html(): {len(tokens)} tokens for a pattern of shape {tuple(p.shape)}; "
                         "pass one token string per position.")
    names = list(head_names) if head_names is not None else [f"head {i}" for i in range(p.shape[0])]
    if len(names) != p.shape[0]:
        raise InputError(f"{len(names)} head names for {p.shape[0]} heads.")
    props: dict[str, Any] = {"attention": p.nan_to_num(0.0).tolist(), "tokens": [str(t) for t in tokens],
                             "attentionHeadNames": [str(n) for n in names], "maskUpperTri": bool(mask_upper_tri)}
    if max_value is not None:
        props["maxValue"] = float(max_value)
    if min_value is not None:
        props["minValue"] = float(min_value)
    div = "circuits-vis-" + uuid.uuid4().hex[:12]
    snippet = (f'{NEEDS_BUNDLE}<div id="{div}" class="emolens-circuitsvis" style="margin: 15px 0;"></div>\n'
               f"<script>\n(function () {{\n"
               f"  var draw = function () {{ CircuitsVis.render({json.dumps(div)}, CircuitsVis.AttentionHeads, "
               f"{_props_json(props)}); }};\n"
               "  if (typeof CircuitsVis === 'undefined') { window.addEventListener('load', draw); } else { draw(); }\n"
               "})();\n</script>")
    return (bundle_script() + "\n" + snippet) if include_bundle else snippet


def strip_bundle(local_src: str) -> str:
    """Remove the inlined bundle from a circuitsvis ``RenderedHTML.local_src`` (page has it once)."""
    raw = bundle_js().replace("<\\/script", "</script")
    cv_inline = raw.replace("</script>", "")  # what circuitsvis itself inlines
    if cv_inline in local_src:
        return NEEDS_BUNDLE + local_src.replace(cv_inline, "")
    return local_src


def standalone_html(snippet: str, title: str = "emolens") -> str:
    """A complete offline HTML page around a snippet (bundle included when the snippet needs it)."""
    head = bundle_script() if NEEDS_BUNDLE in snippet else ""
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{head}</head>"
            f"<body>{snippet}</body></html>")


class AttentionView:
    """Attention patterns of some heads on one prompt, displayable offline.

    Attributes:
        pattern: ``[n_heads, n_query, n_key]`` attention probabilities.
        tokens: token strings (length ``n_query``).
        head_names: e.g. ``["L3H2", ...]``.
    """

    def __init__(self, pattern: Float[torch.Tensor, "head query key"], tokens: Sequence[str],
                 head_names: Sequence[str] | None = None, title: str | None = None):
        self.pattern = torch.as_tensor(pattern).detach().float().cpu()
        self.tokens = [str(t) for t in tokens]
        self.head_names = list(head_names) if head_names is not None else None
        self.title = title
        attention_heads_html(self.pattern, self.tokens, self.head_names)  # validate now, not at display time

    def html(self, include_bundle: bool = False) -> str:
        """The widget snippet (see :func:`attention_heads_html`)."""
        return attention_heads_html(self.pattern, self.tokens, self.head_names, include_bundle=include_bundle)

    def _repr_html_(self) -> str:
        # Notebooks: bundle each time (offline-safe; cells are independent documents in many front-ends).
        return self.html(include_bundle=True)

    def save(self, path: str | Path) -> Path:
        """Write a standalone offline HTML page."""
        p = Path(path)
        p.write_text(standalone_html(self.html(), self.title or "attention patterns"), encoding="utf-8")
        return p

    def __repr__(self) -> str:
        return f"AttentionView(heads={self.head_names}, n_tokens={len(self.tokens)})"


class _PatternSite:
    """Read-only pseudo-site for ``blocks.L.attn.hook_pattern`` ([batch, head, query, key])."""

    kind = "pattern"
    index = None
    indices = None

    def __init__(self, layer: int):
        self.layer = int(layer)
        self.hook_name = f"blocks.{self.layer}.attn.hook_pattern"

    def validate(self, model) -> "_PatternSite":
        if not 0 <= self.layer < model.n_layers:
            raise SiteError(f"Layer {self.layer} is out of range for {model.name}: valid layers are "
                            f"0..{model.n_layers - 1}.")
        return self


def _parse_heads(heads: Any) -> list[tuple[int, int]]:
    from ..sites import Site

    out: list[tuple[int, int]] = []
    items = [heads] if isinstance(heads, (str, Site)) else list(heads)
    for h in items:
        if isinstance(h, str):
            h = Site.parse(h if h.startswith("head.") else f"head.{h}")
        if isinstance(h, Site):
            if h.kind != "head" or h.indices is None:
                raise SiteError(f"{h} is not a head site with indices; use e.g. head(3, 2) or 'head.3.2'.")
            out.extend((h.layer, i) for i in h.indices)
        else:
            layer, hd = h
            out.append((int(layer), int(hd)))
    if not out:
        raise InputError("No heads given; pass e.g. [(3, 2), (5, 0)] or ['head.3.2'].")
    return out


def read_patterns(model, batch, pairs: list[tuple[int, int]], interventions=None) -> torch.Tensor:
    """Attention patterns ``[len(pairs), T, T]`` of ``(layer, head)`` pairs on one encoded prompt.

    ``batch`` holds one row (left padding dropped); ``interventions`` run during the forward pass.
    """
    from ..interventions import HookPlan, Reader

    for layer, hd in pairs:
        if not 0 <= layer < model.n_layers or not 0 <= hd < model.n_heads:
            raise SiteError(f"Head ({layer}, {hd}) is out of range for {model.name}: layers 0..{model.n_layers - 1},"
                            f" heads 0..{model.n_heads - 1}.")
    off = int(batch.pad_offset[0])
    got: dict[int, torch.Tensor] = {}

    def keep(layer):
        def fn(values, sel, tracker):
            got[layer] = values[0, :, off:, off:].detach().float().cpu()
        return fn

    readers = [Reader(_PatternSite(L), keep(L)) for L in dict.fromkeys(L for L, _ in pairs)]
    plan = HookPlan(model, list(interventions or []), readers)
    with plan.hooks(), torch.no_grad():
        plan.forward(batch)
    missing = [L for L, _ in pairs if L not in got]
    if missing:
        raise SiteError(f"This model exposes no attention pattern hook at layers {sorted(set(missing))}.")
    return torch.stack([got[L][h] for L, h in pairs])


def head_patterns(model, prompt: str, heads: Any, *, chat: bool | None = None, system: str | None = None
                  ) -> AttentionView:
    """Attention patterns of chosen heads on one prompt.

    Args:
        model: an :class:`~emolens.model.EmoModel`.
        prompt: one prompt (chat template applied per ``chat``, as in ``model.encode``).
        heads: ``[(layer, head), ...]``, head sites (``head(3, [0, 2])``) or strings ``"head.3.2"``
            (query-head indices; for GQA models several query heads share a KV head).

    Returns:
        :class:`AttentionView` with ``pattern [n_heads_selected, T, T]`` over the prompt's real tokens.
    """
    pairs = _parse_heads(heads)
    batch = model.encode([prompt], chat=chat, system=system)
    pattern = read_patterns(model, batch, pairs)
    return AttentionView(pattern, model.to_str_tokens(batch), [f"L{L}H{h}" for L, h in pairs],
                         title=f"Attention patterns on {prompt[:40]!r}")


def attention_heads(model, prompt: str, heads: Any, **kw) -> AttentionView:
    """Alias of :func:`head_patterns`."""
    return head_patterns(model, prompt, heads, **kw)
