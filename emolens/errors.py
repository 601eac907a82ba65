"""emolens error types.

Every error raised on bad user input is an :class:`EmolensError`; its message says what was
wrong and how to fix it. Subclasses also inherit the matching builtin (``ValueError``,
``ImportError``, ...) so generic ``except`` clauses keep working.
"""

from __future__ import annotations


class EmolensError(Exception):
    """Base class of every emolens error."""


class ModelNotFoundError(EmolensError, ValueError):
    """An unknown model name, or a Hugging Face id that cannot be loaded here."""


class MissingDependencyError(EmolensError, ImportError):
    """An optional package (weights carrier, scorer) is not installed."""


class SiteError(EmolensError, ValueError):
    """A site (layer, head, neuron, hook name, position rule) that does not exist in the model."""


class InterventionError(EmolensError, ValueError):
    """An intervention that cannot be applied (wrong width, NaN values, bad op)."""


class InputError(EmolensError, ValueError):
    """Bad prompts or data: empty lists, too-long prompts, mismatched pairs."""


class DataError(EmolensError, ValueError):
    """A dataset file that does not follow its documented schema."""


class MetricError(EmolensError, ValueError):
    """A metric returned a non-scalar, NaN or otherwise unusable value."""


class JudgeError(EmolensError, RuntimeError):
    """An emotion judge could not be reached or used."""


class ResultError(EmolensError, ValueError):
    """A results object of the wrong kind, empty, or saved for another model."""


class OutputPathError(EmolensError, OSError):
    """An output path that cannot be written: under a file, in a read-only or missing place."""
