"""Control variants that aim to generalise beyond the analysis prompts (issue 10).

* :func:`reply_modulation_interventions` - circuit modulation whose head payload is written only at
  t* and the reply tokens (``Pos.from_last()``), like the neuron payload, instead of at every prompt
  token (the paper's ``Pos.all()``): the model reads the user's scenario unmodified.
* :func:`focused_heads` - the sub-circuit of an emotion's ``k`` heads with the largest payload norm
  (no neurons), for modulation at the reply positions: the payload on fewer heads at a larger scale.
* :func:`story_directions` - emotion vectors in the style of Sofroniew et al. (2026), "Emotion
  Concepts and their Function in a Large Language Model": the token-averaged residual stream over
  short texts that *show* an emotion without naming it (``emolens/data/emotion_stories.jsonl``,
  project-written), centred across emotions, with the top principal components of activations on
  emotionally neutral text (the neutral-confound subspace) projected out. Returned in the layout of
  :func:`~emolens.circuits.directions.emotion_directions` so
  :func:`~emolens.circuits.steer.steering_interventions` uses them unchanged.
* :func:`text_difference_vectors` - circuit payloads (neuron and ``hook_z`` difference vectors) from
  labelled texts instead of P_emo's t*: with the project's show-not-name stories the payload carries
  the emotion's content, not the instruction "reply in {emotion}" and its word.
* :func:`name_confound_removed` - step-5 difference vectors with their lexical component projected
  out: the difference vectors of prompts that only *mention* the emotion word ("Remember this word:
  {emotion}.") are the confound; each payload vector loses its projection on them, so modulation
  keeps what the instruction adds beyond the word (why: P_emo's payload makes small models name the
  emotion outright instead of expressing it).
* :func:`blend_payloads` - one payload from two: ``a + weight * b`` (e.g. P_emo's instruction payload
  plus the show-not-name story payload), so one circuit carries both what the instruction asks for
  and how the emotion reads in text.
* :func:`valence_arousal_axes` / :func:`valence_arousal_payload` - a two-axis control: each payload
  vector is fitted, by least squares over the emotions, as ``b + v_e V + a_e A`` from the emotions'
  valence-arousal coordinates (:data:`VA_COORDS`), and any point ``(v, a)`` of that plane becomes a
  payload ``b + v V + a A`` (for the six emotions: the payload restricted to two dimensions).
* :func:`per_emotion_choice` - per-emotion strengths from a calibration sweep with the same guarded rule;
  :func:`per_emotion_mix` - the same rule choosing each emotion's payload family *and* strength.

All interventions are plain :class:`~emolens.interventions.Add` specs run by the one hook engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import DataError, InputError
from ..results import Result
from ..sites import Pos, resid
from .assembly import Circuit
from .modulation import modulation_interventions

__all__ = ["reply_modulation_interventions", "focused_heads", "load_stories", "story_directions", "confound_basis",
           "per_emotion_choice", "text_difference_vectors", "name_confound_removed", "blend_payloads",
           "valence_arousal_axes", "valence_arousal_payload", "MENTION_TEMPLATE", "VA_COORDS"]

#: (valence, arousal) of the six emotions on [-1, 1]: approximate circumplex positions (Russell 1980;
#: NRC-VAD-like ordering), project-chosen, not tuned on any data. Pass your own to the functions below.
VA_COORDS: dict[str, tuple[float, float]] = {
    "anger": (-0.65, 0.75), "sadness": (-0.90, -0.40), "happiness": (0.90, 0.45),
    "fear": (-0.85, 0.70), "surprise": (0.70, 0.75), "disgust": (-0.90, 0.55),
}

#: System-prompt prefix of the lexical control for :func:`name_confound_removed`: the emotion word
#: is present, the instruction to express it is not.
MENTION_TEMPLATE = "Remember this word: {emotion}.\n"

_DATA = Path(__file__).resolve().parent.parent / "data"


def reply_modulation_interventions(model, circuit: Circuit, dmu_mlp: Result, dmu_attn: Result,
                                   scale: float = 1.0) -> list:
    """Circuit modulation with both payloads at t* and every generated token (``Pos.from_last()``)."""
    return modulation_interventions(model, circuit, dmu_mlp, dmu_attn, scale, neuron_pos=Pos.from_last(),
                                    head_pos=Pos.from_last())


def focused_heads(circuit: Circuit, dmu_attn: Result, k: int) -> Circuit:
    """The sub-circuit of ``circuit``'s ``k`` heads whose payload vector ``dmu_attn[e][l, h]`` has the
    largest L2 norm, and no neurons (ties: lower layer, then lower head first).

    Why: on SmolLM2-135M the story payload at the reply positions on all 180 heads of the fear circuit
    shows fear only at scales that cost 20-30 points of task retention; the payload on fewer heads at
    a larger scale reached fear at a smaller retention cost in calibration-split exploration.
    Modulate the result with :func:`reply_modulation_interventions`.

    Args:
        circuit: an emotion's circuit (its heads are the candidates).
        dmu_attn: head difference vectors (kind ``"head_vectors"``, ``[emotion, layer, head, d_head]``).
        k: heads to keep (at least 1; more than the circuit has keeps them all).

    Returns:
        A :class:`Circuit` with ``heads`` = the chosen heads per layer (by norm, largest first), ``neurons``
        empty and ``alloc["focused_heads"]`` = ``k``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"focused_heads(): k must be a positive integer, got {k!r}.")
    emos = dmu_attn.labels.get("emotion", [])
    if dmu_attn.kind != "head_vectors" or circuit.emotion not in emos:
        raise InputError(f"focused_heads(): need head difference vectors (kind 'head_vectors') that include "
                         f"{circuit.emotion!r}; got kind {dmu_attn.kind!r} with emotions {emos}.")
    z = dmu_attn.scores[emos.index(circuit.emotion)].double()  # [layer, head, d_head]
    if not torch.isfinite(z).all():
        raise InputError("focused_heads(): NaN or infinite payload vectors; recompute the difference vectors.")
    norm = z.norm(dim=-1)  # [layer, head]
    cand = sorted((-float(norm[int(l), int(h)]), int(l), int(h))
                  for l, hs in circuit.heads.items() for h in hs)  # largest norm first, then layer, head
    heads: dict[int, list[int]] = {}
    for _, l, h in cand[:k]:
        heads.setdefault(l, []).append(h)
    return Circuit(circuit.emotion, dict(circuit.model), {}, dict(sorted(heads.items())),
                   {**circuit.alloc, "focused_heads": k})


def load_stories(path: str | Path | None = None) -> list[tuple[str, str]]:
    """``(text, label)`` pairs; labels are the six emotions and ``neutral``."""
    p = Path(path) if path is not None else _DATA / "emotion_stories.jsonl"
    out = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"Cannot read emotion stories {p} ({e}); pass a JSONL of {{\"text\", \"emotion\"}}") from None
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                r = json.loads(line)
                out.append((str(r["text"]), str(r["emotion"]).lower()))
            except (json.JSONDecodeError, KeyError) as e:
                raise DataError(f"{p}:{i}: need a JSON object with 'text' and 'emotion' ({e})") from None
    return out


def confound_basis(acts: torch.Tensor, var_frac: float = 0.5, max_k: int = 8) -> torch.Tensor:
    """Orthonormal basis ``[k, d]`` of the top principal components of ``acts [n, d]`` that together
    explain ``var_frac`` of its variance (at most ``max_k``; ``k = 0`` gives an empty basis)."""
    x = acts.double() - acts.double().mean(0, keepdim=True)
    if x.shape[0] < 2 or float(x.norm()) == 0.0:
        return torch.zeros(0, acts.shape[1], dtype=acts.dtype)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    frac = (s ** 2).cumsum(0) / (s ** 2).sum()
    k = min(int((frac < var_frac).sum()) + 1, max_k, vh.shape[0])
    return vh[:k].to(acts.dtype)


def story_directions(model, neutral_prompts: Sequence, *, stories: Sequence[tuple[str, str]] | None = None,
                     emotions: Sequence[str] = ("anger", "sadness", "happiness", "fear", "surprise", "disgust"),
                     var_frac: float = 0.5, max_k: int = 8, batch_size: int = 16, progress: bool = False) -> Result:
    """Sofroniew-style emotion directions for every layer's ``resid_post``.

    Args:
        neutral_prompts: emotionally neutral chat prompts (e.g. P_neu of the analysis split) whose
            per-prompt mean activations define the confound subspace.
        stories: ``(text, label)`` pairs (default :func:`load_stories`); texts are read as raw text
            (no chat template) and averaged over all their tokens.
        var_frac, max_k: size of the confound subspace per layer (:func:`confound_basis`).

    Returns:
        Result kind ``"directions"``, scores ``[emotion, layer, sublayer(attn, mlp), d_model]`` (the
        same unit vector in both sublayer slots); ``meta["n_confound"]`` = confound PCs removed per layer.
    """
    from ..capture import capture

    stories = list(stories) if stories is not None else load_stories()
    emotions = list(emotions)
    texts = [t for t, e in stories if e in emotions]
    labels = [e for t, e in stories if e in emotions]
    missing = [e for e in emotions if e not in labels]
    if missing:
        raise InputError(f"story_directions(): no stories for {missing}")
    L = model.n_layers
    sites = [resid(l, "post") for l in range(L)]
    em = capture(model, texts, sites, pos=Pos.all(), reduce="group_mean", groups=labels, chat=False,
                 batch_size=batch_size, progress=progress, desc="story activations")
    neu = capture(model, list(neutral_prompts), sites, pos=Pos.prompt(), reduce="group_mean",
                  groups=list(range(len(neutral_prompts))), batch_size=batch_size, progress=progress,
                  desc="neutral activations")
    order = [em.groups.index(e) for e in emotions]
    out = torch.zeros(len(emotions), L, 2, model.d_model)
    n_conf = torch.zeros(L)
    for l, s in enumerate(sites):
        m = em[str(s)][order].double()  # [E, d]
        v = m - m.mean(0, keepdim=True)
        basis = confound_basis(neu[str(s)].double(), var_frac, max_k)  # [k, d]
        if basis.shape[0]:
            v = v - (v @ basis.T) @ basis
        v = v / (v.norm(dim=-1, keepdim=True) + 1e-12)
        out[:, l, 0] = out[:, l, 1] = v.float()
        n_conf[l] = basis.shape[0]
    return Result("directions", out, ("emotion", "layer", "sublayer", "dim"),
                  {"emotion": emotions, "sublayer": ["attn", "mlp"]}, {},
                  {"model": model.name, "metric": "unit direction",
                   "method": "story means centred across emotions, neutral-confound PCs projected out "
                             f"(var_frac={var_frac}, max_k={max_k})", "n_stories": len(texts),
                   "n_neutral": len(neutral_prompts), "n_confound": [int(x) for x in n_conf.tolist()]})


def text_difference_vectors(model, texts: Sequence[str], labels: Sequence[str], *,
                            emotions: Sequence[str] = ("anger", "sadness", "happiness", "fear", "surprise", "disgust"),
                            chat: bool = False, batch_size: int = 16, progress: bool = False) -> tuple[Result, Result]:
    """Difference vectors in the layout of :func:`~emolens.circuits.directions.difference_vectors`,
    from token-averaged activations over labelled texts.

    ``dmu_e[l] = m_e[l] - mean_e' m_e'[l]`` with ``m_e`` the mean over every token of every text
    labelled ``e`` of ``mlp.hook_post`` (neurons) and ``hook_z`` (heads).

    Args:
        texts, labels: one emotion label per text (texts of other labels are ignored).
        chat: read the texts through the chat template (default: raw text).

    Returns:
        ``(neurons [emotion, layer, d_mlp], head_vectors [emotion, layer, head, d_head])``, activation units.
    """
    from ..capture import capture
    from ..sites import head, neuron

    emotions, texts, labels = list(emotions), list(texts), list(labels)
    if len(texts) != len(labels):
        raise InputError(f"text_difference_vectors(): {len(texts)} texts but {len(labels)} labels; pass one each.")
    keep = [(t, e) for t, e in zip(texts, labels) if e in emotions]
    missing = [e for e in emotions if e not in {e2 for _, e2 in keep}]
    if missing:
        raise InputError(f"text_difference_vectors(): no texts labelled {missing}; add some or drop those emotions.")
    L = model.n_layers
    sites = [neuron(l) for l in range(L)] + [head(l) for l in range(L)]
    cap = capture(model, [t for t, _ in keep], sites, pos=Pos.all(), reduce="group_mean", groups=[e for _, e in keep],
                  chat=chat, batch_size=batch_size, progress=progress, desc="text activations")
    order = [cap.groups.index(e) for e in emotions]
    mn = torch.stack([cap.data[f"neuron.{l}"][order].double() for l in range(L)], 1)  # [E, L, d_mlp]
    z = torch.stack([cap.data[f"head.{l}"][order].double() for l in range(L)], 1)  # [E, L, H, d_head]
    mn, z = mn - mn.mean(0, keepdim=True), z - z.mean(0, keepdim=True)
    meta = {"model": model.name, "metric": "activation difference", "n_texts": len(keep),
            "method": "token-averaged group means over labelled texts, centred across emotions"}
    return (Result("neurons", mn.float(), ("emotion", "layer", "neuron"), {"emotion": emotions}, {}, dict(meta)),
            Result("head_vectors", z.float(), ("emotion", "layer", "head", "dim"), {"emotion": emotions}, {}, dict(meta)))


def name_confound_removed(dmu: Result, confound: Result) -> Result:
    """``dmu`` with, per emotion and layer (and head), its projection on ``confound`` removed.

    ``v' = v - (v.c / c.c) c`` for each payload vector ``v`` (a layer's neuron vector, or one head's
    ``hook_z`` vector) and the same slice ``c`` of ``confound`` (e.g. the difference vectors of the
    :data:`MENTION_TEMPLATE` prompts); a zero ``c`` leaves ``v`` unchanged.
    """
    if dmu.kind != confound.kind or tuple(dmu.scores.shape) != tuple(confound.scores.shape):
        raise InputError(f"name_confound_removed(): {dmu.kind} {tuple(dmu.scores.shape)} vs confound "
                         f"{confound.kind} {tuple(confound.scores.shape)}; pass difference vectors of the same model "
                         "and layout.")
    if dmu.labels.get("emotion") != confound.labels.get("emotion"):
        raise InputError("name_confound_removed(): the emotions of the payload and the confound differ; compute both "
                         "for the same emotions in the same order.")
    v, c = dmu.scores.double(), confound.scores.double()
    cc = (c * c).sum(-1, keepdim=True)
    coef = torch.where(cc > 0, (v * c).sum(-1, keepdim=True) / cc.clamp_min(1e-30), torch.zeros_like(cc))
    out = (v - coef * c).float()
    return Result(dmu.kind, out, dmu.axes, dict(dmu.labels), {}, {**dmu.meta, "confound_removed": True,
                                                                "confound": confound.meta.get("method", "")})


def blend_payloads(a: Result, b: Result, weight: float) -> Result:
    """``a + weight * b`` for two difference-vector results of the same kind, layout and emotions.

    Modulating with the blend at scale ``s`` equals modulating with ``a`` at ``s`` and ``b`` at
    ``s * weight`` together (the hooks add), in one :class:`~emolens.interventions.Add` per site.
    """
    if a.kind != b.kind or tuple(a.scores.shape) != tuple(b.scores.shape):
        raise InputError(f"blend_payloads(): {a.kind} {tuple(a.scores.shape)} vs {b.kind} {tuple(b.scores.shape)}; "
                         "pass difference vectors of the same model and layout.")
    if a.labels.get("emotion") != b.labels.get("emotion"):
        raise InputError("blend_payloads(): the two payloads list different emotions (or orders); compute both for "
                         "the same emotions in the same order.")
    w = float(weight)
    if not torch.isfinite(a.scores).all() or not torch.isfinite(b.scores).all() or w != w or abs(w) == float("inf"):
        raise InputError("blend_payloads(): NaN or infinite values in a payload or the weight; recompute the payloads.")
    out = (a.scores.double() + w * b.scores.double()).float()
    return Result(a.kind, out, a.axes, dict(a.labels), {},
                  {**a.meta, "metric": a.meta.get("metric", "activation difference"),
                   "method": f"blend: ({a.meta.get('method', 'a')}) + {w:g} x ({b.meta.get('method', 'b')})"})


def _va_matrix(emotions: Sequence[str], coords: Mapping[str, tuple[float, float]], who: str) -> torch.Tensor:
    missing = [e for e in emotions if e not in coords]
    if missing:
        raise InputError(f"{who}: no valence-arousal coordinates for {missing}; pass coords={{emotion: (v, a)}}.")
    c = torch.tensor([[1.0, *map(float, coords[e])] for e in emotions], dtype=torch.float64)  # [E, 3]
    if not torch.isfinite(c).all():
        raise InputError(f"{who}: coordinates must be finite numbers.")
    return c


def valence_arousal_axes(dmu: Result, coords: Mapping[str, tuple[float, float]] | None = None) -> Result:
    """Least-squares valence and arousal axes of a difference-vector payload.

    For every payload entry (layer, neuron or head dimension), fits over the emotions
    ``dmu[e] = b + v_e * V + a_e * A`` (``coords[e] = (v_e, a_e)``, default :data:`VA_COORDS`).

    Args:
        dmu: difference vectors ``[emotion, ...]`` (e.g. step 5's neurons or head vectors, a blend).
        coords: valence-arousal coordinates of at least three emotions of ``dmu`` that are not collinear.

    Returns:
        Result of ``dmu``'s kind with the emotion axis replaced by ``axis`` = ``["intercept",
        "valence", "arousal"]``: ``[3, ...]`` in the payload's units per unit of the coordinates.
    """
    emos = list(dmu.labels.get("emotion", []))
    if not emos or dmu.axes[0] != "emotion":
        raise InputError("valence_arousal_axes(): pass difference vectors with a leading 'emotion' axis.")
    coords = VA_COORDS if coords is None else coords
    c = _va_matrix(emos, coords, "valence_arousal_axes()")
    if len(emos) < 3 or torch.linalg.matrix_rank(c) < 3:
        raise InputError(f"valence_arousal_axes(): the coordinates of {emos} do not span the plane (need 3 emotions "
                         "not on one line); add emotions or change coords.")
    y = dmu.scores.double()
    if not torch.isfinite(y).all():
        raise InputError("valence_arousal_axes(): NaN or infinite values in the payload; recompute it.")
    coef = torch.linalg.lstsq(c, y.reshape(len(emos), -1)).solution  # [3, n]
    return Result(dmu.kind, coef.reshape((3,) + tuple(y.shape[1:])).float(), ("axis",) + tuple(dmu.axes[1:]),
                  {"axis": ["intercept", "valence", "arousal"]}, {},
                  {**dmu.meta, "coords": {e: list(map(float, coords[e])) for e in emos},
                   "method": f"valence-arousal least squares of ({dmu.meta.get('method', 'payload')})"})


def valence_arousal_payload(axes: Result, coords: Mapping[str, tuple[float, float]]) -> Result:
    """Payloads at points of the valence-arousal plane: ``b + v V + a A`` for each ``name: (v, a)``.

    Args:
        axes: :func:`valence_arousal_axes`'s result.
        coords: ``{name: (valence, arousal)}``; the names become the ``emotion`` labels, so
            :func:`~emolens.circuits.modulation.modulation_interventions` takes the result as it takes
            step 5's difference vectors (with a circuit whose ``emotion`` is that name).

    Returns:
        Result of ``axes``'s kind, ``[emotion, ...]``.
    """
    if axes.axes[0] != "axis" or axes.labels.get("axis") != ["intercept", "valence", "arousal"]:
        raise InputError("valence_arousal_payload(): pass the result of valence_arousal_axes().")
    names = list(coords)
    if not names:
        raise InputError("valence_arousal_payload(): pass at least one {name: (valence, arousal)} point.")
    c = _va_matrix(names, coords, "valence_arousal_payload()")
    out = torch.einsum("ek,k...->e...", c, axes.scores.double()).float()
    return Result(axes.kind, out, ("emotion",) + tuple(axes.axes[1:]), {"emotion": names}, {},
                  {**axes.meta, "points": {n: list(map(float, coords[n])) for n in names},
                   "method": f"valence-arousal point of ({axes.meta.get('method', 'axes')})"})


def per_emotion_choice(per_emotion_rows: Mapping[str, Sequence[Mapping]], guards, default: float) -> dict[str, float]:
    """Per-emotion strengths with :func:`~emolens.evaluate.side_effects.select_operating_point`.

    ``per_emotion_rows[e]`` holds that emotion's sweep rows (``value``, ``accuracy``, ``card``
    computed on that emotion's calibration replies); an emotion with no passing row gets ``default``.
    """
    rows = {e: [{**r, "method": None} for r in rs] for e, rs in per_emotion_rows.items()}
    return {e: v for e, (_, v) in per_emotion_mix(rows, guards, (None, default)).items()}


def per_emotion_mix(per_emotion_rows: Mapping[str, Sequence[Mapping]], guards,
                    default: tuple[str | None, float]) -> dict[str, tuple[str | None, float]]:
    """Per-emotion payload family *and* strength with the guarded rule of
    :func:`~emolens.evaluate.side_effects.select_operating_point`.

    ``per_emotion_rows[e]`` holds that emotion's candidate rows, each with ``method`` (the payload
    family, e.g. ``"circuit_blend"``), ``value`` (its scale), ``accuracy`` and ``card`` measured on
    that emotion's calibration replies (and, for retention, questions asked under that emotion's
    intervention). Ties go to the smaller value, then to the earlier row (so list the families in
    order of preference). An emotion with no passing row gets ``default`` (``(method, value)``).

    Returns:
        ``{emotion: (method, value)}``.
    """
    from ..evaluate.side_effects import select_operating_point

    out = {}
    for e, rows in per_emotion_rows.items():
        best = select_operating_point(rows, guards)  # a stable sort: equal (accuracy, value) keep row order
        out[e] = (best["method"], float(best["value"])) if best is not None else (default[0], float(default[1]))
    return out


__all__ += ["per_emotion_mix"]


def generate_with(model, prompts: Sequence, emotions: Sequence[str | None], *, interventions_for=None,
                  gen_kwargs: Mapping | None = None, batch_size: int = 32, progress: bool = False,
                  desc: str = "generate") -> list[str]:
    """Greedy replies; rows of different target emotions share a batch, each emotion's interventions
    restricted (``rows=``) to its own rows. ``interventions_for(emotion) -> list[Intervention]``."""
    import dataclasses

    from ..progress import progress_bar

    prompts, emotions = list(prompts), list(emotions)
    specs = {e: list(interventions_for(e)) for e in dict.fromkeys(emotions)} if interventions_for else {}
    out: list[str] = []
    for s in progress_bar(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        rows = list(range(s, min(s + batch_size, len(prompts))))
        ivs = []
        for e, sp in specs.items():
            mine = tuple(i - s for i in rows if emotions[i] == e)
            if mine:
                ivs += [dataclasses.replace(iv, rows=mine) for iv in sp]
        texts = model.generate([prompts[i] for i in rows], interventions=ivs or None, batch_size=len(rows),
                               **dict(gen_kwargs or {}))
        out += [t.strip() for t in texts]
    return out


__all__ += ["generate_with"]
