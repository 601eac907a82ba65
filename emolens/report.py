"""Self-contained HTML reports and run folders.

A pipeline returns a list of :class:`~emolens.sections.Section`; :func:`write_report` saves each
section's raw material (results as safetensors + JSON, tables as CSV, figures as plotly JSON or
HTML) under ``RUN_DIR/sections/NN-slug/`` and renders one ``RUN_DIR/report.html`` that needs no
network: plotly.js is inlined once, the circuitsvis bundle once (only when an attention widget is
on the page), every figure is a ``<div>`` drawn by a small script, every text is HTML-escaped.
:func:`rerender` rebuilds ``report.html`` from the saved material (``emolens report RUN_DIR``).

Run folders come from :func:`new_run_dir`, which never reuses an existing folder unless asked to
(``overwrite=True``, and then only a folder that holds an emolens run or nothing).

Layout of a run folder::

    RUN_DIR/
      report.html            # the self-contained report
      run.json               # title, run metadata (date, version, model, settings), section index
      sections/01-model-overview/
        section.json         # title, text, captions and file names
        results/NAME.safetensors + NAME.json
        figure-01.plotly.json | figure-01.html
        table-01.csv
      ...                    # pipelines may write further raw files at the top level
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import InputError, ResultError
from .sections import Section

REPORT_NAME = "report.html"
RUN_MARKER = "run.json"
#: Rows shown per table in the HTML (the CSV next to the report keeps all rows).
MAX_TABLE_ROWS = 200

__all__ = ["REPORT_NAME", "RUN_MARKER", "new_run_dir", "save_sections", "load_sections", "render_html",
           "write_report", "rerender", "section_html", "ReportView", "run_metadata"]


# --------------------------------------------------------------------------------------------
# run folders
# --------------------------------------------------------------------------------------------
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _is_run_dir(p: Path) -> bool:
    return (p / RUN_MARKER).exists()


def new_run_dir(root: str | Path = "runs", name: str | None = None, overwrite: bool = False) -> Path:
    """Create a fresh run folder ``root/name`` and return it.

    Args:
        root: parent folder (created if missing).
        name: folder name; default a timestamp ``YYYYmmdd-HHMMSS`` (``-2``, ``-3``... appended if taken).
        overwrite: replace an existing ``root/name``. Only a folder that holds an emolens run
            (``run.json``) or nothing is replaced; anything else is refused.

    Raises:
        InputError: ``name`` exists and ``overwrite`` is False, or it is not a run folder, or the
            name is not a plain folder name.
    """
    from .io import ensure_dir

    root = ensure_dir(root)  # OutputPathError naming the file or read-only folder in the way
    if name is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for i in range(1, 1000):
            cand = root / (stamp if i == 1 else f"{stamp}-{i}")
            try:
                cand.mkdir()  # atomic: two runs started in the same second get different folders
                return cand
            except FileExistsError:
                continue
        raise InputError(f"Could not find a free run folder name under {root}; pass --name.")
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise InputError(f"Run name {name!r} is not a plain folder name; use letters, digits, '.', '_' or '-'.")
    path = root / name
    if path.exists():
        if not overwrite:
            raise InputError(f"Run folder {path} already exists; choose another --name, or pass --overwrite "
                             "(overwrite=True) to replace it.")
        if not path.is_dir():
            raise InputError(f"{path} exists and is not a folder; remove it or choose another --name.")
        if any(path.iterdir()) and not _is_run_dir(path):
            raise InputError(f"{path} exists and is not an emolens run folder (no {RUN_MARKER}); refusing to delete "
                             "it. Choose another --name.")
        shutil.rmtree(path)
    path.mkdir()
    return path


def run_metadata(model=None, settings: dict | None = None, **extra: Any) -> dict:
    """Run metadata for a report: date, emolens/torch/transformers versions, model, settings."""
    import platform

    import torch

    from . import __version__

    meta: dict[str, Any] = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "emolens": __version__,
                            "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if model is not None:
        meta["model"] = getattr(model, "name", str(model))
        if getattr(model, "fingerprint", None):
            meta["model_fingerprint"] = model.fingerprint
    if settings:
        meta["settings"] = settings
    meta.update(extra)
    return meta


# --------------------------------------------------------------------------------------------
# saving and loading sections
# --------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:40] or "section"


def _safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return s or "result"


def _is_plotly(fig: Any) -> bool:
    return hasattr(fig, "to_plotly_json") and hasattr(fig, "to_html")


def _check_sections(sections: Any) -> list[Section]:
    if isinstance(sections, Section):
        sections = [sections]
    sections = list(sections or [])
    if not sections:
        raise InputError("Nothing to report: the list of sections is empty.")
    for s in sections:
        if not isinstance(s, Section):
            raise InputError(f"Reports are built from emolens.sections.Section objects, got {type(s).__name__}.")
    return sections


def save_sections(sections: Sequence[Section], run_dir: str | Path) -> list[dict]:
    """Save each section's results, tables and figures under ``run_dir/sections/NN-slug/``.

    Returns the section index written into ``run.json``.
    """
    import pandas as pd

    from .results import Result

    sections = _check_sections(sections)
    base = Path(run_dir) / "sections"
    index = []
    for i, sec in enumerate(sections, 1):
        d = base / f"{i:02d}-{_slug(sec.title)}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        entry: dict[str, Any] = {"title": sec.title, "text": list(sec.text), "figures": [], "tables": [],
                                 "results": []}
        used: set[str] = set()
        for name, res in sec.results.items():
            if not isinstance(res, Result):
                raise ResultError(f"Section {sec.title!r}: results[{name!r}] is a {type(res).__name__}, not a Result.")
            fname = _safe_name(name)
            while fname in used:
                fname += "_"
            used.add(fname)
            res.save(d / "results" / fname)
            entry["results"].append({"name": str(name), "file": f"results/{fname}"})
        for j, (caption, fig) in enumerate(sec.figures, 1):
            if _is_plotly(fig):
                fn = f"figure-{j:02d}.plotly.json"
                (d / fn).write_text(fig.to_json(), encoding="utf-8")
            else:
                fn = f"figure-{j:02d}.html"
                (d / fn).write_text(_figure_snippet(fig), encoding="utf-8")
            entry["figures"].append({"caption": str(caption), "file": fn})
        for j, (caption, df) in enumerate(sec.tables, 1):
            if not isinstance(df, pd.DataFrame):
                df = pd.DataFrame(df)
            fn = f"table-{j:02d}.csv"
            out = df if isinstance(df.index, pd.RangeIndex) else df.reset_index()
            out.to_csv(d / fn, index=False)
            entry["tables"].append({"caption": str(caption), "file": fn})
        (d / "section.json").write_text(json.dumps(entry, indent=1), encoding="utf-8")
        index.append({"title": sec.title, "dir": f"sections/{d.name}"})
    return index


def load_sections(run_dir: str | Path) -> list[Section]:
    """Rebuild the sections saved by :func:`save_sections` (figures, tables and results)."""
    import pandas as pd
    import plotly.io as pio

    from .results import Result

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a folder; pass a run folder written by `emolens run`.")
    info_path = run_dir / RUN_MARKER
    if not info_path.exists():
        raise InputError(f"{run_dir} has no {RUN_MARKER}; it is not an emolens run folder.")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    out = []
    for item in info.get("sections", []):
        d = run_dir / item["dir"]
        spec_path = d / "section.json"
        if not spec_path.exists():
            raise InputError(f"{spec_path} is missing; the run folder is incomplete. Re-run `emolens run`.")
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        sec = Section(spec["title"], text=list(spec.get("text", [])))
        for f in spec.get("figures", []):
            p = d / f["file"]
            fig = pio.from_json(p.read_text(encoding="utf-8")) if p.name.endswith(".plotly.json") else \
                p.read_text(encoding="utf-8")
            sec.figures.append((f["caption"], fig))
        for t in spec.get("tables", []):
            sec.tables.append((t["caption"], pd.read_csv(d / t["file"])))
        for r in spec.get("results", []):
            sec.results[r["name"]] = Result.load(d / r["file"])
        out.append(sec)
    return out


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#e3e6ec; --accent:#3454d1; --bg:#fff; --code:#f5f6f8; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg);
       margin: 0; line-height: 1.5; }
header, main, footer { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 28px; border-bottom: 1px solid var(--line); }
h1 { margin: 0 0 4px 0; font-size: 1.8em; }
h2 { margin-top: 2.2em; padding-top: .4em; border-top: 2px solid var(--line); }
.subtitle { color: var(--muted); margin: 0 0 16px 0; }
nav.toc { background: var(--code); border: 1px solid var(--line); border-radius: 6px; padding: 8px 20px; margin: 18px 0; }
nav.toc ol { margin: 6px 0; }
nav.toc a { color: var(--accent); text-decoration: none; }
table.emolens-table { border-collapse: collapse; font-size: .9em; margin: 6px 0 4px 0; }
table.emolens-table th, table.emolens-table td { border: 1px solid var(--line); padding: 3px 8px; text-align: left;
       vertical-align: top; max-width: 520px; overflow-wrap: anywhere; }
table.emolens-table thead th { background: var(--code); }
.table-wrap { overflow-x: auto; margin-bottom: 18px; }
figure { margin: 18px 0 26px 0; padding: 8px; border: 1px solid var(--line); border-radius: 6px; }
figcaption, .caption { color: var(--muted); font-size: .92em; margin: 4px 0; }
.meta-grid { display: flex; flex-wrap: wrap; gap: 24px; }
.note { color: var(--muted); font-size: .88em; }
footer { color: var(--muted); font-size: .85em; padding-bottom: 40px; margin-top: 40px; border-top: 1px solid var(--line); }
pre { background: var(--code); padding: 8px; overflow-x: auto; }
"""

# Notebook fragments: rules scoped to the report's own classes so the notebook's styles stay intact.
_FRAGMENT_CSS = """
.emolens-report table.emolens-table { border-collapse: collapse; font-size: .9em; margin: 6px 0 4px 0; }
.emolens-report table.emolens-table th, .emolens-report table.emolens-table td { border: 1px solid #e3e6ec;
       padding: 3px 8px; text-align: left; vertical-align: top; }
.emolens-report figure.emolens-figure { margin: 12px 0 18px 0; padding: 6px; border: 1px solid #e3e6ec; }
.emolens-report figcaption, .emolens-report .caption, .emolens-report .note { color: #5b6475; font-size: .92em; }
.emolens-report .table-wrap { overflow-x: auto; margin-bottom: 12px; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _kv_table(d: dict, caption: str | None = None) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, (dict, list, tuple)):
            v = json.dumps(v, default=str)
        rows.append(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>")
    cap = f"<div class='caption'>{_esc(caption)}</div>" if caption else ""
    return f"<div class='table-wrap'>{cap}<table class='emolens-table'>{''.join(rows)}</table></div>"


def _df_html(df: Any, max_rows: int = MAX_TABLE_ROWS) -> str:
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(df)
    note = ""
    if len(df) > max_rows:
        note = f"<div class='note'>Showing the first {max_rows} of {len(df)} rows (all rows are in the CSV).</div>"
        df = df.head(max_rows)

    body = df.to_html(escape=True, index=not isinstance(df.index, pd.RangeIndex), border=0,
                      classes="emolens-table", float_format=lambda x: f"{x:.4g}", na_rep="") \
        if len(df.columns) else "<p class='note'>(empty table)</p>"
    return f"{body}{note}"


def _figure_snippet(fig: Any, div_id: str | None = None) -> str:
    """HTML for one figure, assuming the page carries plotly.js / the circuitsvis bundle."""
    from .viz.attention import AttentionView, strip_bundle

    if _is_plotly(fig):
        import plotly.io as pio

        return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                           config={"responsive": True, "displaylogo": False})
    if isinstance(fig, AttentionView):
        return fig.html(include_bundle=False)
    if hasattr(fig, "local_src"):  # a circuitsvis RenderedHTML: never its CDN form
        return strip_bundle(fig.local_src)
    if isinstance(fig, str):
        return fig
    raise InputError(f"A report figure must be a plotly Figure, an emolens AttentionView, a circuitsvis render or an "
                     f"HTML string; got {type(fig).__name__}.")


def _results_table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        top = ""
        try:
            if r.scores.numel():
                t = r.top(1)[0]
                top = ", ".join(f"{k}={v}" for k, v in t.items() if k != "score") + f" → {t['score']:.4g}"
        except Exception:  # noqa: BLE001 - a summary cell; the files hold everything
            top = ""
        rows.append(f"<tr><td>{_esc(name)}</td><td>{_esc(r.kind)}</td><td>{_esc('×'.join(map(str, r.shape)))}</td>"
                    f"<td>{_esc(', '.join(r.axes))}</td><td>{_esc(r.meta.get('method', ''))}</td>"
                    f"<td>{_esc(r.meta.get('metric', ''))}</td><td>{_esc(top)}</td></tr>")
    return ("<div class='table-wrap'><div class='caption'>Raw results saved with this report "
            "(safetensors + JSON under this section's <code>results/</code> folder)</div>"
            "<table class='emolens-table'><thead><tr><th>name</th><th>kind</th><th>shape</th><th>axes</th>"
            "<th>method</th><th>metric</th><th>largest |score|</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div>")


def section_html(section: Section, index: int = 1, *, fig_prefix: str = "fig") -> str:
    """HTML body of one section (no scripts for plotly.js or circuitsvis themselves)."""
    parts = [f"<section id='sec-{index}'><h2>{index}. {_esc(section.title)}</h2>"]
    for para in section.text:
        parts.append("<p>" + _esc(para).replace("\n", "<br>") + "</p>")
    for j, (caption, fig) in enumerate(section.figures, 1):
        fid = f"{fig_prefix}-{index}-{j}"
        kind = "plotly" if _is_plotly(fig) else "html"
        parts.append(f"<figure class='emolens-figure' data-kind='{kind}' id='{fid}-wrap'>"
                     f"{_figure_snippet(fig, fid)}<figcaption>{_esc(caption)}</figcaption></figure>")
    for caption, df in section.tables:
        parts.append(f"<div class='table-wrap'><div class='caption'>{_esc(caption)}</div>{_df_html(df)}</div>")
    if section.results:
        parts.append(_results_table(section.results))
    parts.append("</section>")
    return "\n".join(parts)


def _plotly_script() -> str:
    from plotly.offline import get_plotlyjs

    js = re.sub(r"</(script)", r"<\\/\1", get_plotlyjs(), flags=re.IGNORECASE)
    return f'<script data-emolens="plotly">{js}</script>'


def render_html(sections: Sequence[Section], *, title: str = "emolens report", meta: dict | None = None,
                model_info: dict | None = None, fragment: bool = False, include_plotlyjs: bool = True) -> str:
    """One self-contained HTML document for ``sections`` (no network needed to view it).

    Args:
        sections: the report's sections, in order.
        title: page heading.
        meta: run metadata (date, version, model, settings, ...), shown as a table.
        model_info: model dimensions (``EmoModel.info()``), shown as a table.
        fragment: return a ``<div>`` (for notebook outputs) instead of a whole document.
        include_plotlyjs: embed plotly.js (set False when the page already has it).
    """
    from .viz.attention import NEEDS_BUNDLE, bundle_script

    sections = _check_sections(sections)
    bodies = [section_html(s, i) for i, s in enumerate(sections, 1)]
    body = "\n".join(bodies)
    needs_plotly = any(_is_plotly(f) for s in sections for _, f in s.figures)
    needs_cv = NEEDS_BUNDLE in body
    head_scripts = (_plotly_script() if needs_plotly and include_plotlyjs else "") + \
        (bundle_script() if needs_cv else "")
    toc = "".join(f"<li><a href='#sec-{i}'>{_esc(s.title)}</a></li>" for i, s in enumerate(sections, 1))
    meta = dict(meta or {})
    settings = meta.pop("settings", None)
    info_tables = ""
    if meta:
        info_tables += _kv_table(meta, "Run")
    if settings:
        info_tables += _kv_table(settings if isinstance(settings, dict) else {"settings": settings}, "Settings")
    if model_info:
        info_tables += _kv_table(model_info, "Model")
    from . import __version__

    if fragment:
        return (f"<div class='emolens-report'>{head_scripts}<style>{_FRAGMENT_CSS}</style>{info_tables}{body}</div>")
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(title)}</title><style>{_CSS}</style>{head_scripts}</head>\n<body>"
            f"<header><h1>{_esc(title)}</h1><p class='subtitle'>emolens {_esc(__version__)}"
            f"{' · ' + _esc(meta['model']) if meta.get('model') else ''}"
            f"{' · ' + _esc(meta['date']) if meta.get('date') else ''}</p>"
            f"<div class='meta-grid'>{info_tables}</div>"
            f"<nav class='toc'><b>Contents</b><ol>{toc}</ol></nav></header>\n"
            f"<main>{body}</main>\n"
            "<footer>Generated by emolens. This file is self-contained: plotly.js"
            f"{' and circuitsvis' if needs_cv else ''} are embedded; it opens without network access.</footer>"
            "</body></html>\n")


def write_report(sections: Sequence[Section] | Section, run_dir: str | Path, *, title: str = "emolens report",
                 meta: dict | None = None, model_info: dict | None = None, save: bool = True) -> Path:
    """Save the sections' material into ``run_dir`` and write ``run_dir/report.html``.

    Args:
        sections: what to report.
        run_dir: a folder from :func:`new_run_dir` (created if missing).
        title, meta, model_info: see :func:`render_html`; ``meta`` and ``model_info`` also go to ``run.json``.
        save: also save results/tables/figures (needed by :func:`rerender`).

    Returns:
        Path of ``report.html``.
    """
    sections = _check_sections(sections)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    index = save_sections(sections, run_dir) if save else []
    info = {"title": title, "meta": meta or {}, "model_info": model_info or {}, "sections": index}
    try:  # keep what the run recorded at its start (identity, per-step state; see pipelines.engine.RunFolder)
        old = json.loads((run_dir / RUN_MARKER).read_text(encoding="utf-8"))
        info = {**(old if isinstance(old, dict) else {}), **info}
    except (OSError, ValueError):
        pass
    from .io import write_text

    write_text(run_dir / RUN_MARKER, json.dumps(info, indent=1, default=str))
    out = run_dir / REPORT_NAME
    out.write_text(render_html(sections, title=title, meta=meta, model_info=model_info), encoding="utf-8")
    return out


def rerender(run_dir: str | Path, *, out: str | Path | None = None) -> Path:
    """Re-render ``report.html`` from a run folder's saved sections (``emolens report RUN_DIR``)."""
    run_dir = Path(run_dir)
    sections = load_sections(run_dir)
    if not sections:
        raise InputError(f"{run_dir} holds no saved sections; nothing to render.")
    info = json.loads((run_dir / RUN_MARKER).read_text(encoding="utf-8"))
    meta = dict(info.get("meta") or {})
    meta["rendered"] = _dt.datetime.now().isoformat(timespec="seconds")
    path = Path(out) if out else run_dir / REPORT_NAME
    path.write_text(render_html(sections, title=info.get("title", "emolens report"), meta=meta,
                                model_info=info.get("model_info") or None), encoding="utf-8")
    return path


class ReportView:
    """Sections displayed in a notebook (``_repr_html_``) or saved as one offline HTML page."""

    def __init__(self, sections: Iterable[Section] | Section, title: str = "emolens report", meta: dict | None = None):
        self.sections = _check_sections(sections)
        self.title = title
        self.meta = meta

    def _repr_html_(self) -> str:
        from . import viz

        has_plotly = any(_is_plotly(f) for s in self.sections for _, f in s.figures)
        embed = viz.NOTEBOOK_PLOTLYJS == "always" or not viz._plotlyjs_sent
        out = render_html(self.sections, title=self.title, meta=self.meta, fragment=True, include_plotlyjs=embed)
        if has_plotly and embed:
            viz._plotlyjs_sent = True
        return out

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(render_html(self.sections, title=self.title, meta=self.meta), encoding="utf-8")
        return p


# --------------------------------------------------------------------------------------------
# built-in model overview (what `emolens run` reports besides the paper pipelines)
# --------------------------------------------------------------------------------------------
_CLEAN = "The news made me so happy that I"
_CORRUPT = "The news made me so angry that I"
_TARGET, _FOIL = " smiled", " yelled"


def model_info_section(model, settings: dict | None = None) -> Section:
    """A section with the model's dimensions and the site vocabulary."""
    import pandas as pd

    sec = Section("Model overview")
    sec.add_text(f"{model!r}",
                 "Sites: resid_pre/mid/post.L, attn_out.L, mlp_out.L, head.L.H (query heads), neuron.L.N "
                 f"(L < {model.n_layers}, H < {model.n_heads}, N < {model.d_mlp}).")
    sec.add_table("Model dimensions", pd.DataFrame({"property": list(model.info()),
                                                    "value": [str(v) for v in model.info().values()]}))
    if settings:
        sec.add_table("Run settings", pd.DataFrame({"setting": list(settings),
                                                    "value": [str(v) for v in settings.values()]}))
    return sec


def _answer_tokens(model, target: str, foil: str) -> tuple[int, int]:
    """Token ids compared by the logit-difference metric: the first tokens where ``target`` and
    ``foil`` differ (their first tokens for word-level tokenizers; byte tokenizers share a leading space)."""
    a = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    b = model.tokenizer(foil, add_special_tokens=False)["input_ids"]
    for x, y in zip(a, b):
        if x != y:
            return int(x), int(y)
    raise InputError(f"The answers {target!r} and {foil!r} do not differ in any token; pass two different answers.")


def _gradient_attribution(model, clean: str, corrupted: str, target: str, foil: str) -> dict:
    """First-order attribution patching on resid_pre × position, heads, neurons and sublayers.

    Estimates the change of ``m = logit(target) - logit(foil)`` (last position) when patching a
    clean activation into the corrupted run: ``(a_clean - a_corrupt) · ∂m/∂a`` at the corrupted run.
    """
    import torch

    from .capture import run_with_cache
    from .results import Result, inputs_hash
    from .sites import Site

    L = model.n_layers
    sites = ([Site("resid_pre", l) for l in range(L)] + [Site("head", l) for l in range(L)]
             + [Site("neuron", l) for l in range(L)] + [Site("attn_out", l) for l in range(L)]
             + [Site("mlp_out", l) for l in range(L)])
    bc, bx = model.encode([clean], chat=False), model.encode([corrupted], chat=False)
    if bc.input_ids.shape != bx.input_ids.shape:
        raise InputError("The clean and corrupted prompts must have the same number of tokens "
                         f"({bc.input_ids.shape[1]} vs {bx.input_ids.shape[1]}).")
    t, f = _answer_tokens(model, target, foil)
    with torch.no_grad():
        clean_logits, clean_cache = run_with_cache(model, bc, sites)
    logits, cache = run_with_cache(model, bx, sites, grad=True)
    metric = logits[0, -1, t] - logits[0, -1, f]
    names = [s.hook_name for s in sites]
    grads = torch.autograd.grad(metric, [cache[n] for n in names], allow_unused=True)
    g = {n: (torch.zeros_like(cache[n]) if gr is None else gr) for n, gr in zip(names, grads)}

    def score(n):
        return ((clean_cache[n] - cache[n].detach()) * g[n]).float()[0]  # [pos, ...]

    tokens = model.to_str_tokens(bx)
    meta = {**model.meta(), "inputs_hash": inputs_hash(clean, corrupted, target, foil),
            "metric": f"logit({target!r}) - logit({foil!r})", "method": "attribution patching (grad × diff)"}
    resid = torch.stack([score(f"blocks.{l}.hook_resid_pre").sum(-1) for l in range(L)])
    heads = torch.stack([score(f"blocks.{l}.attn.hook_z").sum(dim=(0, 2)) for l in range(L)])
    neurons = torch.stack([score(f"blocks.{l}.mlp.hook_post").sum(0) for l in range(L)])
    sub = torch.stack([torch.stack([score(f"blocks.{l}.hook_attn_out").sum(), score(f"blocks.{l}.hook_mlp_out").sum()])
                       for l in range(L)])
    m_clean = float(clean_logits[0, -1, t] - clean_logits[0, -1, f])
    return {
        "resid": Result("resid_pos", resid, ("layer", "position"), {"position": tokens}, meta=dict(meta)),
        "heads": Result("heads", heads, ("layer", "head"), meta=dict(meta)),
        "neurons": Result("neurons", neurons, ("layer", "neuron"), meta=dict(meta)),
        "sublayers": Result("sublayers", sub, ("layer", "sublayer"), {"sublayer": ["attn", "mlp"]}, meta=dict(meta)),
        "metric_clean": m_clean, "metric_corrupted": float(metric.detach()),
    }


def overview_sections(model, *, quick: bool = False, progress: bool = True, settings: dict | None = None
                      ) -> list[Section]:
    """Built-in report: model info, a gradient-attribution demo, emotion directions and steering.

    Uses only the foundation API (capture, run_with_cache, interventions), so it works on any
    model emolens loads; the paper pipelines add their own sections.
    """
    import pandas as pd
    import torch

    from . import viz
    from .capture import capture
    from .interventions import Add
    from .progress import progress_bar
    from .results import Result, inputs_hash
    from .sites import Pos, Site

    steps = progress_bar(range(4), desc="overview", disable=not progress)
    it = iter(steps)
    sections = [model_info_section(model, settings)]

    # 1. attribution demo
    next(it, None)
    att = Section("Attribution patching demo")
    try:
        a = _gradient_attribution(model, _CLEAN, _CORRUPT, _TARGET, _FOIL)
    except InputError as e:
        att.add_text(f"Skipped: {e}")
    else:
        att.add_text(f"Clean prompt: {_CLEAN!r}; corrupted prompt: {_CORRUPT!r}. Metric: logit({_TARGET!r}) − "
                     f"logit({_FOIL!r}) at the last position ({a['metric_clean']:.3f} clean, "
                     f"{a['metric_corrupted']:.3f} corrupted).",
                     "Each cell estimates how much the metric moves toward the clean run when that component's "
                     "clean activation is patched into the corrupted run (first-order attribution patching).")
        att.add_figure("Residual stream (resid_pre) by layer and position", viz.resid_heatmap(a["resid"]))
        att.add_figure("Attention heads (summed over positions)", viz.heads_heatmap(a["heads"]))
        att.add_figure("MLP neurons (summed over positions)", viz.neurons_heatmap(a["neurons"], top_k=min(16, model.d_mlp)))
        att.add_figure("Attention vs MLP output per layer", viz.sublayer_influence(a["sublayers"]))
        k_h, k_n = min(8, a["heads"].scores.numel()), min(32, a["neurons"].scores.numel())
        counts = torch.zeros(model.n_layers, 2)
        for c in a["heads"].top(k_h):
            counts[c["layer"], 0] += 1
        for c in a["neurons"].top(k_n):
            counts[c["layer"], 1] += 1
        alloc = Result("sublayers", counts, ("layer", "sublayer"), {"sublayer": [f"top-{k_h} heads", f"top-{k_n} neurons"]},
                       meta={**a["heads"].meta, "metric": "count"})
        att.add_figure("Where the strongest components sit", viz.circuit_allocation(alloc))
        att.add_table("Top heads", pd.DataFrame(a["heads"].top(min(10, k_h))))
        att.results.update({k: a[k] for k in ("resid", "heads", "neurons", "sublayers")})
        att.results["allocation"] = alloc
        try:
            top = [(c["layer"], c["head"]) for c in a["heads"].top(min(3, k_h))]
            att.add_figure("Attention patterns of the top heads (circuitsvis)",
                           viz.head_patterns(model, _CORRUPT, top, chat=False))
        except Exception as e:  # noqa: BLE001 - optional widget
            att.add_text(f"(attention patterns unavailable: {e})")
    sections.append(att)

    # 2. emotion directions
    next(it, None)
    dirs = Section("Emotion directions (mean differences)")
    from .datasets import load_contrastive_pairs

    ds = load_contrastive_pairs(split="train")
    emotions = list(dict.fromkeys(ds["emotion"]))[: (4 if quick else 8)]
    n_per = 4 if quick else 16
    pos_txt, neg_txt, groups = [], [], []
    for e in emotions:
        rows = [r for r in ds if r["emotion"] == e][:n_per]
        pos_txt += [r["positive"] for r in rows]
        neg_txt += [r["negative"] for r in rows]
        groups += [e] * len(rows)
    layers = list(range(model.n_layers))
    sites = [Site("resid_post", l) for l in layers]
    cp = capture(model, pos_txt, sites, reduce="none", chat=False, progress=progress, desc="directions (+)")
    cn = capture(model, neg_txt, sites, reduce="none", chat=False, progress=progress, desc="directions (−)")
    diff = torch.stack([cp[s] - cn[s] for s in sites], 1)  # [n, layer, d_model]
    g = torch.tensor([emotions.index(e) for e in groups])
    vec = torch.stack([diff[g == i].mean(0) for i in range(len(emotions))])  # [emotion, layer, d_model]
    hsh = inputs_hash(pos_txt, neg_txt)
    meta = {**model.meta(), "inputs_hash": hsh, "method": "mean difference (last token, resid_post)"}
    norms = Result("layers", vec.norm(dim=-1), ("emotion", "layer"), {"emotion": emotions},
                   meta={**meta, "metric": "‖v‖"})
    mid = max(0, round(model.n_layers * 0.3) - 1)
    unit = torch.nn.functional.normalize(vec[:, mid], dim=-1)
    cos = Result("matrix", unit @ unit.T, ("row", "col"), {"row": emotions, "col": emotions},
                 meta={**meta, "metric": "cosine", "layer": mid})
    dirs.add_text(f"{len(emotions)} emotions × {n_per} contrastive pairs (positive minus neutral/opposite sentence), "
                  f"read at the last token of every layer's resid_post.")
    dirs.add_figure("Norm of each emotion's mean-difference vector per layer", viz.layer_lines(norms))
    dirs.add_figure(f"Cosine similarity between emotion vectors at layer {mid}", viz.cosine_heatmap(cos))
    dirs.add_figure(f"Per-pair differences at layer {mid}, projected on two principal components",
                    viz.pca_scatter(diff[:, mid], groups))
    dirs.results.update({"vector_norms": norms, "cosines": cos})
    sections.append(dirs)

    # 3. steering demo + strength curve
    next(it, None)
    steer = Section("Steering demo")
    e0 = "joy" if "joy" in emotions else emotions[0]
    layer = max(0, round(model.n_layers * 0.27) - 1)
    v = vec[emotions.index(e0), layer]
    site = Site("resid_post", layer)
    from .datasets import load_openers

    openers = list(load_openers()["text"])[: (2 if quick else 4)]
    strengths = [0.0, 1.0, 2.0, 4.0] if not quick else [0.0, 2.0, 4.0]
    cont = " I feel so happy and grateful."
    rows_lp = []
    for s in progress_bar(strengths, desc="strength sweep", disable=not progress):
        ivs = [Add(site, v, strength=s, pos=Pos.all())] if s else None
        lp, n = model.continuation_logprobs(openers, [cont] * len(openers), interventions=ivs)
        rows_lp.append((lp / n).float())
    lp = torch.stack(rows_lp)  # [strength, opener]
    mean = lp.mean(1)
    se = lp.std(1, unbiased=True) / max(1, lp.shape[1]) ** 0.5 if lp.shape[1] > 1 else torch.zeros_like(mean)
    curve = Result("curve", mean, ("x",), {"x": strengths}, {"ci_low": mean - 1.96 * se, "ci_high": mean + 1.96 * se},
                   meta={**model.meta(), "inputs_hash": inputs_hash(openers, cont), "method": f"Add {e0} vector at {site}",
                         "metric": "mean log p per token"})
    steer.add_text(f"Adds strength × the {e0} mean-difference vector (layer {layer}, every position) and measures the "
                   f"per-token log-probability of {cont!r} after {len(openers)} conversation openers (band: 95% normal CI "
                   "over openers). Strengths are raw multiples of the vector; calibrate per model.")
    steer.add_figure("Continuation log-probability vs steering strength",
                     viz.curves({f"+{e0}": curve}, x_title="strength", y_title="mean log p per token"))
    n_new = 12 if quick else 30
    gen_strength = 2.0
    base = model.generate(openers, max_new_tokens=n_new)
    steered = model.generate(openers, max_new_tokens=n_new, interventions=[Add(site, v, strength=gen_strength, pos=Pos.all())])
    steer.add_table(f"Greedy replies, unsteered vs +{gen_strength:g} × {e0} at {site}",
                    pd.DataFrame({"opener": openers, "unsteered": base, "steered": steered}))
    steer.results["strength_curve"] = curve
    sections.append(steer)
    next(it, None)
    return sections
