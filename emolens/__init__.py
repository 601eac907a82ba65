"""emolens: find and control how language models express emotion.

The layout follows the data: model → sites → capture → attribute/patch → directions →
interventions → circuits → evaluate → visualise/report.

Quick start::

    import emolens
    from emolens import resid, Pos
    from emolens.interventions import Add

    m = emolens.load_model()                       # SmolLM2-135M-Instruct, offline
    print(m.generate(["How was your weekend?"], max_new_tokens=30))
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (DataError, EmolensError, InputError, InterventionError, JudgeError, MetricError,
                     MissingDependencyError, ModelNotFoundError, ResultError, SiteError)
from .model import DEFAULT_MODEL, KNOWN_MODELS, Batch, EmoModel, load_model
from .sites import Pos, Site, attn_out, head, mlp_out, neuron, resid
from .interventions import Add, Intervention, Mean, Replace, Scale, Set, Zero
from .capture import CaptureResult, capture, run_with_cache

__all__ = [
    "__version__", "load_model", "EmoModel", "Batch", "DEFAULT_MODEL", "KNOWN_MODELS",
    "Site", "Pos", "resid", "head", "neuron", "attn_out", "mlp_out",
    "Intervention", "Add", "Scale", "Set", "Zero", "Mean", "Replace",
    "capture", "run_with_cache", "CaptureResult",
    "EmolensError", "ModelNotFoundError", "MissingDependencyError", "SiteError", "InterventionError",
    "InputError", "DataError", "MetricError", "JudgeError", "ResultError",
]
