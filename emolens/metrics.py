"""Metrics: the number that attribution, patching and ablation measure.

A metric maps one forward pass to **one value per batch row**::

    metric(logits: Float[Tensor, "B T V"], batch: Batch, cache: dict[str, Tensor]) -> Float[Tensor, "B"]

- ``logits`` are left-padded like ``batch`` (see :class:`~emolens.model.Batch`).
- ``cache`` maps TransformerLens hook names to full activations of the sites the metric
  declares in ``Metric.sites`` (after any interventions of the run); metrics that only use
  logits ignore it.
- The engine (attribution, patching, ablation curves) **averages** the per-prompt values over
  prompts. A metric that spreads one prompt over several rows (``continuation_logprob_diff``:
  one row with the aligned reply, one with the misaligned reply) declares
  ``rows_per_prompt`` and its row values are **summed** per prompt first.
- Per-prompt data (e.g. one answer token per prompt) is looked up with :func:`prompt_index`,
  which the engines set on every batch they build (rows are tiled and chunked internally).

**Sign conventions.** Every built-in metric is "higher = more of the clean/aligned
behaviour": ``logit_diff`` = logit(good) − logit(bad); ``continuation_logprob_diff`` =
log p(aligned | P) − log p(misaligned | P) (paper 1's A); ``projection`` = activation · direction
(higher = further along the emotion direction, paper 2). Attribution and patching use the
denoising convention (patch clean into corrupted), so a positive score means the component
moves the metric toward its clean value when the clean prompt's value is higher.

Any callable ``fn(logits)``, ``fn(logits, batch)`` or ``fn(logits, batch, cache)`` returning one
value per row can be wrapped with :func:`as_metric`; a value that is not ``[B]`` or not finite
raises :class:`~emolens.errors.MetricError`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float

from .errors import InputError, MetricError
from .sites import Site

__all__ = ["Metric", "as_metric", "logit_diff", "continuation_logprob_diff", "projection", "prompt_index",
           "row_role"]

MetricFn = Callable[..., torch.Tensor]


def prompt_index(batch, rows_per_prompt: int = 1) -> torch.Tensor:
    """Index of the caller's prompt behind each batch row (``[B]`` long).

    Engines set ``batch.prompt_index`` on the batches they build (tiled copies, chunks); a
    plain batch maps row ``r`` to prompt ``r // rows_per_prompt``.
    """
    idx = getattr(batch, "prompt_index", None)
    if idx is not None:
        return idx
    return torch.arange(len(batch), device=batch.input_ids.device) // rows_per_prompt


def row_role(batch, rows_per_prompt: int) -> torch.Tensor:
    """Which of a prompt's rows each batch row is (``0..rows_per_prompt-1``; ``[B]`` long)."""
    role = getattr(batch, "row_role", None)
    if role is not None:
        return role
    return torch.arange(len(batch), device=batch.input_ids.device) % rows_per_prompt


class Metric:
    """A validated metric: ``metric(logits, batch, cache) -> Tensor[B]``.

    Attributes:
        name: short label stored in result metadata.
        sites: sites whose activations the metric reads from ``cache`` (engines capture them).
        rows_per_prompt: batch rows per prompt (their values are summed per prompt).
        description: one line on what the value means and its sign.
    """

    def __init__(self, fn: MetricFn, *, name: str, sites: Sequence[Site] = (), rows_per_prompt: int = 1,
                 encoder: Callable | None = None, description: str = "",
                 logit_positions: Callable[[Any], int | None] | None = None):
        self.fn = fn
        self.name = name
        self.sites = tuple(Site.parse(s) for s in sites)
        self.rows_per_prompt = int(rows_per_prompt)
        self._encoder = encoder
        self.description = description
        self._logit_positions = logit_positions

    def trailing_logits(self, batch) -> int | None:
        """How many trailing (padded) positions of the logits the metric reads; ``None`` = all.

        Engines unembed only those positions (the rest of the logits tensor is zeros). Built-in
        metrics declare it (t* and after: the reply); wrapped user callables read all positions.
        """
        if self._logit_positions is None:
            return None
        k = self._logit_positions(batch)
        return None if k is None else max(1, min(int(k), batch.input_ids.shape[1]))

    def __repr__(self) -> str:
        return f"Metric({self.name!r})"

    def __call__(self, logits: Float[torch.Tensor, "B T V"], batch, cache: dict | None = None
                 ) -> Float[torch.Tensor, "B"]:
        out = self.fn(logits, batch, cache if cache is not None else {})
        B = logits.shape[0]
        if not isinstance(out, torch.Tensor):
            raise MetricError(f"Metric {self.name!r} returned {type(out).__name__}; return a tensor with one "
                              f"value per batch row (shape [{B}]).")
        if out.ndim == 0:
            raise MetricError(f"Metric {self.name!r} returned a scalar; return one value per batch row "
                              f"(shape [{B}]) — drop the final .mean(); the engine averages over prompts.")
        if out.shape != (B,):
            raise MetricError(f"Metric {self.name!r} returned shape {tuple(out.shape)}; it must be one value per "
                              f"batch row, shape [{B}] (reduce positions/tokens inside the metric).")
        if not torch.isfinite(out).all():
            bad = "NaN" if torch.isnan(out).any() else "inf"
            raise MetricError(f"Metric {self.name!r} returned {bad} values; check for log(0), empty token "
                              "sets or a zero-norm direction.")
        return out

    def per_prompt(self, values: Float[torch.Tensor, "B"]) -> Float[torch.Tensor, "n"]:
        """Sum row values per prompt (rows are grouped contiguously, ``rows_per_prompt`` each)."""
        r = self.rows_per_prompt
        if values.shape[0] % r:
            raise MetricError(f"Metric {self.name!r} needs {r} rows per prompt, got a batch of {values.shape[0]}.")
        return values.reshape(-1, r).sum(1) if r > 1 else values

    def encode(self, model, prompts, *, chat: bool | None = None, system: str | None = None):
        """The batch this metric needs for ``prompts`` (default: ``model.encode(prompts)``)."""
        if self._encoder is not None:
            return self._encoder(model, prompts, chat=chat, system=system)
        return model.encode(prompts, chat=chat, system=system)


def as_metric(fn: "Metric | MetricFn", name: str | None = None) -> Metric:
    """Wrap a user callable ``fn(logits[, batch[, cache]]) -> Tensor[B]`` as a :class:`Metric`."""
    if isinstance(fn, Metric):
        return fn
    if not callable(fn):
        raise MetricError(f"A metric must be callable, got {type(fn).__name__}.")
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        varargs = any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
        n = 3 if varargs else len(params)
    except (TypeError, ValueError):
        n = 3
    if n >= 3:
        call = fn
    elif n == 2:
        def call(logits, batch, cache):
            return fn(logits, batch)
    elif n == 1:
        def call(logits, batch, cache):
            return fn(logits)
    else:
        raise MetricError("A metric takes (logits), (logits, batch) or (logits, batch, cache).")
    return Metric(call, name=name or getattr(fn, "__name__", "metric"), description="user metric")


# =========================================================================================
# Built-in metrics
# =========================================================================================
def _token_id(model, tok: "int | str") -> int:
    if isinstance(tok, bool):
        raise InputError(f"Token {tok!r} is not a token id or string.")
    if isinstance(tok, int):
        if not 0 <= tok < model.d_vocab:
            raise InputError(f"Token id {tok} is outside the vocabulary (0..{model.d_vocab - 1}).")
        return tok
    if isinstance(tok, str):
        ids = model.tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{tok!r} is {len(ids)} tokens for {model.name}; logit_diff needs single tokens "
                             "(e.g. ' happy' with its leading space) or token ids. For multi-token replies use "
                             "continuation_logprob_diff.")
        return ids[0]
    raise InputError(f"Token {tok!r} must be an int id or a string.")


def _token_sets(model, toks) -> tuple[list[list[int]], bool]:
    """(sets, per_prompt): a shared set, or one set per prompt when given a list of lists."""
    if isinstance(toks, (int, str)):
        return [[_token_id(model, toks)]], False
    toks = list(toks)
    if not toks:
        raise InputError("An empty token set; give at least one token.")
    if all(isinstance(t, (list, tuple)) for t in toks):
        sets = [[_token_id(model, t) for t in row] for row in toks]
        if any(not s for s in sets):
            raise InputError("A per-prompt token set is empty; give at least one token per prompt.")
        return sets, True
    return [[_token_id(model, t) for t in toks]], False


def _from_t_star(batch) -> int:
    """Trailing positions from the earliest t* to the end (left padding: t* sits before the reply)."""
    return int((batch.seq_len - batch.prompt_len).max()) + 1


def _position_index(batch, pos) -> torch.Tensor:
    """Padded index of one position per row: ``"last"`` = t*, or a prompt position (negative from t*)."""
    if pos == "last":
        return batch.last_prompt_index
    if isinstance(pos, int):
        rel = batch.prompt_len + pos if pos < 0 else torch.full_like(batch.prompt_len, pos)
        if ((rel < 0) | (rel >= batch.seq_len)).any():
            raise MetricError(f"Position {pos} does not exist in every row; use 'last' or a smaller index.")
        return batch.pad_offset + rel
    raise InputError(f"pos must be 'last' or an int position, got {pos!r}.")


def _gather_sets(values: torch.Tensor, sets: list[list[int]], per_prompt: bool, batch) -> torch.Tensor:
    """Mean of ``values[b, set_b]`` per row (values: [B, V])."""
    if not per_prompt:
        idx = torch.tensor(sets[0], device=values.device)
        return values[:, idx].mean(-1)
    pid = prompt_index(batch).tolist()
    if max(pid) >= len(sets):
        raise MetricError(f"Per-prompt token sets cover {len(sets)} prompts but the batch has prompt "
                          f"{max(pid)}; give one set per prompt.")
    return torch.stack([values[b, torch.tensor(sets[p], device=values.device)].mean() for b, p in enumerate(pid)])


def logit_diff(model, good_tokens, bad_tokens, pos: "str | int" = "last", *, name: str | None = None) -> Metric:
    """Logit difference between token sets at one position.

    ``value[b] = mean_{t in good} logits[b, p, t] - mean_{t in bad} logits[b, p, t]`` where ``p`` is
    t* (the last prompt token, which predicts the reply's first token) or a prompt position.

    Args:
        model: the :class:`~emolens.model.EmoModel` (to tokenise strings).
        good_tokens, bad_tokens: a token (id or single-token string), a list of them (a set
            shared by all prompts), or a list of lists (one set per prompt, in prompt order).
        pos: ``"last"`` (t*) or an int prompt position (negative counts back from t*: -1 = t*).

    Sign: higher = the model prefers the good tokens more.
    """
    good, good_pp = _token_sets(model, good_tokens)
    bad, bad_pp = _token_sets(model, bad_tokens)

    def fn(logits, batch, cache):
        p = _position_index(batch, pos)
        at = logits[torch.arange(logits.shape[0], device=logits.device), p].float()  # [B, V]
        return _gather_sets(at, good, good_pp, batch) - _gather_sets(at, bad, bad_pp, batch)

    return Metric(fn, name=name or "logit_diff",
                  description="logit(good) - logit(bad) at t*; higher = prefers the good tokens",
                  logit_positions=_from_t_star if pos == "last" else None)


def continuation_logprob_diff(model, aligned: "str | Sequence[str]", misaligned: "str | Sequence[str]", *,
                              per_token: bool = False, name: str | None = None) -> Metric:
    """Paper 1's A = log p(y+ | P) − log p(y− | P): teacher-forced, summed over reply tokens (nats).

    Each prompt becomes two rows (prompt + aligned reply, prompt + misaligned reply; row values
    ``+log p(y+)`` and ``-log p(y-)``, summed per prompt). Pass prompts (strings / message lists),
    not pre-built batches, so the metric can append the replies; with pre-built batches the rows
    must already alternate aligned/misaligned.

    Args:
        aligned, misaligned: one reply shared by every prompt, or one per prompt.
        per_token: use the mean log-prob per reply token instead of the sum (length-normalised).

    Sign: higher = the aligned reply is more likely than the misaligned one.
    """
    from .model import continuation_logprob_from_logits

    def _per_prompt(x, n):
        if isinstance(x, str):
            return [x] * n
        x = list(x)
        if len(x) != n:
            raise InputError(f"{n} prompts but {len(x)} replies; give one reply per prompt or a single string.")
        return x

    def encoder(model, prompts, *, chat=None, system=None):
        from .model import Batch

        if isinstance(prompts, Batch):
            return prompts
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        pos_r, neg_r = _per_prompt(aligned, len(prompts)), _per_prompt(misaligned, len(prompts))
        if any(not r for r in pos_r + neg_r):
            raise InputError("An empty reply; aligned and misaligned replies need at least one token.")
        rows = [p for p in prompts for _ in (0, 1)]
        conts = [c for pr in zip(pos_r, neg_r) for c in pr]
        return model.encode(rows, chat=chat, system=system, continuations=conts)

    def fn(logits, batch, cache):
        lp, n = continuation_logprob_from_logits(logits, batch)
        if (n == 0).any():
            raise MetricError("A row has no reply tokens; continuation_logprob_diff needs prompts encoded with "
                              "their replies (pass prompts, not bare batches).")
        if per_token:
            lp = lp / n
        sign = 1.0 - 2.0 * row_role(batch, 2).to(lp.dtype)  # +1 aligned row, -1 misaligned row
        return lp * sign

    return Metric(fn, name=name or "continuation_logprob_diff", rows_per_prompt=2, encoder=encoder,
                  description="log p(aligned|P) - log p(misaligned|P), teacher-forced; higher = aligned",
                  logit_positions=_from_t_star)


def projection(site: "Site | str", direction: torch.Tensor, pos: "str | int" = "last", *, normalize: bool = True,
               name: str | None = None) -> Metric:
    """Projection of a site's activation on a direction (paper 2's emotion score).

    ``value[b] = act[b, p] · d`` with ``d = direction / ||direction||`` (``normalize=True``), read
    from the cache of the run (after its interventions). ``act`` is the site's component view
    (``[d_model]`` residual/sublayer, ``[n_sel, d_head]`` flattened for heads, ``[n_sel]`` neurons).

    Args:
        site: where to read, e.g. ``resid(12)``.
        direction: a vector of the component's flattened width.
        pos: ``"last"`` (t*), ``"mean"`` (mean over prompt positions) or an int prompt position.

    Sign: higher = further along ``direction``.
    """
    from .interventions import component_view

    site = Site.parse(site)
    d = torch.as_tensor(direction).detach().float().flatten()
    if not torch.isfinite(d).all():
        raise InputError("The projection direction contains NaN/inf.")
    if normalize:
        nrm = d.norm()
        if nrm == 0:
            raise InputError("The projection direction has zero norm; pass a non-zero vector.")
        d = d / nrm

    def fn(logits, batch, cache):
        if site.hook_name not in cache:
            raise MetricError(f"projection({site}) found no activation for {site.hook_name} in the cache; run it "
                              "through an emolens engine (which captures Metric.sites) or put it in the cache.")
        act = component_view(site, cache[site.hook_name])
        act = act.flatten(2)  # [B, T, width]
        if act.shape[-1] != d.numel():
            raise MetricError(f"projection({site}): direction has {d.numel()} entries, the site has "
                              f"{act.shape[-1]} per position.")
        if pos == "mean":
            T = act.shape[1]
            rel = torch.arange(T, device=act.device)[None] - batch.pad_offset[:, None]
            m = ((rel >= 0) & (rel < batch.prompt_len[:, None])).to(act.dtype)
            vec = (act * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        else:
            p = _position_index(batch, pos)
            vec = act[torch.arange(act.shape[0], device=act.device), p]
        return vec.float() @ d.to(vec.device)

    return Metric(fn, name=name or f"projection({site})", sites=(site,),
                  description=f"activation at {site} projected on a direction; higher = further along it",
                  logit_positions=lambda batch: 1)  # reads no logits
