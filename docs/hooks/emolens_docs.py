"""mkdocs hooks for the emolens docs site.

- Tutorials are py-percent files under ``docs/tutorials/`` (plain Python that also opens as a
  notebook with jupytext). Each becomes a generated Markdown page: markdown cells as text, code
  cells as highlighted blocks, and - when ``EMOLENS_DOCS_EXECUTE=1`` - the cells' outputs
  (printed text, tables, plotly figures, circuitsvis widgets), executed in-process on
  ``EMOLENS_TUTORIAL_MODEL`` (default: the embedded SmolLM2). Cells tagged ``remove-cell`` run
  but are not shown. The ``.py`` file is published next to the page for download.
- The API reference gets one mkdocstrings page per public ``emolens`` module, discovered at build
  time, so new modules appear without editing ``mkdocs.yml``.
- The CLI page is generated from the ``argparse`` help texts.

The same executor is used by ``tests/test_docs.py`` (:func:`execute_tutorial`).
"""

from __future__ import annotations

import ast
import contextlib
import html
import io
import os
import tempfile
from pathlib import Path
from typing import Any

HIDE_TAGS = {"remove-cell", "hide-cell", "remove_cell"}
TUTORIAL_DIR = "tutorials"
API_DIR = "api"
PLOTLY_ASSET = "assets/javascripts/plotly.min.js"


def _execute_enabled() -> bool:
    return os.environ.get("EMOLENS_DOCS_EXECUTE", "0").lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------------------------
# executing py-percent tutorials
# --------------------------------------------------------------------------------------------
class CellError(RuntimeError):
    """A tutorial cell raised; the message names the file and cell."""


def read_cells(path: str | Path) -> list[dict]:
    """Cells of a py-percent file: ``{"type": "markdown"|"code", "source": str, "tags": [...]}``."""
    import jupytext

    nb = jupytext.reads(Path(path).read_text(encoding="utf-8"), fmt="py:percent")
    return [{"type": c.cell_type, "source": c.source, "tags": list(c.metadata.get("tags", []))} for c in nb.cells]


def _rich(value: Any) -> dict | None:
    """A displayable output for a cell's last expression value."""
    if value is None:
        return None
    if hasattr(value, "to_plotly_json") and hasattr(value, "to_html"):
        return {"kind": "html", "data": value.to_html(include_plotlyjs=False, full_html=False,
                                                      config={"responsive": True, "displaylogo": False}),
                "plotly": True}
    if hasattr(value, "_repr_html_"):
        try:
            h = value._repr_html_()
        except Exception:  # noqa: BLE001 - fall back to repr
            h = None
        if h:
            return {"kind": "html", "data": h, "plotly": "Plotly.newPlot" in h}
    return {"kind": "text", "data": repr(value)}


def execute_tutorial(path: str | Path, *, model: str | None = None, workdir: str | Path | None = None
                     ) -> list[dict]:
    """Run a py-percent tutorial cell by cell; return the cells with their outputs.

    Each returned cell has ``outputs``: a list of ``{"kind": "text"|"html", "data": str}``
    (stdout and the value of a final expression, as in a notebook).

    Raises:
        CellError: a cell raised (message: file, cell number, the exception).
    """
    path = Path(path)
    cells = read_cells(path)
    env = {"EMOLENS_PROGRESS": "0", "PLOTLY_RENDERER": "json"}
    if model:
        env["EMOLENS_TUTORIAL_MODEL"] = model
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ns: dict[str, Any] = {"__name__": "__main__", "__file__": str(path)}
    old_cwd = os.getcwd()
    tmp = tempfile.TemporaryDirectory(prefix="emolens-tutorial-") if workdir is None else None
    os.chdir(workdir or tmp.name)  # tutorials may write run folders; keep them out of the repo
    try:
        from emolens import viz

        viz._plotlyjs_sent = True  # docs pages load plotly.js once themselves
        for i, cell in enumerate(cells):
            cell["outputs"] = []
            if cell["type"] != "code" or not cell["source"].strip():
                continue
            try:
                tree = ast.parse(cell["source"], filename=f"{path.name}[cell {i}]")
            except SyntaxError as e:
                raise CellError(f"{path.name}, cell {i}: {e}") from e
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            buf = io.StringIO()
            value = None
            try:
                with contextlib.redirect_stdout(buf):
                    exec(compile(tree, f"{path.name}[cell {i}]", "exec"), ns)  # noqa: S102 - our own tutorials
                    if last is not None:
                        value = eval(compile(ast.Expression(last.value), f"{path.name}[cell {i}]", "eval"), ns)
            except Exception as e:  # noqa: BLE001 - re-raised with the cell named
                raise CellError(f"{path.name}, cell {i} raised {type(e).__name__}: {e}\n--- cell source ---\n"
                                f"{cell['source']}") from e
            if buf.getvalue():
                cell["outputs"].append({"kind": "text", "data": buf.getvalue()})
            out = _rich(value)
            if out:
                cell["outputs"].append(out)
        return cells
    finally:
        os.chdir(old_cwd)
        if tmp is not None:
            tmp.cleanup()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _html_block(h: str) -> str:
    # A raw-HTML block for Python-Markdown: no blank lines inside, starts at column 0.
    h = "\n".join(line for line in h.splitlines() if line.strip())
    return f'<div class="emolens-output" markdown="0">\n{h}\n</div>'


def cells_to_markdown(cells: list[dict], *, source_name: str, plotly_src: str | None, executed: bool) -> str:
    """Markdown for a tutorial page."""
    parts = []
    used_plotly = False
    for cell in cells:
        if cell["type"] == "markdown":
            parts.append(cell["source"])
            continue
        if HIDE_TAGS & set(cell.get("tags", [])):
            continue
        if cell["source"].strip():
            parts.append("```python\n" + cell["source"].rstrip() + "\n```")
        for out in cell.get("outputs", []):
            if out["kind"] == "text":
                text = out["data"].rstrip("\n")
                if len(text) > 6000:
                    text = text[:6000] + "\n... (output truncated)"
                parts.append('<pre class="emolens-output"><code>' + html.escape(text) + "</code></pre>")
            else:
                if out.get("plotly") and not used_plotly and plotly_src:
                    parts.append(f'<script src="{plotly_src}"></script>')
                    used_plotly = True
                parts.append(_html_block(out["data"]))
    head = parts[0] if parts else ""
    note = (f'!!! info "Run it yourself"\n    This page is generated from [`{source_name}`]({source_name}), a '
            "py-percent file: run it with `python`, or open it as a notebook with jupytext. "
            + ("Outputs below were produced when the docs were built." if executed else
               "Outputs are shown when the docs are built with `make docs`."))
    # Put the note right after the page title (the first markdown cell's heading).
    if head.startswith("# "):
        title, _, rest = head.partition("\n")
        parts[0] = title + "\n\n" + note + ("\n\n" + rest if rest.strip() else "")
    else:
        parts.insert(0, note)
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# API reference and CLI pages
# --------------------------------------------------------------------------------------------
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "emolens"


def public_modules(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """``emolens`` and its public submodules (no ``_private`` parts), found on disk without importing."""
    mods = []
    for py in sorted(package_dir.rglob("*.py")):
        rel = py.relative_to(package_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or "__pycache__" in py.parts:
            continue
        if not (py.parent / "__init__.py").exists():
            continue  # a plain folder (data, scripts), not a package
        mods.append(".".join(parts))
    return sorted(set(mods))


def _module_summary(name: str, package_dir: Path = PACKAGE_DIR) -> str:
    """First paragraph of a module's docstring, read with ``ast`` (no import side effects)."""
    base = package_dir.parent.joinpath(*name.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().split("\n\n")[0].replace("\n", " ").strip()


def api_index_markdown(mods: list[str]) -> str:
    bar = "\\|"
    rows = "\n".join(f"| [`{m}`]({m}.md) | {_module_summary(m).replace('|', bar)} |" for m in mods)
    return ("# API reference\n\nGenerated from the docstrings of every public module.\n\n"
            "| module | summary |\n|---|---|\n" + rows + "\n")


def cli_markdown() -> str:

    from emolens import cli

    for mod in ("emolens.pipelines.cli_commands",):
        try:
            __import__(mod)
        except ImportError:
            pass
    parser = cli._top_parser()  # the parsers `emolens` itself uses, with each command's examples
    subs = {name: cli.build_parser(name) for name in cli.COMMANDS}
    os.environ.setdefault("COLUMNS", "100")
    parts = ["# Command line", "", "`emolens` is installed with the package (`make run` calls `emolens run`).", "",
             "```text", parser.format_help().rstrip(), "```"]
    for name, p in subs.items():
        parts += ["", f"## `emolens {name}`", "", "```text", p.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# mkdocs events
# --------------------------------------------------------------------------------------------
def on_config(config, **kwargs):
    """Fill the "API reference" nav entry with one page per module."""
    mods = public_modules()
    pages = [f"{API_DIR}/index.md"] + [{m: f"{API_DIR}/{m}.md"} for m in mods]
    nav = config.get("nav") or []
    for item in nav:
        if isinstance(item, dict) and "API reference" in item:
            item["API reference"] = pages
    config["_emolens_modules"] = mods  # type: ignore[index]
    return config


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    docs_dir = Path(config["docs_dir"])
    execute = _execute_enabled()
    model = os.environ.get("EMOLENS_TUTORIAL_MODEL") or None
    depth = 2 if config.get("use_directory_urls", True) else 1
    plotly_src = "../" * depth + PLOTLY_ASSET
    for py in sorted((docs_dir / TUTORIAL_DIR).glob("*.py")):
        cells = execute_tutorial(py, model=model) if execute else read_cells(py)
        md = cells_to_markdown(cells, source_name=py.name, plotly_src=plotly_src, executed=execute)
        files.append(File.generated(config, f"{TUTORIAL_DIR}/{py.stem}.md", content=md))
    mods = config.get("_emolens_modules") or public_modules()
    files.append(File.generated(config, f"{API_DIR}/index.md", content=api_index_markdown(mods)))
    for m in mods:
        files.append(File.generated(config, f"{API_DIR}/{m}.md", content=f"# `{m}`\n\n::: {m}\n"))
    files.append(File.generated(config, "cli.md", content=cli_markdown()))
    from plotly.offline import get_plotlyjs

    files.append(File.generated(config, PLOTLY_ASSET, content=get_plotlyjs()))
    return files

