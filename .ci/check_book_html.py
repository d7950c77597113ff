#!/usr/bin/env python
"""Open every page of the built book in headless Chromium and fail on what a reader would see broken.

    jupyter-book build .                      # first: the book in _build/html
    .venv/bin/python .ci/check_book_html.py [--html _build/html] [--toc _toc.yml]

For each page listed in _toc.yml it prints one line, ``OK  page`` or ``FAIL page: problem; ...``, and
exits with status 1 if any page fails. A page fails when
  * its HTML file is missing from the build,
  * an <img> has naturalWidth 0 once the page has loaded (broken or missing image),
  * a notebook cell shows an error: a ``.output.traceback`` block, a ``.output.stderr`` block that
    contains "Error" or "Traceback", or the text "Traceback (most recent call last)" anywhere,
  * a file of the book itself (same origin) that the page loads answers with HTTP status >= 400,
  * MathJax shows a TeX error (checked only where MathJax could be loaded from its CDN).
Resources from other hosts (MathJax, fonts from a CDN) are not checked: the check runs offline.

The build is served on 127.0.0.1 by http.server in a thread; Chromium (/usr/bin/chromium) is driven
by selenium through /usr/bin/chromedriver with a fresh profile (env CHROMIUM and CHROMEDRIVER override
both paths). A screenshot of the first page (the
book's root, usually the introduction) is saved to _build/screenshots/ for a human to look at.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")  # e.g. google-chrome on a GitHub runner
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]

# Run in the page once it has loaded. Returns a list of problems (strings).
PAGE_CHECK_JS = r"""
const done = arguments[arguments.length - 1];
const problems = [];
const imgs = Array.from(document.images);
imgs.forEach(img => { if (img.loading === 'lazy') img.loading = 'eager'; });
const deadline = Date.now() + 10000;
function finish() {
  imgs.forEach(img => {
    if (!img.complete || img.naturalWidth === 0) {
      problems.push('image not shown: ' + (img.getAttribute('src') || '(no src)').slice(0, 120));
    }
  });
  const tb = document.querySelectorAll('.output.traceback');
  if (tb.length) problems.push(tb.length + ' cell output(s) with a traceback');
  document.querySelectorAll('.output.stderr').forEach(el => {
    const t = el.textContent;
    if (t.includes('Error') || t.includes('Traceback')) {
      problems.push('stderr output with an error: ' + t.trim().split('\n').pop().slice(0, 120));
    }
  });
  // TeX that MathJax could not typeset (only where MathJax loaded: it comes from a CDN)
  const merr = document.querySelectorAll('mjx-merror');
  if (merr.length) problems.push(merr.length + ' math formula(s) with a TeX error');
  const text = document.body ? document.body.innerText : '';
  if (text.includes('Traceback (most recent call last)')) {
    problems.push('page shows "Traceback (most recent call last)"');
  }
  performance.getEntriesByType('resource').forEach(e => {
    // /favicon.ico is asked for by the browser, not by the page
    if (e.name.startsWith(location.origin) && e.responseStatus >= 400 && !e.name.endsWith('/favicon.ico')) {
      problems.push('HTTP ' + e.responseStatus + ' for ' + e.name.slice(location.origin.length));
    }
  });
  done(problems);
}
(function wait() {
  if (imgs.every(img => img.complete) || Date.now() > deadline) finish();
  else setTimeout(wait, 100);
})();
"""


def toc_pages(toc_path: Path) -> list[str]:
    """Docnames (paths without suffix) of every file listed in a jb-book/jb-article _toc.yml."""
    toc = yaml.safe_load(toc_path.read_text())
    pages: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                path = Path(node["file"])
                pages.append(str(path.with_suffix("")) if path.suffix in {".md", ".ipynb", ".rst"} else node["file"])
            if "glob" in node:
                print(f"note: glob entry {node['glob']!r} in the toc is not checked", file=sys.stderr)
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    pages.append(toc["root"])
    walk({k: v for k, v in toc.items() if k != "root"})
    return pages


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on stderr
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def make_driver(profile: str) -> webdriver.Chrome:
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


def screenshot(driver: webdriver.Chrome, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(800, min(int(height) + 100, 6000)))
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html", help="built book (default _build/html)")
    parser.add_argument("--toc", type=Path, default=ROOT / "_toc.yml", help="table of contents (default _toc.yml)")
    parser.add_argument("--screenshots", type=Path, default=ROOT / "_build" / "screenshots",
                        help="where the screenshot of the root page goes (default _build/screenshots)")
    opts = parser.parse_args()

    if not opts.html.is_dir():
        print(f"FAIL no built book at {opts.html}: run jupyter-book build . first")
        return 1
    pages = toc_pages(opts.toc)
    failed = 0
    server, base = serve(opts.html)
    profile = tempfile.mkdtemp(prefix="check-book-chromium-")
    driver = None
    start = time.monotonic()
    try:
        driver = make_driver(profile)
        for i, page in enumerate(pages):
            rel = f"{page}.html"
            if not (opts.html / rel).is_file():
                print(f"FAIL {rel}: page missing from {opts.html}")
                failed += 1
                continue
            try:
                driver.get(f"{base}/{rel}")
                problems = driver.execute_async_script(PAGE_CHECK_JS)
            except Exception as err:  # a timeout or a crashed tab is a failure of this page
                problems = [f"could not load: {type(err).__name__}: {str(err).splitlines()[0][:200]}"]
            problems = list(dict.fromkeys(problems))  # once each
            if problems:
                print(f"FAIL {rel}: " + "; ".join(problems))
                failed += 1
            else:
                print(f"OK   {rel}")
            if i == 0:
                shot = opts.screenshots / f"{Path(page).name}.png"
                screenshot(driver, shot)
                print(f"     screenshot of {rel}: {shot.relative_to(ROOT) if shot.is_relative_to(ROOT) else shot}")
    finally:
        if driver is not None:
            driver.quit()
        server.shutdown()
        server.server_close()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"{len(pages) - failed} of {len(pages)} pages OK ({time.monotonic() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
