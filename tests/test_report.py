"""Run folders, the self-contained report, the CLI, and the report in a real (offline) browser."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from emolens import report, viz
from emolens.cli import main
from emolens.errors import InputError
from emolens.results import Result
from emolens.sections import Section

sys.path.insert(0, str(Path(__file__).parent))
import browser_check  # noqa: E402

PLOTLY_MARK = 'data-emolens="plotly"'
CV_MARK = 'data-emolens="circuitsvis-bundle"'


def _sections(with_attention: int = 0) -> list[Section]:
    heads = Result("heads", torch.tensor([[0.5, -1.0], [2.0, 0.1]]), ("layer", "head"),
                   meta={"method": "atp", "metric": "logit_diff", "model": "hand"})
    curve = Result("curve", torch.tensor([0.0, 0.5, 1.0]), ("x",), {"x": [0, 1, 2]},
                   {"ci_low": torch.tensor([-0.1, 0.4, 0.8]), "ci_high": torch.tensor([0.1, 0.6, 1.2])})
    a = Section("Heads <&> curves", text=["A <script>alert('x')</script> paragraph.", "Second & last."])
    a.add_figure("head scores", viz.plot(heads)).add_figure("curve", viz.curves({"abl": curve}))
    a.add_table("top heads", pd.DataFrame(heads.top(3)))
    a.results.update({"heads": heads, "curve/with odd name": curve})
    b = Section("Second")
    for i in range(with_attention):
        b.add_figure(f"attention {i}", viz.AttentionView(torch.softmax(torch.randn(2, 4, 4), -1).tril(),
                                                         ["a", "b", "<c>", "d"], ["h0", "h1"]))
    b.add_table("plain", pd.DataFrame({"x": [1.23456789, 2.0], "y": ["<i>", "z"]}))
    return [a, b]


# ---------------------------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------------------------
def test_new_run_dir_never_overwrites(tmp_path):
    a, b = report.new_run_dir(tmp_path), report.new_run_dir(tmp_path)
    assert a != b and a.is_dir() and b.is_dir()  # same-second runs get distinct folders
    named = report.new_run_dir(tmp_path, "exp1")
    (named / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        report.new_run_dir(tmp_path, "exp1")
    assert (named / "keep.txt").exists()
    # overwrite=True refuses a folder that is not an emolens run ...
    with pytest.raises(InputError, match="not an emolens run folder"):
        report.new_run_dir(tmp_path, "exp1", overwrite=True)
    # ... and replaces one that is
    (named / report.RUN_MARKER).write_text("{}")
    again = report.new_run_dir(tmp_path, "exp1", overwrite=True)
    assert again == named and not any(again.iterdir())
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(InputError):
            report.new_run_dir(tmp_path, bad)


# ---------------------------------------------------------------------------------------------
# report HTML
# ---------------------------------------------------------------------------------------------
def test_report_is_self_contained_and_escaped(tmp_path):
    secs = _sections(with_attention=2)
    meta = report.run_metadata(None, {"quick": True}, source="hand-built")
    path = report.write_report(secs, tmp_path / "r", title="T <x>", meta=meta, model_info={"n_layers": 2})
    h = path.read_text()
    assert h.count(PLOTLY_MARK) == 1 and h.count(CV_MARK) == 1  # each library inlined exactly once
    assert h.count("Plotly.newPlot") == 2 and h.count("CircuitsVis.AttentionHeads") == 2
    assert re.search(r"<script[^>]*\ssrc=", h) is None and "unpkg.com" not in h  # nothing to fetch
    assert re.search(r"<link[^>]*href=\"?https?:", h) is None
    assert "<script>alert('x')</script>" not in h and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in h
    assert "Heads &lt;&amp;&gt; curves" in h and "<title>T &lt;x&gt;</title>" in h
    assert "href='#sec-1'" in h and "id='sec-2'" in h  # table of contents
    for key in ("date", "emolens", "torch", "source", "hand-built", "quick", "n_layers"):
        assert key in h
    assert "&lt;i&gt;" in h and "1.235" in h  # table cells escaped and formatted
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert [s["title"] for s in info["sections"]] == ["Heads <&> curves", "Second"]


def test_report_without_widgets_has_no_circuitsvis(tmp_path):
    h = report.write_report(_sections(0), tmp_path / "r").read_text()
    assert h.count(PLOTLY_MARK) == 1 and CV_MARK not in h
    only_tables = Section("t").add_table("x", pd.DataFrame({"a": [1]}))
    assert PLOTLY_MARK not in report.render_html([only_tables])


def test_saved_sections_roundtrip_and_rerender(tmp_path):
    run = tmp_path / "r"
    secs = _sections(1)
    report.write_report(secs, run, meta={"model": "hand"})
    loaded = report.load_sections(run)
    assert [s.title for s in loaded] == [s.title for s in secs]
    assert set(loaded[0].results) == {"heads", "curve/with odd name"}
    torch.testing.assert_close(loaded[0].results["heads"].scores, secs[0].results["heads"].scores)
    torch.testing.assert_close(loaded[0].results["curve/with odd name"].extra["ci_high"],
                               secs[0].results["curve/with odd name"].extra["ci_high"])
    assert loaded[0].figures[0][1].data[0].type == "heatmap"  # plotly JSON back to a Figure
    assert isinstance(loaded[1].figures[0][1], str)  # widget saved as HTML
    pd.testing.assert_frame_equal(loaded[0].tables[0][1], secs[0].tables[0][1], check_dtype=False)
    (run / "report.html").unlink()
    out = report.rerender(run)
    h = out.read_text()
    assert h.count(PLOTLY_MARK) == 1 and h.count(CV_MARK) == 1 and "rendered" in h


def test_report_bad_input(tmp_path):
    with pytest.raises(InputError, match="empty"):
        report.write_report([], tmp_path / "r")
    with pytest.raises(InputError, match="plotly Figure"):
        report.render_html([Section("x", figures=[("bad", 42)])])
    with pytest.raises(InputError, match="Section"):
        report.render_html(["not a section"])
    with pytest.raises(InputError, match="not an emolens run"):
        report.load_sections(tmp_path)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("run", "steer", "attribute", "circuit", "report", "info", "demo"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--out", "--name", "--overwrite", "--quick", "--only"):
        assert opt in out


def test_cli_missing_pipeline_is_a_clear_error(monkeypatch, capsys):
    import emolens.cli as cli

    monkeypatch.setattr(cli, "_pipeline", lambda name: None)
    assert main(["steer"]) == 2
    assert "emolens.pipelines.paper1.steer_cli" in capsys.readouterr().err
    assert main(["circuit"]) == 2
    assert "emolens.pipelines.paper2.circuit_cli" in capsys.readouterr().err


def test_cli_report_on_non_run_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not an emolens run folder" in capsys.readouterr().err


def test_cli_run_calls_pipelines_and_keeps_partial_reports(monkeypatch, tmp_path):
    """The `emolens run` contract: pipelines get (model, run_dir, quick=, progress=) and return sections; a
    failing pipeline still leaves a report of what finished, then the error propagates."""
    import types

    import emolens.cli as cli

    calls = []

    def ok_run(model, out_dir, *, quick=False, progress=True):
        calls.append((model.name, Path(out_dir), quick, progress))
        return [Section("Paper 1 step", text=["done"]).add_figure(
            "f", viz.plot(Result("layers", torch.ones(3), ("layer",))))]

    def bad_run(model, out_dir, *, quick=False, progress=True):
        raise RuntimeError("pipeline exploded")

    mods = {"paper1": types.SimpleNamespace(run=ok_run), "paper2": types.SimpleNamespace(run=bad_run)}
    monkeypatch.setattr(cli, "_pipeline", mods.get)
    args = ["run", "--model", "tiny-llama", "--device", "cpu", "--quick", "--out", str(tmp_path), "--no-progress"]
    with pytest.raises(RuntimeError, match="exploded"):
        main(args + ["--name", "both"])
    assert calls == [("tiny-llama", tmp_path / "both", True, False)]
    state = json.loads((tmp_path / "both" / "run.json").read_text())
    assert [s["title"] for s in state["sections"]] == ["Model overview", "Paper 1 step", "paper2 failed"]
    assert state["status"] == "failed" and state["error"] == "RuntimeError: pipeline exploded"
    assert "pipeline exploded" in (tmp_path / "both" / "report.html").read_text()
    assert main(args + ["--name", "p1", "--only", "paper1"]) == 0
    state = json.loads((tmp_path / "p1" / "run.json").read_text())
    assert [s["title"] for s in state["sections"]] == ["Model overview", "Paper 1 step"]
    assert state["status"] == "done" and "error" not in state


@pytest.fixture(scope="module")
def overview_run(tmp_path_factory):
    """`emolens run --only overview` on tiny-llama: the built-in report end to end."""
    root = tmp_path_factory.mktemp("runs")
    code = main(["run", "--model", "tiny-llama", "--device", "cpu", "--quick", "--only", "overview", "--out",
                 str(root), "--name", "tiny", "--no-progress"])
    assert code == 0
    return root / "tiny"


def test_cli_run_writes_report_and_refuses_reuse(overview_run, capsys):
    assert (overview_run / "report.html").exists() and (overview_run / "run.json").exists()
    h = (overview_run / "report.html").read_text()
    assert h.count(PLOTLY_MARK) == 1 and h.count(CV_MARK) == 1
    titles = [s["title"] for s in json.loads((overview_run / "run.json").read_text())["sections"]]
    assert titles[0] == "Model overview" and len(titles) >= 3
    results = list(overview_run.glob("sections/*/results/*.safetensors"))
    assert len(results) >= 5
    root = str(overview_run.parent)
    before = (overview_run / "report.html").stat().st_mtime_ns
    assert main(["run", "--model", "tiny-llama", "--only", "overview", "--out", root, "--name", "tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (overview_run / "report.html").stat().st_mtime_ns == before  # untouched
    assert main(["report", str(overview_run)]) == 0
    assert str((overview_run / "report.html").resolve()) in capsys.readouterr().out


def test_cli_attribute_on_tiny(tmp_path, capsys):
    code = main(["attribute", "--model", "tiny-llama", "--device", "cpu", "--clean", "I am happy", "--corrupted",
                 "I am angry", "--target", " smile", "--foil", " shout", "--out", str(tmp_path), "--name", "a"])
    assert code == 0
    out = capsys.readouterr().out
    assert "report:" in out and (tmp_path / "a" / "report.html").exists()
    assert list((tmp_path / "a").glob("sections/*/results/*.safetensors"))
    # a taken run name: a clear error, the old run untouched
    code = main(["attribute", "--model", "tiny-llama", "--clean", "x", "--corrupted", "y", "--target", "a",
                 "--foil", "b", "--out", str(tmp_path), "--name", "a"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    # a model that does not exist: clear error, and no empty run folder left behind
    code = main(["attribute", "--model", "no-such-model", "--clean", "x", "--corrupted", "y", "--target", "a",
                 "--foil", "b", "--out", str(tmp_path), "--name", "bad"])
    assert code == 2 and "no-such-model" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_builtin_attribution_is_the_directional_derivative_of_patching(tiny_llama):
    """Attribution patching = (a_clean - a_corrupt) · grad. Check it against an independent finite difference
    of real patching runs: patch a_corrupt + eps * (a_clean - a_corrupt) with Replace, central difference."""
    from emolens.capture import run_with_cache
    from emolens.interventions import Replace
    from emolens.sites import Site

    m = tiny_llama
    clean, corrupted = "I am happy", "I am hzppy"
    a = report._gradient_attribution(m, clean, corrupted, " a", " b")
    t, f = report._answer_tokens(m, " a", " b")
    assert t != f
    assert a["resid"].labels["position"] == m.to_str_tokens(m.encode([corrupted], chat=False))
    bc, bx = m.encode([clean], chat=False), m.encode([corrupted], chat=False)
    checks = [(Site("resid_pre", 2), float(a["resid"].scores[2].sum())),
              (Site("attn_out", 1), float(a["sublayers"].scores[1, 0])),
              (Site("mlp_out", 3), float(a["sublayers"].scores[3, 1])),
              (Site("head", 2, 1), float(a["heads"].scores[2, 1])),
              (Site("neuron", 0, 5), float(a["neurons"].scores[0, 5]))]
    for site, est in checks:
        full = Site(site.kind, site.layer)
        _, cc = run_with_cache(m, bc, [full])
        _, cx = run_with_cache(m, bx, [full])
        d = cc[full.hook_name] - cx[full.hook_name]

        def metric(eps):
            logits = m.forward(bx, interventions=[Replace(site, cx[full.hook_name] + eps * d)])
            return float(logits[0, -1, t] - logits[0, -1, f])

        fd = (metric(1e-2) - metric(-1e-2)) / 2e-2
        assert est == pytest.approx(fd, rel=2e-3, abs=1e-4), site


# ---------------------------------------------------------------------------------------------
# the report in headless Chromium, offline
# ---------------------------------------------------------------------------------------------
def _need_browser():
    if browser_check.find_chromium():
        try:
            import PIL  # noqa: F401
        except ImportError:
            if os.environ.get("CI") == "true":
                pytest.fail("Pillow is missing (dev extra); the browser test must run under CI=true.")
            pytest.skip("Pillow not installed (pip install -e '.[dev]')")
        return
    if os.environ.get("CI") == "true":
        pytest.fail("Chromium is not installed but CI=true: the browser test must run. "
                    "Run `python tools/ensure_chromium.py` (as root) or install chromium + chromium-driver.")
    pytest.skip("Chromium not installed (python tools/ensure_chromium.py installs it)")


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    with browser_check.Browser() as b:
        yield b


def _fresh(browser):
    """New tab per page (events of the last page must not leak into the next check)."""
    while not browser.events.empty():
        browser.events.get_nowait()
    return browser


@pytest.mark.browser
def test_report_renders_offline_in_chromium(overview_run, browser, tmp_path):
    res = browser_check.check_page(overview_run / "report.html", browser=_fresh(browser),
                                   screenshot_path=tmp_path / "report.png")
    assert not res.console_errors, res.summary()
    assert not res.external_requests, res.summary()
    kinds = [f["kind"] for f in res.figures]
    assert kinds.count("plotly") >= 8 and kinds.count("circuitsvis") == 1, res.summary()
    assert all(f["ok"] for f in res.figures), res.summary()
    assert not res.page_blank and res.ok


@pytest.mark.browser
def test_hand_built_report_renders_offline(tmp_path, browser):
    path = report.write_report(_sections(with_attention=2), tmp_path / "r")
    res = browser_check.check_page(path, browser=_fresh(browser))
    assert res.ok, res.summary()
    assert [f["kind"] for f in res.figures] == ["plotly", "plotly", "circuitsvis", "circuitsvis"]


@pytest.mark.browser
def test_browser_check_catches_cdn_widgets_errors_and_blank_figures(tmp_path, browser):
    """The checker must be able to fail: a CDN circuitsvis page (blank offline), a JS error, a plotly div
    whose script never runs."""
    import circuitsvis as cv

    cdn = str(cv.attention.attention_heads(torch.softmax(torch.randn(2, 3, 3), -1), ["a", "b", "c"]))
    page = tmp_path / "cdn.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body>"
                    f"<figure class='emolens-figure'>{cdn}</figure></body></html>")
    res = browser_check.check_page(page, browser=_fresh(browser), wait_s=8)
    assert not res.ok
    assert res.external_requests or res.console_errors or not res.figures[0]["ok"], res.summary()
    assert not res.figures[0]["rendered"]  # the widget never drew

    page = tmp_path / "err.html"
    sec = Section("x").add_figure("ok", viz.plot(Result("layers", torch.arange(3.0), ("layer",))))
    page.write_text(report.render_html([sec]).replace("</body>", "<script>undefinedFunction()</script></body>"))
    res = browser_check.check_page(page, browser=_fresh(browser), wait_s=8)
    assert any("undefinedFunction" in e for e in res.console_errors), res.summary()
    assert res.figures[0]["ok"] and not res.ok

    page = tmp_path / "blank.html"
    page.write_text("<!doctype html><html><body><h1>t</h1><figure class='emolens-figure'>"
                    "<div class='plotly-graph-div' style='height:300px'></div></figure></body></html>")
    res = browser_check.check_page(page, browser=_fresh(browser), wait_s=4)
    assert res.figures and not res.figures[0]["rendered"] and not res.figures[0]["ok"]
