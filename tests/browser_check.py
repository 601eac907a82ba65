"""Open an HTML file in headless Chromium and check that it renders offline.

A small Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (file descriptors 3/4,
NUL-separated JSON): no websocket or selenium dependency. Used by ``tests/test_report.py`` and
runnable by hand::

    python tests/browser_check.py runs/<run>/report.html --screenshot /tmp/report.png

It reports console errors and uncaught exceptions, every request that left the machine (the
page must not try), and for each ``figure.emolens-figure`` whether it rendered: plotly figures
must have a drawn ``.main-svg`` and circuitsvis widgets DOM children, and a screenshot of the
figure's box must not be blank (enough pixels differ from the dominant colour).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# Chromium with background networking off and every network route broken: the page must render
# from the file alone.
OFFLINE_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
    "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
    "--disable-dev-shm-usage", "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def find_chromium() -> str | None:
    env = os.environ.get("EMOLENS_CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in CHROMIUM_NAMES:
        p = shutil.which(name)
        if p:
            return p
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium driven over the DevTools pipe."""

    def __init__(self, binary: str | None = None, extra_flags: tuple[str, ...] = (), timeout: float = 60.0):
        self.binary = binary or find_chromium()
        if not self.binary:
            raise CDPError("Chromium not found; install the Debian packages chromium and chromium-driver "
                           "(python tools/ensure_chromium.py) or set EMOLENS_CHROMIUM.")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="emolens-chromium-")
        to_child_r, self._to_child_w = os.pipe()
        self._from_child_r, from_child_w = os.pipe()

        def wire():  # in the child: the pipe ends become fds 3 (commands in) and 4 (replies out)
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        cmd = [self.binary, *OFFLINE_FLAGS, *extra_flags, "--remote-debugging-pipe",
               f"--user-data-dir={self.profile}", "about:blank"]
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     preexec_fn=wire, pass_fds=(3, 4))
        os.close(to_child_r)
        os.close(from_child_w)
        self._id = 0
        self._replies: dict[int, queue.Queue] = {}
        self.events: "queue.Queue[dict]" = queue.Queue()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self.session: str | None = None

    # -- transport ---------------------------------------------------------------------------
    def _read_loop(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child_r, 1 << 20)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        q = self._replies.get(msg["id"])
                    if q is not None:
                        q.put(msg)
                else:
                    self.events.put(msg)

    def send(self, method: str, params: dict | None = None, *, session: str | None | bool = True,
             timeout: float | None = None) -> dict:
        with self._lock:
            self._id += 1
            mid = self._id
            q: queue.Queue = queue.Queue()
            self._replies[mid] = q
        msg: dict = {"id": mid, "method": method, "params": params or {}}
        sid = self.session if session is True else (session or None)
        if sid:
            msg["sessionId"] = sid
        os.write(self._to_child_w, json.dumps(msg).encode() + b"\0")
        try:
            reply = q.get(timeout=timeout or self.timeout)
        except queue.Empty:
            raise CDPError(f"No reply to {method} within {timeout or self.timeout} s; chromium stderr:\n"
                           + self.stderr_text()[-3000:]) from None
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def stderr_text(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read().decode(errors="replace")
        except Exception:  # noqa: BLE001
            return ""

    # -- page ----------------------------------------------------------------------------------
    def open_page(self, width: int = 1280, height: int = 900) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for m in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
            self.send(m)
        # Page-level offline mode on top of the broken proxy/DNS flags.
        self.send("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                       "uploadThroughput": -1})
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})

    def evaluate(self, expression: str, timeout: float | None = None):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      timeout=timeout)
        if "exceptionDetails" in r:
            raise CDPError(f"evaluate failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, clip: dict | None = None, beyond_viewport: bool = True) -> bytes:
        import base64

        params: dict = {"format": "png", "captureBeyondViewport": beyond_viewport}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:  # noqa: BLE001 - fall through to terminate
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for fd in (self._to_child_w, self._from_child_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class PageCheck:
    url: str
    console_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)
    screenshot: bytes = b""
    page_blank: bool = True

    @property
    def ok(self) -> bool:
        return (not self.console_errors and not self.external_requests and not self.page_blank
                and bool(self.figures) and all(f["ok"] for f in self.figures))

    def summary(self) -> str:
        bad = [f for f in self.figures if not f["ok"]]
        return json.dumps({"url": self.url, "console_errors": self.console_errors[:10],
                           "external_requests": self.external_requests[:10], "page_blank": self.page_blank,
                           "n_figures": len(self.figures), "bad_figures": bad[:10]}, indent=1)


def png_stats(png: bytes) -> dict:
    """Pixel statistics of a PNG: size, share of pixels away from the dominant colour, distinct colours."""
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = im.size
    colors = im.getcolors(maxcolors=w * h) or []
    total = max(1, w * h)
    dominant = max(c for c, _ in colors) if colors else total
    return {"width": w, "height": h, "non_dominant": 1.0 - dominant / total, "n_colors": len(colors)}


def is_blank(stats: dict, min_share: float = 0.01, min_colors: int = 8) -> bool:
    return stats["non_dominant"] < min_share or stats["n_colors"] < min_colors


FIGURE_SELECTOR = "figure.emolens-figure"

_FIGURE_STATE_JS = r"""
(() => {
  const out = [];
  document.querySelectorAll(%s).forEach((f, i) => {
    const r = f.getBoundingClientRect();
    const plotly = f.querySelector('.plotly-graph-div');
    const cv = f.querySelector('.emolens-circuitsvis, [id^="circuits-vis-"]');
    let rendered = false, kind = 'html';
    if (plotly) { kind = 'plotly'; rendered = !!plotly.querySelector('.main-svg') && !!plotly._fullLayout; }
    else if (cv) { kind = 'circuitsvis'; rendered = cv.childElementCount > 0 && cv.getBoundingClientRect().height > 20; }
    else { rendered = f.getBoundingClientRect().height > 20; }
    out.push({index: i, id: f.id, kind: kind, rendered: rendered,
              x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height});
  });
  return out;
})()
"""


_SCROLL_TO_JS = r"""
(() => {
  const f = document.querySelectorAll(%s)[%d];
  f.scrollIntoView({block: 'start'});
  const r = f.getBoundingClientRect();
  const h = Math.min(r.height, window.innerHeight - Math.max(0, r.top));
  return {x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: h};
})()
"""


def check_page(path: str | Path, *, wait_s: float = 30.0, browser: Browser | None = None,
               screenshot_path: str | Path | None = None, selector: str = FIGURE_SELECTOR) -> PageCheck:
    """Load ``path`` offline and collect console errors, external requests and figure states.

    ``selector`` picks the figure containers (report: ``figure.emolens-figure``; docs pages:
    ``div.emolens-output``).
    """
    sel = json.dumps(selector)
    state_js = _FIGURE_STATE_JS % sel
    url = Path(path).resolve().as_uri()
    own = browser is None
    b = browser or Browser()
    try:
        b.open_page()
        res = PageCheck(url)
        b.send("Page.navigate", {"url": url})
        deadline = time.time() + wait_s
        loaded = False
        figs: list[dict] = []
        while time.time() < deadline:
            try:
                ev = b.events.get(timeout=0.25)
            except queue.Empty:
                ev = None
            if ev is not None:
                _collect(ev, res)
                if ev.get("method") == "Page.loadEventFired":
                    loaded = True
            if loaded and ev is None:
                figs = b.evaluate(state_js) or []
                if figs and all(f["rendered"] for f in figs):
                    break
        if not loaded:
            res.console_errors.append(f"page did not finish loading within {wait_s} s")
        time.sleep(0.5)  # let late errors (e.g. failed module imports) arrive
        while True:
            try:
                _collect(b.events.get_nowait(), res)
            except queue.Empty:
                break
        figs = b.evaluate(state_js) or []
        for f in figs:
            # Scroll the figure into view and measure again: layouts can shift while scrolling.
            box = b.evaluate(_SCROLL_TO_JS % (sel, int(f["index"])))
            time.sleep(0.05)
            stats = None
            if box and box["width"] >= 4 and box["height"] >= 4:
                png = b.screenshot({"x": box["x"], "y": box["y"], "width": box["width"], "height": box["height"]},
                                   beyond_viewport=False)
                stats = png_stats(png)
            f["pixels"] = stats
            f["ok"] = bool(f["rendered"]) and stats is not None and not is_blank(stats)
        res.figures = figs
        res.screenshot = b.screenshot()
        res.page_blank = is_blank(png_stats(res.screenshot), min_share=0.005, min_colors=4)
        if screenshot_path:
            Path(screenshot_path).write_bytes(res.screenshot)
        return res
    finally:
        if own:
            b.close()


def _collect(ev: dict, res: PageCheck) -> None:
    m, p = ev.get("method"), ev.get("params", {})
    if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        res.console_errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                          for a in p.get("args", [])))
    elif m == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        res.console_errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
    elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
        e = p["entry"]
        res.console_errors.append(f"log[{e.get('source')}]: {e.get('text')} {e.get('url', '')}".strip())
    elif m == "Network.requestWillBeSent":
        u = p.get("request", {}).get("url", "")
        if not u.startswith(("file:", "data:", "blob:", "about:")):
            res.external_requests.append(u)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("html")
    ap.add_argument("--screenshot", default=None)
    ap.add_argument("--selector", default=FIGURE_SELECTOR, help="CSS selector of the figure containers")
    a = ap.parse_args(argv)
    res = check_page(a.html, screenshot_path=a.screenshot, selector=a.selector)
    print(res.summary())
    print("OK" if res.ok else "FAILED")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
