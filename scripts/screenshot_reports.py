#!/usr/bin/env python3
"""Screenshots of a subject report with headless Chromium, and the browser check of a report.

Usage::

    python scripts/screenshot_reports.py OUTPUT_DIR [--subject LABEL] [--docs docs]

writes ``docs/report_session.png`` (top of the first session of ``OUTPUT_DIR/sub-LABEL.html``)
and ``docs/report_trajectories.png`` (top of its trajectory page).  The default subject is the
first patient of ``OUTPUT_DIR/participants.tsv`` with a report and trajectories (else the first
``sub-*.html``).

Chromium (Debian package ``chromium``; ``$CHROMIUM`` names another binary) is driven over
``--remote-debugging-pipe`` with the standard library only: the DevTools protocol messages are
NUL-terminated JSON on file descriptors 3 (commands) and 4 (replies and events).
:func:`check_page` is what ``tests/test_report_browser.py`` uses to check that every figure
of a report loads without console errors.
"""

from __future__ import annotations

import argparse
import base64
import csv
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
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Chromium flags for a container: root without a sandbox, no GPU, small /dev/shm.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--disable-background-networking", "--disable-component-update", "--mute-audio",
         "--hide-scrollbars", "--remote-debugging-pipe")
MAX_PNG_BYTES = 400_000

#: Runs before the page's own content: records load errors of any element (an <image> in an
#: SVG or an <img> whose data cannot be decoded fires "error" without reaching the console).
_RECORD_ERRORS = """
window.__loadErrors = [];
window.addEventListener('error', (event) => {
  const t = event.target;
  if (t && t !== window) {
    const href = t.getAttribute && (t.getAttribute('href') || t.getAttribute('xlink:href')
                                    || t.getAttribute('src') || '');
    window.__loadErrors.push(`${t.tagName}: ${String(href).slice(0, 60)}`);
  }
}, true);
"""

#: Evaluated after the load event: decodes every figure's raster data again (an <image>
#: that never fired "error" may still hold nothing), measures every figure and collects
#: text that should never be shown (NaN, None, undefined).
_CHECK = """
(async () => {
  const hrefOf = (el) => el.getAttribute('href') || el.getAttribute('xlink:href') || '';
  const where = (el) => {
    const section = el.closest('section');
    const fig = el.closest('figure');
    const cap = fig && fig.querySelector('figcaption');
    return `${section ? section.id : '?'}: ${cap ? cap.textContent.slice(0, 80) : ''}`;
  };
  const broken = [];
  const rasters = [...document.querySelectorAll('svg image')];
  await Promise.all(rasters.map(async (el) => {
    const img = new Image();
    img.src = hrefOf(el);
    try {
      await img.decode();
      if (!img.naturalWidth || !img.naturalHeight) throw new Error('0 pixels');
    } catch (err) { broken.push(`svg image (${where(el)}): ${err.message || err}`); }
  }));
  for (const img of document.images) {
    try { await img.decode(); } catch (err) { /* reported below */ }
    if (!img.complete || !img.naturalWidth) broken.push(`img (${where(img)}): not loaded`);
  }
  const figures = [...document.querySelectorAll('figure')];
  const empty = figures.filter((f) => {
    const svg = f.querySelector('svg, img');
    const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    return box.width < 20 || box.height < 20;
  }).map(where);
  const text = document.body.innerText;
  return {
    figures: figures.length,
    rasters: rasters.length + document.images.length,
    broken: broken.concat(window.__loadErrors || []),
    empty_figures: empty,
    bad_text: [...new Set(text.match(/\\b(NaN|nan|None|undefined|null|Infinity|inf)\\b/g) || [])],
    overflow_px: document.documentElement.scrollWidth - window.innerWidth,
  };
})()
"""


def find_chromium() -> str | None:
    """Path of a Chromium binary: ``$CHROMIUM``, else the first of :data:`CANDIDATES` on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return shutil.which(explicit)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class BrowserError(RuntimeError):
    """Chromium failed to start, answered with an error or did not answer in time."""


class Browser:
    """A headless Chromium page driven over the DevTools pipe.

    Parameters
    ----------
    executable : str, optional
        Chromium binary; default :func:`find_chromium`.
    width, height : int
        Viewport in CSS pixels.
    timeout : float
        Seconds to wait for any one answer.
    """

    def __init__(self, executable: str | None = None, *, width: int = 1280, height: int = 900,
                 timeout: float = 30.0) -> None:
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("no Chromium binary found: install the Debian package "
                               "'chromium' or set $CHROMIUM to a Chrome/Chromium binary.")
        self.width, self.height, self.timeout = width, height, timeout
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._next_id = 0

    def __enter__(self) -> Browser:
        self._profile = tempfile.TemporaryDirectory(prefix="trajectome-chromium-")
        argv = [self.executable, *FLAGS, f"--user-data-dir={self._profile.name}",
                f"--window-size={self.width},{self.height}", "about:blank"]
        # the pipe protocol wants fds 3 (in) and 4 (out): map them from stdin/stdout
        self._proc = subprocess.Popen(
            ["/bin/sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>&2', "sh", *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self._proc.stderr), daemon=True
                         ).start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget",
                                  {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", {
            "width": self.width, "height": self.height, "deviceScaleFactor": 1,
            "mobile": False}, session=True)
        self.send("Page.addScriptToEvaluateOnNewDocument", {"source": _RECORD_ERRORS},
                  session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (BrowserError, OSError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._profile.cleanup()

    def _read(self) -> None:
        buffer = b""
        for chunk in iter(lambda: self._proc.stdout.read1(65536), b""):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._queue.put(json.loads(message))
        self._queue.put(None)  # Chromium exited

    def _get(self, deadline: float) -> dict[str, Any]:
        try:
            message = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise BrowserError(f"Chromium did not answer within {self.timeout:g} s") from None
        if message is None:
            raise BrowserError("Chromium exited: "
                               + b"".join(self._stderr).decode(errors="replace")[-2000:])
        return message

    def send(self, method: str, params: dict[str, Any] | None = None, *,
             session: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Send one command and return its result (events meanwhile go to :attr:`events`)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session:
            message["sessionId"] = self._session
        self._proc.stdin.write(json.dumps(message).encode() + b"\0")
        self._proc.stdin.flush()
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._get(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def open(self, path: Path) -> None:
        """Load a local file and wait for its load event."""
        self.events.clear()
        self.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=True)
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._get(deadline))

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression (promises awaited)."""
        result = self.send("Runtime.evaluate", {
            "expression": expression, "awaitPromise": True, "returnByValue": True},
            session=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors since :meth:`open`."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error",
                                                                                "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                  for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                out.append("exception: " + str(details.get("exception", {}).get(
                    "description", details.get("text"))))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                out.append(f"log ({entry.get('source')}): {entry.get('text')}")
        return out

    def screenshot(self, x: float, y: float, width: float, height: float) -> bytes:
        """PNG of a page rectangle (CSS pixels, page coordinates)."""
        result = self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": x, "y": y, "width": width, "height": height, "scale": 1}},
            session=True)
        return base64.b64decode(result["data"])


def check_page(browser: Browser, path: Path) -> dict[str, Any]:
    """Open a report and say what did not load.

    Returns
    -------
    dict
        ``figures`` and ``rasters`` (counts), ``broken`` (raster images that failed to
        decode or fired ``error``), ``empty_figures`` (figures drawn smaller than 20 px),
        ``bad_text`` (NaN/None/undefined shown as text), ``overflow_px`` (page wider than
        the viewport) and ``console`` (console errors, exceptions, browser log errors).
    """
    browser.open(path)
    result = browser.evaluate(_CHECK)
    result["console"] = browser.console_errors()
    return result


def _compress(png: bytes) -> bytes:
    """A 256-colour palette PNG when Pillow is there (reports are flat colours and text)."""
    try:
        from PIL import Image
    except ImportError:
        return png
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
                   ).save(out, format="PNG", optimize=True)
    return out.getvalue() if out.tell() < len(png) else png


def _default_subject(output_dir: Path) -> str:
    """The first patient with a report and trajectories, else the first report."""
    participants = output_dir / "participants.tsv"
    if participants.exists():
        with participants.open(newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                pid = row["participant_id"]
                if (row.get("group") == "patient" and (output_dir / f"{pid}.html").exists()
                        and any((output_dir / pid).glob(f"{pid}_*desc-trajectories*.tsv"))):
                    return pid
    reports = sorted(output_dir.glob("sub-*.html"))
    if not reports:
        raise SystemExit(f"{output_dir}: no sub-*.html report; run the participant level "
                         "(and the group level) first.")
    return reports[0].stem


def _box(browser: Browser, selector: str) -> dict[str, float]:
    box = browser.evaluate(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
        " if (!e) return null; const r = e.getBoundingClientRect();"
        " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width,"
        " height: r.height}; })()")
    if box is None:
        raise SystemExit(f"no element {selector!r} in the report")
    return box


def take_screenshots(report: Path, docs: Path, *, width: int = 1280,
                     height: int = 900) -> list[Path]:
    """Write ``report_session.png`` and ``report_trajectories.png`` of a subject report."""
    docs.mkdir(parents=True, exist_ok=True)
    written = []
    with Browser(width=width, height=height) as browser:
        status = check_page(browser, report)
        problems = status["broken"] + status["console"] + status["empty_figures"]
        if problems:
            print(f"warning: {report}: " + "; ".join(problems), file=sys.stderr)
        body = _box(browser, "body")  # the centred column, without the empty margins
        for name, selector in (("report_session.png", "section.session"),
                               ("report_trajectories.png", "#trajectories")):
            box = _box(browser, selector)
            top = max(box["y"] - 8, 0)
            png = _compress(browser.screenshot(body["x"], top, body["width"],
                                               min(height, box["height"] + 16)))
            path = docs / name
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_bytes(png)
            os.replace(tmp, path)  # never a half-written picture
            note = "" if len(png) <= MAX_PNG_BYTES else f" (over {MAX_PNG_BYTES} bytes)"
            print(f"{path}: {len(png) / 1000:.0f} kB{note}")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="Trajectome output folder")
    parser.add_argument("--subject", help="subject label (default: first patient)")
    parser.add_argument("--docs", type=Path, default=Path(__file__).parents[1] / "docs",
                        help="folder of the PNGs (default: the repository's docs/)")
    parser.add_argument("--width", type=int, default=1280, help="viewport width (px)")
    parser.add_argument("--height", type=int, default=900, help="screenshot height (px)")
    args = parser.parse_args(argv)
    subject = args.subject or _default_subject(args.output_dir)
    report = args.output_dir / f"sub-{subject.removeprefix('sub-')}.html"
    if not report.exists():
        raise SystemExit(f"{report} not found: run the participant level for this subject.")
    take_screenshots(report, args.docs, width=args.width, height=args.height)
    return 0


if __name__ == "__main__":
    sys.exit(main())
