"""End-to-end pipelines that reproduce the two papers emolens is built around.

- :mod:`emolens.pipelines.paper1`: "Conversations: Love Them, Hate Them, Steer Them" — locus by
  attribution patching, emotion vectors, steering, evaluation (``emolens steer``).
- :mod:`emolens.pipelines.paper2`: emotion circuits (``emolens circuit``).

Each exposes ``run(model, out_dir, *, quick=False, progress=True, config=None) -> list[Section]``
(raw results under ``out_dir/paperN/``, resumable), which ``emolens run`` renders into a report.
"""
