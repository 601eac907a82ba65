"""End-to-end pipelines that reproduce the two papers emolens is built around.

- :mod:`emolens.pipelines.engine`: the step engine both run on (fingerprinted steps, atomic outputs,
  resume that never reuses stale work; :class:`~emolens.pipelines.engine.PipelineConfig`).
- :mod:`emolens.pipelines.paper1`: "Conversations: Love Them, Hate Them, Steer Them" — locus by
  attribution patching, emotion vectors, steering, evaluation (``emolens steer``).
- :mod:`emolens.pipelines.paper2`: emotion circuits (``emolens circuit``).

Each exposes ``STEPS`` (its public steps) and ``run(model, out_dir, *, quick=False, progress=True,
config=None, resume=True, on_step=None) -> list[Section]`` (raw results under ``out_dir/paperN/``),
which ``emolens run`` renders into a report.
"""
