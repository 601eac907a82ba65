"""Paper 2's steering baseline (step 3): add the MLP-state emotion direction, RMS-scaled.

Under P_neu, at ``resid_post`` of every layer in a range (paper: 11-20 of 28, i.e. 39-72% of depth),
``h[t] += alpha * RMS(h[t]) * v_mlp[e][l]`` at the last position of each forward call
(``Pos.from_last()``: t* at prefill and every generated token with a KV cache). Paper: alpha = 8.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import InputError
from ..interventions import Add
from ..results import Result
from ..sites import Pos, resid

__all__ = ["steering_interventions"]


def steering_interventions(model, directions: Result, emotion: str, layers: Sequence[int], alpha: float = 8.0, *,
                           sublayer: str = "mlp", rms: bool = True, pos: Pos | None = None) -> list[Add]:
    """Steering interventions for one emotion.

    Args:
        directions: step-2 directions (kind ``"directions"``).
        layers: layers to steer (their ``resid_post``).
        alpha: strength in units of the position's RMS (``rms=True``) or of the unit direction.
        sublayer: which direction to add (paper: ``"mlp"``).
        pos: position rule (default ``Pos.from_last()``, the paper's KV-cache semantics).
    """
    emos = directions.labels.get("emotion", [])
    if emotion not in emos:
        raise InputError(f"No directions for emotion {emotion!r}; have {emos}.")
    subs = directions.labels.get("sublayer", ["attn", "mlp"])
    if sublayer not in subs:
        raise InputError(f"sublayer must be one of {subs}, got {sublayer!r}.")
    layers = [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < model.n_layers]
    if bad or not layers:
        raise InputError(f"Steering layers {bad or layers} invalid for {model.name} (0..{model.n_layers - 1}).")
    v = directions.scores[emos.index(emotion), :, subs.index(sublayer)]
    return [Add(resid(l, "post"), v[l], strength=float(alpha), rms=rms, pos=pos or Pos.from_last()) for l in layers]
