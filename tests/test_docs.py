"""The docs site builds with warnings as errors, and every tutorial runs (so none can rot)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.py"))
sys.path.insert(0, str(ROOT / "docs" / "hooks"))
import emolens_docs  # noqa: E402


def _env(**extra: str) -> dict:
    env = dict(os.environ, EMOLENS_PROGRESS="0", NO_MKDOCS_2_WARNING="1", PLOTLY_RENDERER="json",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def test_tutorials_exist_and_are_in_the_nav():
    names = {p.stem for p in TUTORIALS}
    assert {"quickstart", "attribution", "steering", "circuits", "scaling", "own_data"} <= names
    nav = (ROOT / "mkdocs.yml").read_text()
    for n in names:
        assert f"tutorials/{n}.md" in nav, f"{n}.py is not in the mkdocs nav"


def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict` (warnings are errors), without executing the tutorials."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          env=_env(EMOLENS_DOCS_EXECUTE="0"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    for p in TUTORIALS:
        page = site / "tutorials" / p.stem / "index.html"
        assert page.exists(), p.stem
        assert (site / "tutorials" / p.name).exists()  # the .py is published for download
    for mod in emolens_docs.public_modules():
        assert (site / "api" / mod / "index.html").exists(), mod
    model_page = (site / "api" / "emolens.model" / "index.html").read_text()
    assert "load_model" in model_page  # API reference generated from docstrings
    cli = (site / "cli" / "index.html").read_text()
    for cmd in ("emolens run", "emolens report", "emolens attribute", "--overwrite"):
        assert cmd in cli
    index = (site / "index.html").read_text()
    assert "fonts.googleapis.com" not in index  # the site itself works offline


def test_markdown_conversion_hides_tagged_cells_and_renders_outputs():
    cells = [{"type": "markdown", "source": "# Title\nIntro.", "tags": []},
             {"type": "code", "source": "import os\nSECRET = 1", "tags": ["remove-cell"], "outputs": []},
             {"type": "code", "source": "print('<hi>')", "tags": [],
              "outputs": [{"kind": "text", "data": "<hi>\n"}]},
             {"type": "code", "source": "fig", "tags": [],
              "outputs": [{"kind": "html", "data": "<div>\n\n<script>Plotly.newPlot()</script></div>", "plotly": True}]}]
    md = emolens_docs.cells_to_markdown(cells, source_name="t.py", plotly_src="../../p.js", executed=True)
    assert md.startswith("# Title\n\n!!! info")
    assert "SECRET" not in md and "```python\nprint('<hi>')\n```" in md
    assert "&lt;hi&gt;" in md and md.count('<script src="../../p.js"></script>') == 1
    assert "\n\n<script>Plotly" not in md  # raw HTML blocks carry no blank lines


def test_executor_reports_the_failing_cell(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("# %%\nx = 1\n\n# %%\nraise ValueError('boom')\n")
    with pytest.raises(emolens_docs.CellError, match=r"bad.py, cell 1 raised ValueError: boom"):
        emolens_docs.execute_tutorial(bad)
    ok = tmp_path / "ok.py"
    ok.write_text("# %%\nprint('a')\n1 + 1\n")
    cells = emolens_docs.execute_tutorial(ok)
    assert cells[0]["outputs"] == [{"kind": "text", "data": "a\n"}, {"kind": "text", "data": "2"}]


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_on_tiny_model(path):
    """Each tutorial executes cell by cell (as the docs build does) on a tiny random-weight model."""
    cells = emolens_docs.execute_tutorial(path, model="tiny-llama")
    code = [c for c in cells if c["type"] == "code"]
    assert code and any(c["outputs"] for c in code)
    md = emolens_docs.cells_to_markdown(cells, source_name=path.name, plotly_src="../../x.js", executed=True)
    if any(o.get("plotly") for c in code for o in c["outputs"]):
        assert md.count('<script src="../../x.js"></script>') == 1 and "Plotly.newPlot" in md


@pytest.mark.integration
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_as_a_script_on_the_embedded_model(path, tmp_path):
    """The published .py runs unchanged with `python` on the default (embedded) model."""
    # own_data runs paper 2 twice (with its judge ensemble and side-effect steps): ~15 min on a busy 2-core CPU
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
