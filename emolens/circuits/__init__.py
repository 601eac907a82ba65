"""Emotion circuits (paper 2: "Do LLMs 'Feel'? Emotion Circuits Discovery and Control").

Steps, each returning :class:`emolens.results.Result` objects:

1. prompts (:mod:`.prompts`): SEV items as P_emo / P_neu chat prompts; reads and injections at t*.
2. directions (:mod:`.directions`): context-agnostic emotion directions per layer and sublayer,
   from one streaming pass (:func:`collect_sev_stats`), plus the difference vectors of step 5.
3. steering (:mod:`.steer`): the RMS-scaled steering baseline.
4. components (:mod:`.components`): neuron scores (analytic), head scores (closed form, one pass;
   :func:`head_scores_masked` is the paper's masked definition), ablation/enhancement curves.
5. influence (:mod:`.influence`): sigma and sublayer causal influence.
6. assembly (:mod:`.assembly`): the global circuit (budget, quotas, cap) as a JSON-saved :class:`Circuit`.
7. modulation (:mod:`.modulation`): circuit modulation interventions for generation.

:mod:`emolens.pipelines.paper2` runs them end to end.
"""

from .assembly import Circuit, allocate, assemble_circuit, circuit_overlap
from .components import (component_curve, curve_ratio, head_scores, head_scores_from_stats, head_scores_masked,
                         layer_direction, neuron_scores, neuron_scores_from_stats, prefix_steppers)
from .directions import (EmotionSums, SEVStats, collect_sev_stats, complete_groups, difference_vectors,
                         direction_cosines, emotion_directions, group_mean_directions)
from .influence import layers_from_fraction, local_directions, reference_direction, sigma, sublayer_influence
from .modulation import modulation_interventions
from .prompts import (EMOTIONS, SYSTEM_EMO, SYSTEM_NEU, T_STAR, VALENCES, PromptSet, SEVItem, check_emotions,
                      emo_prompts, neu_prompts, p_emo, p_neu, sev_items)
from .steer import steering_interventions

__all__ = [
    "EMOTIONS", "VALENCES", "SYSTEM_EMO", "SYSTEM_NEU", "T_STAR", "SEVItem", "PromptSet", "sev_items",
    "check_emotions", "p_emo", "p_neu", "emo_prompts", "neu_prompts",
    "group_mean_directions", "EmotionSums", "SEVStats", "collect_sev_stats", "complete_groups",
    "emotion_directions", "difference_vectors", "direction_cosines",
    "neuron_scores_from_stats", "head_scores_from_stats", "neuron_scores", "head_scores", "head_scores_masked",
    "component_curve", "prefix_steppers", "curve_ratio", "layer_direction",
    "sigma", "layers_from_fraction", "reference_direction", "local_directions", "sublayer_influence",
    "allocate", "Circuit", "assemble_circuit", "circuit_overlap",
    "modulation_interventions", "steering_interventions",
]
