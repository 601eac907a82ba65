"""Circuit modulation (paper 2, step 8): emotion control by writing into the circuit only.

Under the neutral prompt P_neu (no emotion named), add the emotion's difference vectors (step 5)
into exactly the circuit's components, scaled by ``scale`` (paper: lambda = 1.0; the repo uses 0.8
for anger; Qwen2.5-7B 2.0):

- neurons: ``a[N_l] += scale * dmu_mlp[e][l][N_l]`` on ``mlp.hook_post`` at the **last position of
  each forward call** = ``Pos.from_last()`` (t* at prefill, then every generated token);
- heads: ``z[:, :, h] += scale * dmu_attn[e][l][h]`` on ``attn.hook_z`` for h in H_l at **every
  position** (``Pos.all()``: all prompt tokens at prefill and every generated token).

These are plain :class:`~emolens.interventions.Add` specs, so they serialise, compose with other
interventions and run in KV-cached generation through the one hook engine.
"""

from __future__ import annotations

import torch

from ..errors import InputError, ResultError
from ..interventions import Add
from ..results import Result
from ..sites import Pos, head, neuron
from .assembly import Circuit

__all__ = ["modulation_interventions"]


def _emotion_row(res: Result, emotion: str) -> torch.Tensor:
    emos = res.labels.get("emotion", [])
    if emotion not in emos:
        raise InputError(f"No difference vectors for {emotion!r}; have {emos}.")
    return res.scores[emos.index(emotion)]


def modulation_interventions(model, circuit: Circuit, dmu_mlp: Result, dmu_attn: Result, scale: float = 1.0, *,
                             neuron_pos: Pos | None = None, head_pos: Pos | None = None) -> list[Add]:
    """The circuit-modulation interventions for one emotion.

    Args:
        circuit: the emotion's :class:`Circuit` (checked against the model's dimensions).
        dmu_mlp: step-5 neuron difference vectors (kind ``"neurons"``, ``[emotion, layer, d_mlp]``).
        dmu_attn: step-5 head difference vectors (kind ``"head_vectors"``, ``[emotion, layer, head, d_head]``).
        scale: lambda (0 reproduces the unmodulated model exactly).
        neuron_pos, head_pos: position rules (paper: ``Pos.from_last()`` and ``Pos.all()``).

    Returns:
        One :class:`Add` per layer and kind that has circuit components.
    """
    circuit.check(model)
    mn = _emotion_row(dmu_mlp, circuit.emotion).float()
    mz = _emotion_row(dmu_attn, circuit.emotion).float()
    if tuple(mn.shape) != (model.n_layers, model.d_mlp):
        raise ResultError(f"Neuron difference vectors have shape {tuple(mn.shape)}, expected "
                          f"[{model.n_layers}, {model.d_mlp}] for {model.name}.")
    if tuple(mz.shape) != (model.n_layers, model.n_heads, model.d_head):
        raise ResultError(f"Head difference vectors have shape {tuple(mz.shape)}, expected "
                          f"[{model.n_layers}, {model.n_heads}, {model.d_head}] for {model.name}.")
    npos = neuron_pos or Pos.from_last()
    hpos = head_pos or Pos.all()
    out: list[Add] = []
    for l, idx in sorted(circuit.neurons.items()):
        if idx:
            out.append(Add(neuron(l, idx), mn[l, idx], strength=float(scale), pos=npos))
    for l, idx in sorted(circuit.heads.items()):
        if idx:
            out.append(Add(head(l, idx), mz[l, idx], strength=float(scale), pos=hpos))
    return out
