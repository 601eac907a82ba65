"""Figures fail loud: an error under EMOLENS_STRICT=1 (set by conftest), a visible note in the report otherwise."""

from __future__ import annotations

import pytest

from emolens.sections import Section


def _broken(*a, **k):
    raise ValueError("no data to draw")


def test_a_figure_that_cannot_be_drawn_raises_under_strict():
    with pytest.raises(ValueError, match="no data"):
        Section("s").figure("broken", _broken)


def test_a_figure_that_cannot_be_drawn_leaves_a_visible_note(monkeypatch):
    from emolens.report import render_html

    monkeypatch.setenv("EMOLENS_STRICT", "0")
    s = Section("s").figure("Broken plot", _broken).figure("Fine", lambda: "<div id='ok'>fine</div>")
    assert s.text == ["[Figure not drawn] Broken plot: ValueError: no data to draw"]
    assert [c for c, _ in s.figures] == ["Fine"]
    assert "[Figure not drawn] Broken plot" in render_html([s])
