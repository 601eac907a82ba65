"""Attribution patching: a first-order estimate of every activation-patching effect at once.

**Convention (denoising, as TransformerLens).** For a node ``n`` (a residual position, a head,
a neuron, a sublayer, a query/key/value head or an edge) the effect being estimated is

    effect(n) = M(corrupted run with n set to its clean value) - M(corrupted run)

averaged over prompt pairs, where ``M`` is a :mod:`emolens.metrics` metric. A positive score
means patching the node's clean value in moves the metric up. Attribution patching (AtP)
estimates it as ``(a_clean - a_corrupted) · dM/da`` with the gradient taken on the corrupted
run: one clean forward, one corrupted forward and one backward pass score every node,
whatever their number.

Methods (``method=``):

- ``"atp"``: plain AtP (Nanda 2022; TransformerLens ``tools.analysis.attribution_patch``).
- ``"atp*"``: AtP* (Kramár et al. 2024): (a) the **QK fix** for query/key nodes (``"q"``,
  ``"k"``): the attention softmax is recomputed exactly with the patched queries (keys) and
  only the gradient with respect to the attention probabilities is linearised; (b)
  **GradDrop** against cancellation between direct and indirect paths: the backward pass is
  repeated ``n_layers`` times, each time with the gradient through one layer's residual writes
  (``attn_out``/``mlp_out`` of layer ℓ) set to zero, and the node score is
  ``GD(n) = 1/(L-1) Σ_ℓ |AtP_drop ℓ(n)|``. The stored score is ``sign(AtP(n)) * GD(n)`` (GD is a
  magnitude); ``extra["atp"]`` keeps the estimate without GradDrop and ``extra["graddrop"]`` the
  unsigned GD. Cost: one forward and ``n_layers + 1`` backward passes.
- ``"ig"``: integrated gradients along the input path, EAP-IG style (Hanna et al. 2024): the
  embeddings are interpolated ``x_corr + α (x_clean - x_corr)`` for ``α = k/ig_steps``,
  ``k = 0..ig_steps-1`` (so ``ig_steps=1`` is plain AtP), the gradient at every node is
  averaged over the steps and multiplied by ``a_clean - a_corrupted``. Cost: ``ig_steps``
  forward+backward passes. At the embedding (``resid`` layer 0) the scores summed over
  positions converge to ``M(clean) - M(corrupted)`` (completeness).

**Node groups** (``nodes=``; each becomes one :class:`~emolens.results.Result`):

=============  ================  ===================================  ==============================
key            Result kind       axes                                 patched activation
=============  ================  ===================================  ==============================
``resid``      ``resid_pos``     (layer, position)                    ``hook_resid_pre`` (or post)
``heads``      ``heads``         (layer, head)                        ``attn.hook_z`` of a query
                                                                      head, all positions
``heads_pos``  ``heads_pos``     (layer, head, position)              (``per_position_heads=True``)
``neurons``    ``neurons``       (layer, neuron)                      ``mlp.hook_post``, all positions
``sublayers``  ``sublayers``     (layer, sublayer ["attn", "mlp"])    ``hook_attn_out``/``hook_mlp_out``
``q``          ``heads``         (layer, head)                        ``attn.hook_q`` (query head)
``k``/``v``    ``heads``         (layer, head = KV head)              ``attn.hook_k``/``hook_v``
``edges``      ``matrix``        (row = writer, col = reader)         see below
=============  ================  ===================================  ==============================

Positions are aligned on t* (the last prompt token): column ``j`` is ``j - (P_max - 1)``
tokens from t*; labels are the first clean row's tokens. ``q``/``k``/``v`` use KV heads for
``k``/``v`` on GQA models.

**Edges** (EAP): writers are the embedding, every attention head (per query head) and every
MLP; readers are every head's query input (per query head), every KV head's key and value
inputs, every MLP input and the logits. ``score(u -> v) = Σ (write_u,clean - write_u,corr) ·
dM/d(input of v, through v only)``; the per-reader gradient is split out of the shared
residual by back-propagating each head's ``dM/dq_h`` (``dM/dk_g``, ``dM/dv_g`` for its KV head
``g``) through ``W_Q``/``W_K``/``W_V`` and the pre-attention norm, so GQA models need no
ungrouping. On post-norm blocks (Gemma 2/3: ``post_attention_layernorm``) a head's write is
``J·Δresult_h``, the head's output linearised through the post-attention norm at the corrupted
activation (the norm mixes heads, so per-head writes are only additive to first order); MLP
writes (after ``post_feedforward_layernorm``) are exact. Impossible edges (reader before
writer) are NaN. Summed over readers, a writer's edge scores equal its node score (AtP).
Edges need a logits-based metric, pre-norm attention inputs (``ln1``), separate
``q``/``k``/``v``/``o`` projections and sequential (not parallel) attention/MLP blocks; other
architectures raise :class:`~emolens.errors.InputError`. ``atp*`` edges use the plain AtP
gradient (the QK fix and GradDrop are node corrections).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from jaxtyping import Bool, Int

from .errors import InputError, MetricError
from .interventions import HookPlan, HookReader, Intervention, Reader, Replace
from .metrics import Metric, as_metric
from .progress import progress_bar
from .results import Result, inputs_hash
from .sites import Site

__all__ = ["attribute", "prepare_pairs", "PairedInputs", "NODE_GROUPS", "METHODS", "DEFAULT_NODES",
           "tile_batch", "CONVENTION"]

NODE_GROUPS = ("resid", "heads", "neurons", "sublayers", "q", "k", "v", "edges")
DEFAULT_NODES = ("resid", "heads", "neurons", "sublayers")
METHODS = ("atp", "atp*", "ig")
CONVENTION = ("denoising: effect = M(corrupted with the node's clean value) - M(corrupted), "
              "mean over prompt pairs; positive = patching the clean value in raises the metric")


# =========================================================================================
# Paired inputs
# =========================================================================================
def _repad(batch, T: int):
    """Left-pad a batch to ``T`` positions (same rows, same real tokens)."""
    from .model import Batch

    B, T0 = batch.input_ids.shape
    if T0 == T:
        return batch
    if T0 > T:
        raise InputError(f"Cannot shrink a batch of {T0} positions to {T}.")
    # any in-vocabulary id works under a zero attention mask; reuse the batch's own padding id
    pads = batch.input_ids[batch.attention_mask == 0]
    pad = torch.full((B, T - T0), int(pads[0]) if pads.numel() else 0, dtype=batch.input_ids.dtype,
                     device=batch.input_ids.device)
    ids = torch.cat([pad, batch.input_ids], 1)
    mask = torch.cat([torch.zeros_like(pad), batch.attention_mask], 1)
    out = Batch(ids, mask, batch.prompt_len, batch.seq_len, batch.texts)
    for attr in ("prompt_index", "row_role"):
        if hasattr(batch, attr):
            setattr(out, attr, getattr(batch, attr))
    return out


def tile_batch(batch, reps: int):
    """``reps`` stacked copies of a batch (copy-major), keeping ``prompt_index``/``row_role``."""
    from .model import Batch

    if reps == 1:
        return batch
    out = Batch(batch.input_ids.repeat(reps, 1), batch.attention_mask.repeat(reps, 1), batch.prompt_len.repeat(reps),
                batch.seq_len.repeat(reps), list(batch.texts) * reps)
    for attr in ("prompt_index", "row_role"):
        if hasattr(batch, attr):
            setattr(out, attr, getattr(batch, attr).repeat(reps))
    return out


def _as_prompt_list(x) -> list:
    if isinstance(x, str):
        return [x]
    x = list(x)
    if x and isinstance(x[0], dict):  # one message list
        return [x]
    return x


@dataclass
class _Chunk:
    """One slice of prompt pairs, ready to run."""

    clean: Any
    corr: Any
    valid: Bool[torch.Tensor, "rows pos"]
    aligned: Int[torch.Tensor, "rows pos"]  # aligned position index, -1 where not both real
    pid: Int[torch.Tensor, "rows"]  # local prompt index (0..n_chunk-1)
    prompts: list[int]  # global prompt indices

    @property
    def n(self) -> int:
        return len(self.prompts)

    def per_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """Sum rows of ``x`` ([rows, ...]) per prompt → [n, ...]."""
        out = torch.zeros((self.n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        return out.index_add_(0, self.pid.to(x.device), x)


@dataclass
class PairedInputs:
    """Clean and corrupted batches paired row by row, with a t*-aligned position axis.

    Attributes:
        clean, corrupted: batches padded to the same length (rows = prompts × rows_per_prompt).
        n_prompts: number of prompt pairs.
        rows_per_prompt: rows per prompt (from the metric).
        n_pos: length of the aligned position axis (longest prompt + longest continuation).
        p_max: longest corrupted prompt (t* sits at aligned index ``p_max - 1``).
        position_labels: the first clean row's tokens on the aligned axis ("" where absent).
        inputs_hash: hash of both prompt lists.
    """

    clean: Any
    corrupted: Any
    n_prompts: int
    rows_per_prompt: int
    n_pos: int
    p_max: int
    position_labels: list[str]
    inputs_hash: str
    align: str | None = None
    extra: dict = field(default_factory=dict)

    def chunk(self, prompts: Sequence[int]) -> _Chunk:
        r = self.rows_per_prompt
        rows = [p * r + i for p in prompts for i in range(r)]
        c, x = self.clean.select(rows), self.corrupted.select(rows)
        T = max(c.input_ids.shape[1], x.input_ids.shape[1])
        c, x = _repad(c, T), _repad(x, T)
        dev = x.input_ids.device
        pid = torch.arange(len(rows), device=dev) // r
        for b in (c, x):
            b.prompt_index = torch.tensor(list(prompts), device=dev)[pid]
            b.row_role = torch.arange(len(rows), device=dev) % r
        valid = (c.attention_mask > 0) & (x.attention_mask > 0)
        rel = torch.arange(T, device=dev)[None] - x.pad_offset[:, None]
        j = rel + self.p_max - x.prompt_len[:, None]
        aligned = torch.where(valid & (j >= 0) & (j < self.n_pos), j, torch.full_like(j, -1))
        valid = valid & (aligned >= 0)
        return _Chunk(c, x, valid, aligned, pid, list(prompts))

    def chunks(self, prompts_per_chunk: int) -> "_Chunks":
        """The chunks of ``prompts_per_chunk`` pairs, built one at a time as they are iterated."""
        return _Chunks(self, max(1, int(prompts_per_chunk)))


@dataclass
class _Chunks:
    """Lazy sequence of a :class:`PairedInputs`' chunks: only the running chunk's batches exist."""

    pairs: PairedInputs
    step: int

    def __len__(self) -> int:
        return -(-self.pairs.n_prompts // self.step)

    def __getitem__(self, i: int) -> _Chunk:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        s = (i % len(self)) * self.step
        return self.pairs.chunk(range(s, min(self.pairs.n_prompts, s + self.step)))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def prepare_pairs(model, clean, corrupted, metric: Metric, *, align: str | None = None, chat: bool | None = None,
                  system: str | None = None) -> PairedInputs:
    """Encode and check clean/corrupted prompt pairs.

    Args:
        clean, corrupted: equal-length lists of prompts (strings or message lists), or
            pre-built :class:`~emolens.model.Batch` es with the same number of rows.
        metric: decides how prompts are encoded (e.g. with replies appended).
        align: ``None`` (default) requires every pair to tokenise to the same number of prompt
            and reply tokens; ``"right"`` right-aligns each pair on t* (positions that exist in
            only one prompt are never patched; replies must still match in length).
    """
    from .model import Batch

    if align not in (None, "right"):
        raise InputError(f"Unknown alignment rule {align!r}; use None (pairs of equal token length) or 'right' "
                         "(right-align each pair on t*).")
    if isinstance(clean, Batch) != isinstance(corrupted, Batch):
        raise InputError("Pass clean and corrupted both as prompt lists or both as Batches.")
    if isinstance(clean, Batch):
        cb, xb = clean, corrupted
        texts_c, texts_x = list(cb.texts), list(xb.texts)
    else:
        cl, xl = _as_prompt_list(clean), _as_prompt_list(corrupted)
        if not cl or not xl:
            raise InputError("No prompt pairs; pass at least one clean and one corrupted prompt.")
        if len(cl) != len(xl):
            raise InputError(f"{len(cl)} clean prompts but {len(xl)} corrupted prompts; pass one corrupted prompt "
                             "per clean prompt (repeat a single baseline, e.g. [baseline] * len(clean)).")
        cb = metric.encode(model, cl, chat=chat, system=system)
        xb = metric.encode(model, xl, chat=chat, system=system)
        texts_c, texts_x = [str(p) for p in cl], [str(p) for p in xl]
    if len(cb) != len(xb):
        raise InputError(f"The clean batch has {len(cb)} rows and the corrupted batch {len(xb)}; pair them row by row.")
    r = metric.rows_per_prompt
    if len(cb) % r:
        raise InputError(f"Metric {metric.name!r} needs {r} rows per prompt but the batch has {len(cb)} rows.")
    cont_c, cont_x = cb.seq_len - cb.prompt_len, xb.seq_len - xb.prompt_len
    if align is None:
        bad = ((cb.prompt_len != xb.prompt_len) | (cont_c != cont_x)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise InputError(
                f"Pair {i // r}: the clean prompt is {int(cb.seq_len[i])} tokens and the corrupted prompt "
                f"{int(xb.seq_len[i])} tokens ({int(cb.prompt_len[i])} vs {int(xb.prompt_len[i])} before the reply). "
                "Patching pairs positions one to one: make each pair the same token length (e.g. swap "
                "single-token words), or pass align='right' to right-align the pair on the last prompt token.")
    elif (cont_c != cont_x).any():
        i = int((cont_c != cont_x).nonzero()[0])
        raise InputError(f"Pair {i // r}: the clean and corrupted replies differ in token length "
                         f"({int(cont_c[i])} vs {int(cont_x[i])}); align='right' aligns prompts on t*, "
                         "so the replies must match.")
    T = max(cb.input_ids.shape[1], xb.input_ids.shape[1])
    cb, xb = _repad(cb, T), _repad(xb, T)
    p_max = int(xb.prompt_len.max())
    n_pos = p_max + int(cont_x.max())
    labels = [""] * n_pos
    off, P = int(cb.pad_offset[0]), int(cb.prompt_len[0])
    toks = [model.tokenizer.decode([t]) for t in cb.input_ids[0, off:].tolist()]
    for rel, t in enumerate(toks):
        j = rel + p_max - P
        if 0 <= j < n_pos:
            labels[j] = t
    return PairedInputs(cb, xb, len(cb) // r, r, n_pos, p_max, labels,
                        inputs_hash(texts_c, texts_x, metric.name), align)


# =========================================================================================
# Engine pieces
# =========================================================================================
class _GradGateFn(torch.autograd.Function):
    """Identity forward; backward zeroes the gradient when its layer is the one being dropped."""

    @staticmethod
    def forward(ctx, x, state, layer):
        ctx.state, ctx.layer = state, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (torch.zeros_like(g) if ctx.state.drop == ctx.layer else g), None, None


class _DropState:
    drop: int | None = None


@dataclass
class _GradGate(Intervention):
    """GradDrop gate on a layer's residual write (internal; not serialisable)."""

    state: Any = None
    layer: int = 0
    op: ClassVar[str] = ""

    def candidate(self, act, sub, model):
        return _GradGateFn.apply(sub, self.state, self.layer)


def _interp_source(x_corr: torch.Tensor, x_clean: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.where(valid[..., None], x_corr + alpha * (x_clean - x_corr), x_corr)


class _Recorder:
    """Readers that keep activations by hook name (in the graph when the pass has grad).

    The reader callbacks close over the ``store`` dict, never over the recorder: a callback
    holding ``self`` would make recorder -> readers -> callback -> recorder a reference cycle, and
    the activations (with their autograd graph) of every chunk would then wait for Python's
    cyclic garbage collector instead of being freed when the chunk ends — peak memory grew with
    the number of chunks (issue 11).
    """

    def __init__(self, model, sites: Sequence[Site], hooks: Sequence[str]):
        self.store: dict[str, torch.Tensor] = {}
        self.readers: list = []
        for s in dict.fromkeys(Site(s.kind, s.layer) for s in sites):
            self.readers.append(Reader(s, _keep(self.store, s.hook_name)))
        for h in dict.fromkeys(hooks):
            self.readers.append(HookReader(h, _keep_raw(self.store, h)))


def _keep(store: dict, name: str):
    def fn(values, sel, tracker):
        store[name] = values
    return fn


def _keep_raw(store: dict, name: str):
    def fn(act, tracker):
        store[name] = act
    return fn


def _attn_module(model, L: int):
    return model.bridge.blocks[L].attn.original_component


def _check_edges_supported(model, metric: Metric) -> bool:
    """Raise InputError where edge attribution is not defined; return True for post-norm blocks."""
    br = model.bridge
    if metric.sites:
        raise InputError(f"Edge attribution needs a metric computed from the logits; {metric.name!r} reads "
                         f"{', '.join(str(s) for s in metric.sites)} directly. Use a logit/log-prob metric, or "
                         "node attribution for cache-reading metrics.")
    if getattr(br.cfg, "parallel_attn_mlp", False):
        raise InputError(f"Edge attribution is not defined for {model.architecture}: its attention and MLP read the "
                         "same residual in parallel. Use node attribution.")
    post = None
    for L, blk in enumerate(br.blocks):
        ok = all(hasattr(blk, n) for n in ("ln1", "ln2", "attn", "mlp"))
        attn = getattr(blk, "attn", None)
        ok = ok and all(getattr(getattr(attn, n, None), "original_component", None) is not None
                        for n in ("q", "k", "v", "o"))
        ok = ok and getattr(getattr(blk, "ln1", None), "original_component", None) is not None
        if not ok:
            raise InputError(f"Edge attribution is not defined for {model.architecture} (layer {L}): it needs pre-norm "
                             "blocks (ln1 before attention, ln2 before the MLP) with separate q/k/v/o projections. "
                             "Use node attribution (nodes without 'edges').")
        has_post = hasattr(blk, "ln1_post")
        if post is None:
            post = has_post
        elif post != has_post:
            raise InputError(f"Edge attribution: {model.architecture} mixes post-norm and pre-norm blocks; unsupported.")
    for name in ("ln_final.hook_in", "blocks.0.ln1.hook_in", "blocks.0.ln2.hook_in", "blocks.0.attn.hook_q"):
        if name not in br.hook_dict:
            raise InputError(f"Edge attribution needs the hook {name!r}, which {model.architecture} lacks.")
    return bool(post)


# =========================================================================================
# Scoring helpers
# =========================================================================================
def _dot_last(delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Contract the feature axis: ``Σ_d delta[..., d] * grad[..., d]``."""
    return (delta.float() * grad.float()).sum(-1)


def _scatter_pos(x: torch.Tensor, aligned: torch.Tensor, n_pos: int) -> torch.Tensor:
    """[rows, T, *rest] → [rows, *rest, n_pos] on the aligned axis (invalid slots dropped)."""
    r, T = aligned.shape
    rest = tuple(x.shape[2:])
    x = x * (aligned >= 0).reshape(r, T, *([1] * len(rest))).to(x.dtype)
    idx = aligned.clamp(min=0).reshape(r, T, *([1] * len(rest))).expand_as(x)
    out = torch.zeros((r, n_pos) + rest, dtype=x.dtype, device=x.device).scatter_add_(1, idx, x)
    return out.movedim(1, -1)


def _qk_fix_scores(model, L: int, A, gA, S, qx, kx, qc, kc, valid) -> tuple[torch.Tensor, torch.Tensor]:
    """AtP* QK fix for layer L: per-row scores [rows, H] (queries) and [rows, KV] (keys).

    The patched attention logits are exact (bilinear in q and k), the softmax is recomputed
    exactly, and only the downstream dependence on the attention probabilities is linearised:
    ``score = Σ dM/dA · (A_patched - A)``.
    """
    attn = _attn_module(model, L)
    H, KV = qx.shape[2], kx.shape[2]
    group = H // KV
    scaling = float(getattr(attn, "scaling", qx.shape[-1] ** -0.5))
    cap = getattr(attn, "attn_logit_softcapping", None)

    def f(x):
        return torch.tanh(x / cap) * cap if cap else x

    kx_e, kc_e = kx.repeat_interleave(group, 2), kc.repeat_interleave(group, 2)
    vq = valid[:, :, None, None]
    qp = torch.where(vq, qc, qx).float()
    kp_e = torch.where(vq, kc_e, kx_e).float()
    qx, kx_e = qx.float(), kx_e.float()
    raw_x = torch.einsum("bthd,bshd->bhts", qx, kx_e) * scaling
    finite = torch.isfinite(S) & (S > torch.finfo(S.dtype).min / 2)
    ref = S.float()[finite]
    tol = max(1e-3, 16 * torch.finfo(S.dtype).eps)  # catches a wrong scaling/softcap, not rounding
    if ref.numel() and (f(raw_x)[finite] - ref).abs().max() > tol * (1 + ref.abs().max()):
        raise InputError(f"The AtP* QK fix could not reproduce layer {L}'s attention scores from hook_rot_q/hook_rot_k "
                         f"on {model.architecture}; use method='atp' (or qk_fix=False).")
    S, A, gA = S.float(), A.float(), gA.float()
    qrow = valid[:, None, :, None].float()  # query rows that are real in both runs

    def delta_score(raw_new):
        Sn = S + (f(raw_new) - f(raw_x))
        An = torch.softmax(Sn, -1).nan_to_num(0.0)
        return ((An - A) * gA * qrow).sum((-1, -2))  # [rows, H]

    sq = delta_score(torch.einsum("bthd,bshd->bhts", qp, kx_e) * scaling)
    sk = delta_score(torch.einsum("bthd,bshd->bhts", qx, kp_e) * scaling)
    sk = sk.reshape(sk.shape[0], KV, group).sum(-1)
    return sq, sk


# =========================================================================================
# attribute()
# =========================================================================================
class _Acc:
    """Per-prompt node scores written into one pre-allocated ``[n_prompts, ...]`` tensor per group
    (a chunk writes its rows in place: no per-chunk tensors pile up and no final concatenation
    doubles them), and pass sums."""

    def __init__(self, n_prompts: int):
        self.n = n_prompts
        self.per_prompt: dict[str, torch.Tensor] = {}
        self.gd_sum: dict[str, dict[int, torch.Tensor]] = {}
        self.edges: torch.Tensor | None = None

    def add(self, key: str, prompts: Sequence[int], x: torch.Tensor) -> None:
        if key not in self.per_prompt:
            self.per_prompt[key] = torch.empty((self.n,) + tuple(x.shape[1:]), dtype=torch.float32)
        self.per_prompt[key][list(prompts)] = x.detach().float().cpu()

    def add_drop(self, key: str, layer: int, x: torch.Tensor) -> None:
        d = self.gd_sum.setdefault(key, {})
        x = x.detach().float().cpu().sum(0)
        d[layer] = d[layer] + x if layer in d else x


def attribute(model, clean, corrupted, metric, *, nodes: Sequence[str] | str = DEFAULT_NODES, method: str = "atp",
              ig_steps: int | None = None, per_position_heads: bool = False, batch_size: int = 8,
              align: str | None = None, resid_site: str = "pre", normalize: bool = False, qk_fix: bool | None = None,
              graddrop: bool | None = None, chat: bool | None = None, system: str | None = None,
              progress: bool = True, attn: str = "auto") -> dict[str, Result]:
    """Attribution patching over node groups (and optionally edges) in a fixed number of passes.

    Args:
        model: the :class:`~emolens.model.EmoModel`.
        clean, corrupted: paired prompts (lists of strings / message lists, equal length; a
            single corrupted baseline can be repeated) or pre-built batches.
        metric: a :class:`~emolens.metrics.Metric` or callable ``(logits, batch, cache) -> [B]``.
        nodes: any of ``"resid"``, ``"heads"``, ``"neurons"``, ``"sublayers"``, ``"q"``, ``"k"``,
            ``"v"``, ``"edges"`` (see the module docstring).
        method: ``"atp"``, ``"atp*"`` (QK fix + GradDrop) or ``"ig"`` (integrated gradients).
        ig_steps: IG steps (default 8 for ``"ig"``; ``1`` = AtP; ``> 1`` with ``"atp"`` also means IG).
        per_position_heads: also return ``"heads_pos"`` (layer × head × position).
        batch_size: prompt pairs per forward pass.
        align: ``None`` or ``"right"`` (see :func:`prepare_pairs`).
        resid_site: ``"pre"`` (``hook_resid_pre`` of each layer, paper 1) or ``"post"``.
        normalize: divide scores by ``M(clean) - M(corrupted)`` (clean = 1, corrupted = 0).
        qk_fix, graddrop: override the AtP* parts individually (default: on for ``"atp*"``).
        attn: ``"auto"`` (default): the passes run on the plain transformers modules with SDPA
            attention (no ``[heads, pos, pos]`` pattern materialised) unless they read the pattern: the
            AtP* QK fix on ``"q"``/``"k"`` nodes needs ``hook_pattern``/``hook_attn_scores``/
            ``hook_rot_q``/``hook_rot_k``, which only the bridge's eager attention has, so those
            runs (and only those) are eager. ``"eager"`` forces the bridge; ``"sdpa"`` raises where
            eager is needed. Values agree to fp32 rounding. ``meta["attn"]`` says what ran.

    Returns:
        ``{group: Result}``; scores are means over prompt pairs (metric units, or fractions of
        the clean–corrupted gap with ``normalize``), ``extra["stderr"]`` the standard error over
        pairs when there are several; ``meta`` holds model, inputs hash, metric, method,
        convention, ``clean_metric`` and ``corrupted_metric``.
    """
    metric = as_metric(metric)
    groups = [nodes] if isinstance(nodes, str) else list(nodes)
    unknown = [g for g in groups if g not in NODE_GROUPS]
    if unknown or not groups:
        raise InputError(f"Unknown node group(s) {unknown or groups}; choose from {', '.join(NODE_GROUPS)}.")
    if method not in METHODS:
        raise InputError(f"Unknown attribution method {method!r}; use one of {', '.join(METHODS)}.")
    if resid_site not in ("pre", "post"):
        raise InputError(f"resid_site={resid_site!r}; use 'pre' or 'post'.")
    if ig_steps is None:
        ig_steps = 8 if method == "ig" else 1
    if ig_steps < 1:
        raise InputError(f"ig_steps={ig_steps}; use at least 1.")
    if method == "atp*" and ig_steps > 1:
        raise InputError("method='atp*' does not combine with ig_steps > 1; use method='ig' for integrated gradients.")
    qk_fix = (method == "atp*") if qk_fix is None else bool(qk_fix)
    graddrop = (method == "atp*") if graddrop is None else bool(graddrop)
    if ig_steps > 1 and graddrop:
        raise InputError("GradDrop does not combine with integrated gradients; pass graddrop=False.")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}; use at least 1.")
    post_norm = _check_edges_supported(model, metric) if "edges" in groups else False
    pairs = prepare_pairs(model, clean, corrupted, metric, align=align, chat=chat, system=system)
    nL, H, KV = model.n_layers, model.n_heads, model.n_kv_heads

    # ---- what to read ------------------------------------------------------------------------
    rkind = f"resid_{resid_site}"
    node_sites: dict[str, list[Site]] = {
        "resid": [Site(rkind, L) for L in range(nL)],
        "heads": [Site("head", L) for L in range(nL)],
        "neurons": [Site("neuron", L) for L in range(nL)],
        "sublayers": [s for L in range(nL) for s in (Site("attn_out", L), Site("mlp_out", L))],
    }
    sites: list[Site] = [s for g in groups if g in node_sites for s in node_sites[g]]
    hooks_both: list[str] = []  # read in the clean and corrupted runs
    hooks_corr: list[str] = []  # corrupted run only
    for g in ("q", "k", "v"):
        if g in groups:
            hooks_both += [f"blocks.{L}.attn.hook_{g}" for L in range(nL)]
    use_qk = qk_fix and ("q" in groups or "k" in groups)
    if use_qk:
        hooks_both += [f"blocks.{L}.attn.hook_rot_{x}" for L in range(nL) for x in ("q", "k")]
        hooks_corr += [f"blocks.{L}.attn.hook_{x}" for L in range(nL) for x in ("pattern", "attn_scores")]
    if "edges" in groups:
        sites += [Site("head", L) for L in range(nL)] + [Site("mlp_out", L) for L in range(nL)] + [Site("resid_pre", 0)]
        hooks_corr += [f"blocks.{L}.attn.hook_{x}" for L in range(nL) for x in ("q", "k", "v")]
        # norm inputs are the residual tensor itself (their gradient includes the skip path), so the
        # MLP-input gradient is taken at ln2's output and pulled back through ln2 by hand
        hooks_corr += [f"blocks.{L}.ln{i}.hook_in" for L in range(nL) for i in (1, 2)] + ["ln_final.hook_in"]
        hooks_corr += [f"blocks.{L}.ln2.hook_out" for L in range(nL)]
        if post_norm:
            hooks_corr += [f"blocks.{L}.ln1_post.hook_in" for L in range(nL)]
    if ig_steps > 1 and Site("resid_pre", 0) not in sites:
        sites.append(Site("resid_pre", 0))
    metric_sites = [Site(s.kind, s.layer) for s in metric.sites]

    # names whose gradient is needed
    grad_names = [s.hook_name for g in groups if g in node_sites for s in node_sites[g]]
    grad_names += [f"blocks.{L}.attn.hook_{g}" for g in ("q", "k", "v") if g in groups for L in range(nL)]
    if use_qk:
        grad_names += [f"blocks.{L}.attn.hook_pattern" for L in range(nL)]
    if "edges" in groups:
        grad_names += [f"blocks.{L}.attn.hook_{x}" for L in range(nL) for x in ("q", "k", "v")]
        grad_names += [f"blocks.{L}.ln2.hook_out" for L in range(nL)] + ["ln_final.hook_in"]
    grad_names = list(dict.fromkeys(grad_names))

    chunks = pairs.chunks(batch_size)
    n_passes = 1 + (ig_steps if ig_steps > 1 else 1)
    acc = _Acc(pairs.n_prompts)
    m_clean, m_corr = torch.empty(pairs.n_prompts), torch.empty(pairs.n_prompts)  # per-prompt metric
    ran: set[str] = set()  # attention implementations the passes ran on
    bar = progress_bar(range(len(chunks) * n_passes), desc=f"attribution ({method})", disable=not progress)
    it = iter(bar)

    for ch in chunks:
        # ---- clean pass ----------------------------------------------------------------------
        rec_c = _Recorder(model, sites + metric_sites, hooks_both)
        plan = HookPlan(model, [], rec_c.readers, attn=attn)
        with plan.hooks(), torch.no_grad():
            ran.add("sdpa" if plan.runs_sdpa else "eager")
            logits = plan.forward(ch.clean, logits_to_keep=metric.trailing_logits(ch.clean))
            m_clean[ch.prompts] = metric.per_prompt(metric(logits, ch.clean, rec_c.store)).float().cpu()
        ca = {k: v.detach() for k, v in rec_c.store.items()}
        next(it, None)
        del logits

        # ---- corrupted pass(es) ------------------------------------------------------------------
        grads: dict[str, torch.Tensor] = {}
        xa: dict[str, torch.Tensor] = {}
        drop_grads: dict[int, dict[str, torch.Tensor]] = {}
        steps = ig_steps if ig_steps > 1 else 1
        for k in range(steps):
            rec_x = _Recorder(model, sites + metric_sites, hooks_both + hooks_corr)
            ivs: list[Intervention] = []
            if k > 0:
                x0c, x0x = ca["blocks.0.hook_resid_pre"], xa["blocks.0.hook_resid_pre"]
                ivs.append(Replace(Site("resid_pre", 0), _interp_source(x0x, x0c, ch.valid, k / steps)))
            state = _DropState()
            if graddrop:
                ivs += [_GradGate(Site(kd, L), state=state, layer=L) for L in range(nL) for kd in ("attn_out", "mlp_out")]
            plan = HookPlan(model, ivs, rec_x.readers, attn=attn)
            with plan.hooks():
                ran.add("sdpa" if plan.runs_sdpa else "eager")
                logits = plan.forward(ch.corr, grad=True, logits_to_keep=metric.trailing_logits(ch.corr))
            vals = metric(logits, ch.corr, rec_x.store)
            per = metric.per_prompt(vals)
            if k == 0:
                m_corr[ch.prompts] = per.detach().float().cpu()
                xa = {n: v.detach() for n, v in rec_x.store.items()}
            names = [n for n in grad_names if n in rec_x.store]
            tensors = [rec_x.store[n] for n in names]
            passes = [None] + (list(range(nL)) if graddrop else [])
            for drop in passes:
                state.drop = drop
                gs = torch.autograd.grad(per.sum(), tensors, allow_unused=True, retain_graph=drop != passes[-1])
                gd = {n: (torch.zeros_like(t) if g is None else g.detach()) for n, t, g in zip(names, tensors, gs)}
                if drop is None:
                    for n, g in gd.items():
                        grads[n] = grads[n] + g if n in grads else g
                else:
                    drop_grads[drop] = gd
            state.drop = None
            del logits, vals, per, tensors, rec_x
            next(it, None)
        if steps > 1:
            grads = {n: g / steps for n, g in grads.items()}

        # ---- node scores ---------------------------------------------------------------------
        def score_nodes(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            v = ch.valid
            vf = v.float()
            if "resid" in groups:
                rows = []
                for s in node_sites["resid"]:
                    d = (ca[s.hook_name] - xa[s.hook_name]).float()
                    rows.append(_scatter_pos(_dot_last(d, g[s.hook_name]) * vf, ch.aligned, pairs.n_pos))
                out["resid"] = torch.stack(rows, 1)  # [rows, L, n_pos]
            if "heads" in groups:
                per_pos = []
                for s in node_sites["heads"]:
                    d = (ca[s.hook_name] - xa[s.hook_name]).float()
                    per_pos.append(_dot_last(d, g[s.hook_name]) * vf[..., None])  # [rows, T, H]
                hp = torch.stack(per_pos, 1)  # [rows, L, T, H]
                out["heads"] = hp.sum(2)
                if per_position_heads:
                    out["heads_pos"] = torch.stack([_scatter_pos(hp[:, L], ch.aligned, pairs.n_pos)
                                                    for L in range(nL)], 1)  # [rows, L, H, n_pos]
            if "neurons" in groups:
                out["neurons"] = torch.stack([
                    ((ca[s.hook_name] - xa[s.hook_name]).float() * g[s.hook_name].float() * vf[..., None]).sum(1)
                    for s in node_sites["neurons"]], 1)  # [rows, L, d_mlp]
            if "sublayers" in groups:
                vals = [(_dot_last((ca[s.hook_name] - xa[s.hook_name]).float(), g[s.hook_name]) * vf).sum(1)
                        for s in node_sites["sublayers"]]
                out["sublayers"] = torch.stack(vals, 1).reshape(-1, nL, 2)
            for gname in ("q", "k", "v"):
                if gname not in groups:
                    continue
                res = []
                for L in range(nL):
                    n = f"blocks.{L}.attn.hook_{gname}"
                    res.append((_dot_last((ca[n] - xa[n]).float(), g[n]) * vf[..., None]).sum(1))
                out[gname] = torch.stack(res, 1)
            if use_qk:
                sq, sk = [], []
                for L in range(nL):
                    p = f"blocks.{L}.attn."
                    a, b = _qk_fix_scores(model, L, xa[p + "hook_pattern"], g[p + "hook_pattern"],
                                          xa[p + "hook_attn_scores"], xa[p + "hook_rot_q"], xa[p + "hook_rot_k"],
                                          ca[p + "hook_rot_q"], ca[p + "hook_rot_k"], v)
                    sq.append(a), sk.append(b)
                if "q" in groups:
                    out["q"] = torch.stack(sq, 1)
                if "k" in groups:
                    out["k"] = torch.stack(sk, 1)
            return out

        for key, x in score_nodes(grads).items():
            acc.add(key, ch.prompts, ch.per_prompt(x))
        for drop, gd in drop_grads.items():
            for key, x in score_nodes(gd).items():
                if key == "sublayers":  # a layer's own writes carry no gradient when it is dropped
                    x = x.clone()
                    x[:, drop] = 0.0
                acc.add_drop(key, drop, ch.per_prompt(x))
        if "edges" in groups:
            e = _edge_scores(model, ch, ca, xa, grads, post_norm).cpu()
            acc.edges = e if acc.edges is None else acc.edges + e
        del ca, xa, grads, drop_grads

    # ---- results -------------------------------------------------------------------------------
    n = pairs.n_prompts
    mc, mx = m_clean, m_corr
    gap = float(mc.mean() - mx.mean())
    scale = 1.0
    if normalize:
        if abs(gap) < 1e-8 * (1 + abs(float(mc.mean()))):
            raise MetricError(f"normalize=True but the metric is the same on clean and corrupted prompts "
                              f"({float(mc.mean()):.4g}); nothing to normalise by.")
        scale = 1.0 / gap
    meth = "ig" if ig_steps > 1 else method
    if meth == "atp" and (qk_fix or graddrop):
        meth = "atp" + ("+qk" if qk_fix else "") + ("+graddrop" if graddrop else "")
    meta = {**model.meta(), "inputs_hash": pairs.inputs_hash, "metric": metric.name, "method": meth,
            "ig_steps": ig_steps, "qk_fix": qk_fix, "graddrop": graddrop, "n_prompts": n, "convention": CONVENTION,
            "clean_metric": float(mc.mean()), "corrupted_metric": float(mx.mean()), "normalized": normalize,
            "align": align, "resid_site": rkind, "attn": "+".join(sorted(ran))}
    pos_labels = {"position": pairs.position_labels}
    layer_labels = {"layer": [f"L{L}" for L in range(nL)]}
    out: dict[str, Result] = {}
    spec = {
        "resid": ("resid_pos", ("layer", "position"), {**layer_labels, **pos_labels}),
        "heads": ("heads", ("layer", "head"), layer_labels),
        "heads_pos": ("heads_pos", ("layer", "head", "position"), {**layer_labels, **pos_labels}),
        "neurons": ("neurons", ("layer", "neuron"), layer_labels),
        "sublayers": ("sublayers", ("layer", "sublayer"), {**layer_labels, "sublayer": ["attn", "mlp"]}),
        "q": ("heads", ("layer", "head"), layer_labels),
        "k": ("heads", ("layer", "head"), layer_labels),
        "v": ("heads", ("layer", "head"), layer_labels),
    }
    for key, x in acc.per_prompt.items():
        x = x * scale  # [n, ...]
        kind, axes, labels = spec[key]
        mean = x.mean(0)
        extra = {"stderr": x.std(0) / n ** 0.5} if n > 1 else {}
        kmeta = dict(meta, node_group=key)
        if key in ("k", "v"):
            kmeta["head_axis"] = f"KV heads ({KV}); query head h uses KV head h // {H // KV}"
        if key in ("q", "k") and qk_fix:
            kmeta["qk_fix"] = True
        if key in acc.gd_sum and graddrop:
            per_layer = [acc.gd_sum[key][L] / n * scale for L in range(nL)]
            gd = sum(p.abs() for p in per_layer) / max(nL - 1, 1)
            extra = {"atp": mean, "graddrop": gd, **extra}
            mean = torch.sign(mean) * gd
            kmeta["score"] = "sign(AtP) * GradDrop magnitude; extra['atp'] = AtP without GradDrop"
        out[key] = Result(kind, mean, axes, labels, extra, kmeta)
    if acc.edges is not None:
        rows, cols, mask = _edge_labels(model)
        e = acc.edges / n * scale
        e = torch.where(mask, e, torch.full_like(e, float("nan")))
        out["edges"] = Result("matrix", e, ("row", "col"), {"row": rows, "col": cols}, {},
                              dict(meta, node_group="edges", post_norm_linearised=post_norm,
                                   rows="writers: embed, a{L}.h{h} (query head), m{L}",
                                   cols="readers: a{L}.h{h}.q, a{L}.g{g}.k, a{L}.g{g}.v (KV head g), m{L}, logits"))
    return {k: out[k] for k in (list(groups) + ["heads_pos"]) if k in out}


# =========================================================================================
# Edges
# =========================================================================================
def _edge_labels(model) -> tuple[list[str], list[str], torch.Tensor]:
    nL, H, KV = model.n_layers, model.n_heads, model.n_kv_heads
    rows, row_layer, row_is_head = ["embed"], [-1], [False]
    for L in range(nL):
        rows += [f"a{L}.h{h}" for h in range(H)] + [f"m{L}"]
        row_layer += [L] * (H + 1)
        row_is_head += [True] * H + [False]
    cols, col_layer, col_is_mlp = [], [], []
    for L in range(nL):
        cols += [f"a{L}.h{h}.q" for h in range(H)] + [f"a{L}.g{g}.k" for g in range(KV)]
        cols += [f"a{L}.g{g}.v" for g in range(KV)] + [f"m{L}"]
        col_layer += [L] * (H + 2 * KV + 1)
        col_is_mlp += [False] * (H + 2 * KV) + [True]
    cols.append("logits")
    col_layer.append(nL)
    col_is_mlp.append(False)
    rl, cl = torch.tensor(row_layer)[:, None], torch.tensor(col_layer)[None]
    mask = (rl < cl) | ((rl == cl) & torch.tensor(row_is_head)[:, None] & torch.tensor(col_is_mlp)[None])
    return rows, cols, mask


def _batched_vjp(module, x: torch.Tensor, cots: torch.Tensor) -> torch.Tensor:
    """``J_module(x)^T c`` for a stack of cotangents ``cots`` [k, *x.shape]."""
    with torch.enable_grad():
        xi = x.detach().requires_grad_(True)
        y = module(xi)
        try:
            (g,) = torch.autograd.grad(y, xi, cots.to(y.dtype), is_grads_batched=True)
        except RuntimeError:  # modules vmap cannot trace: one cotangent at a time
            g = torch.stack([torch.autograd.grad(y, xi, c.to(y.dtype), retain_graph=True)[0] for c in cots])
    return g


def _batched_jvp(module, x: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``J_module(x) t`` for a stack of tangents [k, *x.shape] (double-backward trick)."""
    with torch.enable_grad():
        xi = x.detach().requires_grad_(True)
        y = module(xi)
        u = torch.zeros_like(y, requires_grad=True)
        (gx,) = torch.autograd.grad(y, xi, u, create_graph=True)  # J^T u, linear in u
        outs = [torch.autograd.grad(gx, u, t.to(gx.dtype), retain_graph=True)[0] for t in tangents]
    return torch.stack(outs)


def _edge_scores(model, ch: _Chunk, ca: dict, xa: dict, grads: dict, post_norm: bool) -> torch.Tensor:
    """Edge score matrix [writers, readers] summed over the chunk's rows (see module docstring)."""
    br = model.bridge
    nL, H, KV, dh, d = model.n_layers, model.n_heads, model.n_kv_heads, model.d_head, model.d_model
    vf = ch.valid.float()[..., None]  # [r, T, 1]
    r, T = ch.valid.shape
    N = r * T
    # ---- writers: Δ(write into the residual) -----------------------------------------------------
    writes = [((ca["blocks.0.hook_resid_pre"] - xa["blocks.0.hook_resid_pre"]).float() * vf).reshape(1, N * d)]
    row_layer = [-1]
    for L in range(nL):
        attn = br.blocks[L].attn
        Wo = attn.o.original_component.weight  # [d_model, H*dh]
        Wo = Wo.detach().float().T.reshape(H, dh, d)
        z = f"blocks.{L}.attn.hook_z"
        dz = (ca[z] - xa[z]).float() * vf[..., None]  # [r, T, H, dh]
        res = torch.einsum("bthi,hie->hbte", dz, Wo)  # [H, r, T, d]
        if post_norm:  # linearise the post-attention norm at the corrupted activation
            norm = br.blocks[L].ln1_post.original_component
            res = _batched_jvp(norm, xa[f"blocks.{L}.ln1_post.hook_in"], res.to(xa[f"blocks.{L}.ln1_post.hook_in"].dtype)).float()
        writes.append(res.reshape(H, N * d))
        m = f"blocks.{L}.hook_mlp_out"
        writes.append(((ca[m] - xa[m]).float() * vf).reshape(1, N * d))
        row_layer += [L] * (H + 1)
    W = torch.cat(writes)  # [U, N*d]
    # ---- readers: dM/d(input of each reader, through it only) -------------------------------------
    blocks = []
    for L in range(nL):
        attn = br.blocks[L].attn
        x1 = xa[f"blocks.{L}.ln1.hook_in"]
        cots = []
        for name, proj, nh in (("q", attn.q, H), ("k", attn.k, KV), ("v", attn.v, KV)):
            Wp = proj.original_component.weight.detach().float().reshape(nh, dh, d)  # [nh*dh, d] rows per head
            g = grads[f"blocks.{L}.attn.hook_{name}"].float()  # [r, T, nh, dh]
            cots.append(torch.einsum("bthi,hie->hbte", g, Wp))
        cot = torch.cat(cots)  # [H+2KV, r, T, d]
        G = _batched_vjp(br.blocks[L].ln1.original_component, x1, cot.to(x1.dtype)).float()
        x2 = xa[f"blocks.{L}.ln2.hook_in"]
        G_mlp = _batched_vjp(br.blocks[L].ln2.original_component, x2,
                             grads[f"blocks.{L}.ln2.hook_out"][None].to(x2.dtype)).float()
        blocks.append(torch.cat([G, G_mlp]).reshape(-1, N * d))
    blocks.append(grads["ln_final.hook_in"].float().reshape(1, N * d))
    R = torch.cat(blocks)  # [V, N*d]
    return W @ R.T
