"""Attention patterns of each emotion circuit's top heads on example replies (offline circuitsvis).

:func:`circuit_attention_section` returns a report :class:`~emolens.sections.Section` with one
circuitsvis widget per emotion: the circuit's ``k`` highest-scoring heads, read on the prompt plus
an example reply (teacher-forced), optionally under the same interventions that produced the reply
(e.g. the circuit modulation), so the reader sees where those heads look while the emotion is
being expressed. Widgets use the page-level circuitsvis bundle (no CDN; see :mod:`.attention`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import InputError
from .attention import AttentionView, _parse_heads

__all__ = ["top_circuit_heads", "reply_head_patterns", "circuit_attention_section"]


def top_circuit_heads(circuit, head_scores=None, k: int = 4) -> list[tuple[int, int]]:
    """The ``k`` heads of ``circuit`` with the highest head score.

    Args:
        circuit: a :class:`~emolens.circuits.assembly.Circuit` (``heads``: ``{layer: [head, ...]}``).
        head_scores: step-4b scores of this emotion (``[layer, n_heads]`` Result or tensor, or the
            stacked ``[emotion, layer, n_heads]`` Result, sliced by ``circuit.emotion``). Without
            scores, the circuit's heads of the deepest layers come first.
    """
    pairs = [(int(l), int(h)) for l, hs in circuit.heads.items() for h in hs]
    if not pairs:
        return []
    if head_scores is None:
        return sorted(pairs, key=lambda p: (-p[0], p[1]))[:k]
    s = getattr(head_scores, "scores", head_scores)
    s = torch.as_tensor(s)
    labels = getattr(head_scores, "labels", {}) or {}
    if s.ndim == 3:
        emos = labels.get("emotion", [])
        if circuit.emotion not in emos:
            raise InputError(f"head_scores have no row for {circuit.emotion!r} (have {emos})")
        s = s[emos.index(circuit.emotion)]
    return sorted(pairs, key=lambda p: -float(s[p[0], p[1]]))[:k]


def reply_head_patterns(model, prompt: Any, reply: str, heads: Any, *, interventions: Sequence | None = None,
                        max_tokens: int | None = 96, title: str | None = None) -> AttentionView:
    """Attention patterns ``[n_heads, T, T]`` of ``heads`` over ``prompt`` + ``reply`` (teacher-forced).

    Args:
        prompt: user string or message list (chat template applied as in ``model.encode``).
        reply: the reply text appended after the templated prompt.
        interventions: applied during the forward pass (e.g. the modulation that produced the reply).
        max_tokens: keep only the last ``max_tokens`` positions (queries and keys) so long prompts stay
            readable; None keeps all.
    """
    from .attention import read_patterns

    pairs = _parse_heads(heads)
    batch = model.encode([prompt], continuations=[reply])
    pattern = read_patterns(model, batch, pairs, interventions)
    tokens = model.to_str_tokens(batch)
    if max_tokens is not None and len(tokens) > max_tokens:
        pattern, tokens = pattern[:, -max_tokens:, -max_tokens:], tokens[-max_tokens:]
    return AttentionView(pattern, tokens, [f"L{L}H{h}" for L, h in pairs], title=title)


def circuit_attention_section(model, circuits: Mapping[str, Any], examples: Mapping[str, tuple[Any, str]], *,
                              head_scores=None, k: int = 4,
                              interventions_for: Callable[[str], Sequence] | None = None,
                              max_tokens: int | None = 96, title: str = "Circuit heads: attention on example replies"):
    """A report section with the attention patterns of each circuit's top-``k`` heads on an example reply.

    Args:
        circuits: ``{emotion: Circuit}``.
        examples: ``{emotion: (prompt, reply)}`` - e.g. a test prompt and the circuit-modulated reply.
        head_scores: stacked step-4b head scores ``[emotion, layer, n_heads]`` (ranks the heads).
        interventions_for: ``emotion -> interventions`` applied while reading (None: the unsteered
            model reads the reply).

    Returns:
        :class:`~emolens.sections.Section` with one figure (an :class:`AttentionView`) per emotion and a
        table of the heads shown.
    """
    import pandas as pd

    from ..sections import Section

    sec = Section(title)
    sec.add_text(f"For each emotion, the {k} circuit heads with the highest head score (paper 2 step 4b), read on "
                 "the prompt followed by an example reply" + (" under the same modulation that produced it" if
                                                               interventions_for else "") +
                 (f"; the last {max_tokens} tokens are shown" if max_tokens else "") +
                 ". Rendered with circuitsvis from the page's bundled script (offline).")
    rows = []
    for e, (prompt, reply) in examples.items():
        if e not in circuits:
            raise InputError(f"circuit_attention_section(): no circuit for {e!r} (have {list(circuits)})")
        heads = top_circuit_heads(circuits[e], head_scores, k)
        if not heads:
            continue
        view = reply_head_patterns(model, prompt, reply, heads,
                                   interventions=interventions_for(e) if interventions_for else None,
                                   max_tokens=max_tokens, title=f"{e}: top circuit heads")
        sec.add_figure(f"{e}: heads {', '.join(view.head_names)} on the reply “{reply[:80]}”", view)
        rows.append({"emotion": e, "heads": ", ".join(view.head_names), "reply": reply[:120]})
    if rows:
        sec.add_table("Heads shown per emotion", pd.DataFrame(rows))
    return sec
