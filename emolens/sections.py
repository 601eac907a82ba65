"""Report sections: what a pipeline step hands to the HTML report and to notebooks.

A pipeline returns a list of :class:`Section`; :mod:`emolens.report` renders them into one
self-contained ``report.html``. Figures are plotly figures (or ready HTML snippets, e.g. a
circuitsvis render), tables are pandas DataFrames, and ``results`` are the raw
:class:`~emolens.results.Result` objects (saved next to the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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

    def add_table(self, caption: str, df: Any) -> "Section":
        self.tables.append((caption, df))
        return self

    def _repr_html_(self) -> str:
        """Notebook view: the section as it appears in the report (figures drawn offline)."""
        from .report import ReportView

        return ReportView([self], title=self.title)._repr_html_()
