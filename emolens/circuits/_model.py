"""Model internals the circuit methods need: weights, sublayer norms, and a prefix-cached stepper.

Weights are read from the transformers modules under the TransformerLens bridge (raw HF weights,
no folding), so they match what the hooks see.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence

import torch
from jaxtyping import Float

from ..errors import InputError, SiteError
from ..interventions import HookPlan, Intervention, Reader, cache_kwarg

__all__ = ["unwrap", "layer_module", "w_out", "w_o", "post_attn_norm", "post_mlp_norm", "final_norm",
           "PrefixStepper", "StopForward", "forward_reads"]


class StopForward(Exception):
    """Raised by a reader that has read everything needed: the rest of the forward pass is skipped."""


def forward_reads(model, plan: HookPlan, batch) -> None:
    """Run ``batch`` inside ``plan.hooks()`` for its readers only (no logits); a reader may raise
    :class:`StopForward` to skip the remaining layers and the unembedding."""
    plan.tracker.set_batch(batch)
    try:
        with torch.no_grad():
            model.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
    except StopForward:
        pass


def unwrap(m):
    """The original transformers module under a bridge wrapper."""
    for _ in range(8):
        o = getattr(m, "original_component", None) or getattr(m, "_original_component", None)
        if o is None or o is m:
            return m
        m = o
    return m


def _layers(model):
    base = getattr(model.hf_model, "model", None)
    layers = getattr(base, "layers", None) if base is not None else None
    if layers is None:
        raise SiteError(f"{model.name} ({model.architecture}) has no model.layers; the circuit methods support "
                        "Llama-style decoder models (Llama, Qwen2, Gemma3, Mistral, SmolLM...).")
    return layers


def layer_module(model, layer: int):
    return unwrap(_layers(model)[layer])


def w_out(model, layer: int) -> Float[torch.Tensor, "d_mlp d_model"]:
    """MLP output weights (``W_down^T``): row n is what neuron n writes to the residual stream."""
    mlp = unwrap(layer_module(model, layer).mlp)
    down = unwrap(getattr(mlp, "down_proj", None) or getattr(mlp, "c_proj", None))
    if down is None:
        raise SiteError(f"Cannot find the MLP output projection of layer {layer} in {model.architecture}.")
    return down.weight.detach().T


def w_o(model, layer: int) -> Float[torch.Tensor, "n_heads d_head d_model"]:
    """Attention output weights per query head: ``W_O[h]`` maps ``z_h`` to the residual stream."""
    attn = unwrap(layer_module(model, layer).self_attn)
    o = unwrap(attn.o_proj)
    w = o.weight.detach().T  # [n_heads*d_head, d_model]
    return w.reshape(model.n_heads, model.d_head, model.d_model)


def o_bias(model, layer: int):
    attn = unwrap(layer_module(model, layer).self_attn)
    b = getattr(unwrap(attn.o_proj), "bias", None)
    return None if b is None else b.detach()


def _norm_or_none(model, layer: int, name: str) -> Callable | None:
    m = getattr(layer_module(model, layer), name, None)
    return None if m is None else unwrap(m)


def post_attn_norm(model, layer: int) -> Callable | None:
    """The norm applied to the attention output before the residual add (Gemma), or None."""
    arch = model.architecture.lower()
    if "gemma" in arch and "gemma3" not in arch and "gemma2" not in arch:
        return None  # Gemma 1 has no sandwich norms
    # In Llama/Qwen "post_attention_layernorm" is the MLP's *input* norm; only sandwich-norm
    # models (with a separate pre_feedforward_layernorm) apply it to the attention output.
    if _norm_or_none(model, layer, "pre_feedforward_layernorm") is None:
        return None
    return _norm_or_none(model, layer, "post_attention_layernorm")


def post_mlp_norm(model, layer: int) -> Callable | None:
    """The norm applied to the MLP output before the residual add (Gemma 2/3), or None."""
    return _norm_or_none(model, layer, "post_feedforward_layernorm")


def final_norm(model) -> Callable:
    """The final norm (``ln_final``), as a function of the residual stream."""
    base = getattr(model.hf_model, "model", None)
    n = getattr(base, "norm", None) if base is not None else None
    if n is None:
        raise SiteError(f"Cannot find the final norm of {model.architecture} (model.norm).")
    return unwrap(n)


def rms_norm_factors(norm, y: Float[torch.Tensor, "... d"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearise an RMS norm at ``y``: ``norm(y) = y * gain / scale`` (returns gain [d], scale [..., 1])."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    ones = torch.ones(y.shape[-1], dtype=y.dtype, device=y.device)
    gain = norm(ones) * (1.0 + eps) ** 0.5
    scale = (y.float().pow(2).mean(-1, keepdim=True) + eps).sqrt().to(y.dtype)
    return gain, scale


class PrefixStepper:
    """Run a batch's prompts minus t* once (KV cache), then many one-token passes at t*.

    Every intervention in a step must touch t* only (``Pos.last()``); readers at ``Pos.last()`` see
    t*. Positions before t* are never recomputed, so the cost of a step is one token per row. Used
    where paper 2 injects at, and reads from, t* alone (sublayer influence, local ablation).

    All hooks go through :class:`emolens.interventions.HookPlan`.
    """

    def __init__(self, model, batch, stop_layer: int | None = None, repeats: int = 1):
        """Args:
            stop_layer: compute (and cache) only layers ``<= stop_layer``; every step then stops after
                that layer too (for readouts at or before it).
            repeats: run the prefix once, then repeat every row ``repeats`` times (row ``i * repeats + j``
                is copy ``j`` of prompt ``i``), so one step can carry ``repeats`` different interventions
                (restricted with ``rows=`` to :meth:`block` ``j``).
        """
        self.model = model
        self.batch = batch
        self.repeats = int(repeats)
        self.T = batch.input_ids.shape[1]
        if self.T < 2:
            raise InputError("Prompts need at least two tokens for a prefix-cached step.")
        self.stop_layer = None if stop_layer is None or stop_layer >= model.n_layers - 1 else int(stop_layer)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.hf_model.config)
        self._ckw = cache_kwarg(model.hf_model)  # 'cache' from transformers 5.24 ('past_key_values' goes in 5.40)
        plan = HookPlan(model, [], self._stop_readers())
        plan.tracker.set_batch(batch)
        try:
            with plan.hooks(), torch.no_grad():
                model.hf_model(input_ids=batch.input_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1],
                               position_ids=batch.position_ids[:, :-1], use_cache=True, **{self._ckw: cache})
        except StopForward:
            pass
        if self.repeats > 1:
            cache.batch_repeat_interleave(self.repeats)
            n = len(batch)
            self.batch = batch.select([i for i in range(n) for _ in range(self.repeats)])
        self.n_prompts = len(batch)
        self.cache = cache
        self._pristine = None
        if any(type(layer).__name__ != "DynamicLayer" for layer in getattr(self.cache, "layers", [])):
            self._pristine = copy.deepcopy(self.cache)  # sliding-window layers cannot be cropped back

    def step(self, interventions: Iterable[Intervention] = (), readers: Sequence[Reader] = (),
             plan: HookPlan | None = None) -> Float[torch.Tensor, "batch vocab"] | None:
        """One pass over t* with interventions/readers (or a prepared ``plan``).

        Returns the logits at t*, or None when a reader stopped the pass (:class:`StopForward`).
        """
        plan = plan or HookPlan(self.model, list(interventions), list(readers) + self._stop_readers())
        if self.stop_layer is not None and not any(getattr(r.fn, "_emolens_stop", False) for r in plan.readers):
            raise InputError("This PrefixStepper caches layers up to stop_layer only; build the plan with "
                             "stepper.readers(...) so steps stop there too.")
        cache = copy.deepcopy(self._pristine) if self._pristine is not None else self.cache
        b = self.batch
        plan.tracker.set_batch(b)
        plan.tracker.seen = self.T - 1  # the cached prefix; the step starts at t*
        out = None
        try:
            with plan.hooks(), torch.no_grad():
                out = self.model.hf_model(input_ids=b.input_ids[:, -1:], attention_mask=b.attention_mask,
                                          position_ids=b.position_ids[:, -1:], use_cache=True,
                                          **{self._ckw: cache})
        except StopForward:
            pass
        finally:
            if self._pristine is None:
                # drop t* again from every layer that appended it (all of them unless stopped early)
                for layer in cache.layers:
                    if layer.is_initialized and layer.get_seq_length() > self.T - 1:
                        layer.crop(-1)
        return None if out is None else out.logits[:, -1]

    def block(self, j: int) -> tuple[int, ...]:
        """Batch rows of copy ``j`` (for ``rows=`` of an intervention)."""
        return tuple(range(j, self.n_prompts * self.repeats, self.repeats))

    def _stop_readers(self) -> list[Reader]:
        if self.stop_layer is None:
            return []

        def stop(values, sel, tracker):
            raise StopForward
        stop._emolens_stop = True  # type: ignore[attr-defined]
        from ..sites import Pos, Site

        return [Reader(Site("resid_post", self.stop_layer), stop, Pos.all())]

    def readers(self, readers: Sequence[Reader]) -> list[Reader]:
        """``readers`` plus the stop reader of ``stop_layer`` (for plans built by the caller)."""
        return list(readers) + self._stop_readers()
