"""Report sections: what a pipeline step hands to the HTML report and to notebooks.

A pipeline returns a list of :class:`Section`; :mod:`emolens.report` renders them into one
self-contained ``report.html``. Figures are plotly figures (or ready HTML snippets, e.g. a
circuitsvis render), tables are pandas DataFrames, and ``results`` are the raw
:class:`~emolens.results.Result` objects (saved next to the report).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("emolens")


def strict() -> bool:
    """``EMOLENS_STRICT=1``: a figure that cannot be drawn is an error (the tests set it)."""
    return os.environ.get("EMOLENS_STRICT", "") not in ("", "0")


@dataclass
class Section:
    """One titled part of a report.

    Attributes:
        title: heading.
        text: paragraphs (plain text; rendered escaped).
        figures: ``(caption, figure)`` pairs; figure is a plotly ``Figure`` or an HTML string.
        tables: ``(caption, pandas.DataFrame)`` pairs.
        results: named results, saved as ``NAME.safetensors`` + ``NAME.json`` next to the report.
    """

    title: str
    text: list[str] = field(default_factory=list)
    figures: list[tuple[str, Any]] = field(default_factory=list)
    tables: list[tuple[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def add_text(self, *paragraphs: str) -> "Section":
        self.text.extend(paragraphs)
        return self

    def add_figure(self, caption: str, fig: Any) -> "Section":
        self.figures.append((caption, fig))
        return self

    def figure(self, caption: str, make: Callable[..., Any], *args, **kw) -> "Section":
        """Draw ``make(*args, **kw)`` and add it; a failure raises under ``EMOLENS_STRICT=1`` and
        otherwise leaves a visible note in the section (never a silent log line)."""
        try:
            fig = make(*args, **kw)
        except Exception as e:  # noqa: BLE001 - turned into a visible note, or raised when strict
            if strict():
                raise
            log.warning("emolens: figure %r could not be drawn: %s: %s", caption, type(e).__name__, e)
            self.text.append(f"[Figure not drawn] {caption}: {type(e).__name__}: {e}")
            return self
        return self.add_figure(caption, fig)

    def add_table(self, caption: str, df: Any) -> "Section":
        self.tables.append((caption, df))
        return self

    def _repr_html_(self) -> str:
        """Notebook view: the section as it appears in the report (figures drawn offline)."""
        from .report import ReportView

        return ReportView([self], title=self.title)._repr_html_()
