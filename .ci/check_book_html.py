#!/usr/bin/env python
"""Open every page of the built book in headless Chromium, offline, and fail on what a reader would see broken.

    jupyter-book build .                      # first: the book in _build/html
    .venv/bin/python .ci/check_book_html.py [--html _build/html] [--toc _toc.yml] [--self-test]

For each page listed in _toc.yml it prints one line, ``OK  page`` or ``FAIL page: problem; ...``, and
exits with status 1 if any page fails. The browser has no network: every host name but 127.0.0.1 fails to
resolve, so a page that needs a CDN shows it. A page fails when
  * its HTML file is missing from the build,
  * an <img> has naturalWidth 0 once the page has loaded (broken or missing image),
  * TeX is left unrendered in the visible text (``\\(``, ``\\[``, ``$$`` or a TeX command outside code),
    or MathJax shows a TeX error,
  * a Markdown table a cell displays is shown as raw text (pipes and dashes) instead of a table,
  * a notebook cell shows a traceback or a stderr block (warnings, progress bars), or a progress bar
    anywhere in its outputs,
  * a code output (text, table or image) is wider than the content column, i.e. cut off or scrolled, or
    a printed table (columns aligned by spaces) only fits by wrapping: it should be a rendered table,
  * a figure is shown at less than 90 % of its drawn size (its text shrinks below 9 pt),
  * the browser console logs an error, or a file of the book answers with HTTP status >= 400.
A screenshot of every page, 1280 px wide and as long as the page, goes to _build/screenshots/.

``--self-test`` first copies the build, breaks the root page the two ways a chapter most often breaks (an
invalid formula, a print to stderr) and fails unless the check reports both: a check that cannot fail
proves nothing.

The build is served on 127.0.0.1 by http.server in a thread; Chromium (/usr/bin/chromium) is driven
by selenium through /usr/bin/chromedriver with a fresh profile (env CHROMIUM and CHROMEDRIVER override
both paths).
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
    # no network: every host but the local server fails to resolve (a CDN, fonts, analytics)
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]

# Run in the page once it has loaded. Returns a list of problems (strings).
PAGE_CHECK_JS = r"""
const done = arguments[arguments.length - 1];
const problems = [];
const imgs = Array.from(document.images);
imgs.forEach(img => { if (img.loading === 'lazy') img.loading = 'eager'; });
const deadline = Date.now() + 15000;
const first = t => t.trim().split('\n')[0].slice(0, 100);
// TeX delimiters, or a common TeX command
const TEX = /\\\(|\\\)|\\\[|\\\]|\$\$|\\(frac|mathcal|mathbf|mathrm|lambda|sum|tag|begin|left|right|operatorname|tilde|hat)\b/;
function visibleText() {  // the page's text outside code, scripts and typeset math
  const walker = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      const skip = node.parentElement.closest('pre, code, script, style, textarea, mjx-container, .highlight');
      return skip ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT;
    }
  });
  const parts = [];
  while (walker.nextNode()) parts.push(walker.currentNode.nodeValue);
  return parts.join(' ');
}
function finish() {
  imgs.forEach(img => {
    if (!img.complete || img.naturalWidth === 0) {
      problems.push('image not shown: ' + (img.getAttribute('src') || '(no src)').slice(0, 120));
    }
  });
  if (document.querySelector('.math') && !(window.MathJax && window.MathJax.startup)) {
    problems.push('MathJax did not load');
  }
  const merr = document.querySelectorAll('mjx-merror');
  if (merr.length) problems.push(merr.length + ' formula(s) with a TeX error: ' + first(merr[0].textContent));
  const text = visibleText();
  const tex = text.match(TEX);
  if (tex) {
    const i = tex.index;
    problems.push('unrendered TeX: "' + text.slice(Math.max(0, i - 30), i + 50).replace(/\s+/g, ' ') + '"');
  }
  document.querySelectorAll('.cell_output').forEach(el => {
    if (/\|\s*-{3,}\s*\|/.test(el.innerText)) problems.push('Markdown table shown as text: ' + first(el.innerText));
  });
  const tb = document.querySelectorAll('.output.traceback');
  if (tb.length) problems.push(tb.length + ' cell output(s) with a traceback');
  if ((document.body ? document.body.innerText : '').includes('Traceback (most recent call last)')) {
    problems.push('page shows "Traceback (most recent call last)"');
  }
  document.querySelectorAll('.output.stderr').forEach(el => {
    problems.push('stderr block: ' + first(el.textContent));
  });
  document.querySelectorAll('.cell_output').forEach(el => {
    const m = el.textContent.match(/.{0,40}(\d+%\|[^\n]{0,40}|\d+(\.\d+)?(it\/s|s\/it)\]).{0,20}/);
    if (m) problems.push('progress bar in an output: ' + m[0].trim());
  });
  document.querySelectorAll('.cell_output pre, .cell_output table, .cell_output img').forEach(el => {
    const box = el.closest('.cell_output');
    if (el.scrollWidth > box.clientWidth + 2 || el.getBoundingClientRect().right > box.getBoundingClientRect().right + 2) {
      problems.push('output wider than the column (' + el.scrollWidth + ' > ' + box.clientWidth + ' px): ' +
                    first(el.innerText || el.getAttribute('src') || ''));
    }
  });
  // A figure drawn wider than the column is shrunk to fit, and its text with it: below 90 % of its size,
  // matplotlib's 10-pt default (and the book's smallest, 9 pt) reads below 9 pt.
  document.querySelectorAll('.cell_output img').forEach(img => {
    const scale = img.clientWidth / img.naturalWidth;
    if (img.naturalWidth && scale < 0.9) {
      problems.push('figure shown at ' + Math.round(100 * scale) + ' % of its size (text too small): ' +
                    (img.getAttribute('alt') || img.getAttribute('src') || '').slice(0, 80));
    }
  });
  // Printed output wraps (book.css); a printed table (2+ lines, columns aligned by runs of spaces) that wraps
  // reads garbled: it should be a rendered table.
  document.querySelectorAll('.cell_output pre').forEach(el => {
    const rows = el.innerText.split('\n').filter(line => /\S {2,}\S.* {2,}\S/.test(line));
    if (rows.length < 2) return;
    const probe = document.createElement('span');  // the width of one character of this block's font
    probe.textContent = 'x'.repeat(100);
    el.appendChild(probe);
    const charWidth = probe.getBoundingClientRect().width / 100;
    el.removeChild(probe);
    const style = getComputedStyle(el);
    const room = el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const widest = Math.max(...rows.map(line => line.length));
    if (widest * charWidth > room + 1) problems.push('printed table wraps (render it as a table): ' + first(el.innerText));
  });
  performance.getEntriesByType('resource').forEach(e => {
    // /favicon.ico is asked for by the browser, not by the page
    if (e.name.startsWith(location.origin) && e.responseStatus >= 400 && !e.name.endsWith('/favicon.ico')) {
      problems.push('HTTP ' + e.responseStatus + ' for ' + e.name.slice(location.origin.length));
    }
  });
  done(problems);
}
function mathDone() {
  return !(window.MathJax && window.MathJax.startup && window.MathJax.startup.promise)
    ? Promise.resolve() : window.MathJax.startup.promise;
}
(function wait() {
  if (imgs.every(img => img.complete) || Date.now() > deadline) {
    mathDone().then(finish, err => { problems.push('MathJax failed: ' + err); finish(); });
  } else setTimeout(wait, 100);
})();
"""

# What --self-test writes into a copy of the root page: an invalid formula and a stderr output, as a
# chapter would show them (MyST renders `$\\frac{1}{$` as a span of class "math"; myst-nb a stderr stream so).
BROKEN_FORMULA = r'<p>A formula made invalid: <span class="math notranslate nohighlight">\(\frac{1}\)</span></p>'
STDERR_OUTPUT = ('<div class="cell_output docutils container"><div class="output stderr highlight-myst-ansi notranslate">'
                 '<div class="highlight"><pre><span></span>caching cifar10:   0%|          | 0/300</pre></div></div></div>')


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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, read after each page
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(40)
    return driver


# Console messages that are not the page's fault: the browser's own favicon request, and the theme's
# complaint about a fresh profile with no light/dark choice stored (pydata-sphinx-theme then uses "auto").
CONSOLE_NOISE = ("favicon.ico", "Got invalid theme mode")


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """Errors the page logged to the browser console since the last call."""
    return [f"console error: {e['message'][:160]}" for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(n in e["message"] for n in CONSOLE_NOISE)]


def screenshot(driver: webdriver.Chrome, path: Path) -> None:
    """The whole page at 1280 px wide (at most 16,000 px long), as a reader scrolls through it: the window is
    made as tall as the page for the shot (the DevTools "beyond the viewport" capture shifted some pages)."""
    height = min(int(driver.execute_script("return document.documentElement.scrollHeight")), 16000)
    driver.set_window_size(1280, height + 140)  # + the window's own frame in headless mode
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1000)


def check_pages(html: Path, pages: list[str], screenshots: Path | None) -> dict[str, list[str]]:
    """{page: problems} for every page, in order; a screenshot of each into ``screenshots`` when given."""
    results = {}
    server, base = serve(html)
    profile = tempfile.mkdtemp(prefix="check-book-chromium-")
    driver = None
    try:
        driver = make_driver(profile)
        for page in pages:
            rel = f"{page}.html"
            if not (html / rel).is_file():
                results[rel] = [f"page missing from {html}"]
                continue
            try:
                driver.get(f"{base}/{rel}")
                problems = driver.execute_async_script(PAGE_CHECK_JS) + console_errors(driver)
                if screenshots is not None:
                    screenshot(driver, screenshots / f"{page.replace('/', '__')}.png")
            except Exception as err:  # a timeout or a crashed tab is a failure of this page
                problems = [f"could not load: {type(err).__name__}: {str(err).splitlines()[0][:200]}"]
            results[rel] = list(dict.fromkeys(problems))  # once each
    finally:
        if driver is not None:
            driver.quit()
        server.shutdown()
        server.server_close()
        shutil.rmtree(profile, ignore_errors=True)
    return results


def self_test(html: Path, root_page: str) -> bool:
    """Break a copy of the root page (invalid formula, stderr output); True if the check reports both."""
    with tempfile.TemporaryDirectory(prefix="check-book-self-test-") as tmp:
        copy = Path(tmp) / "html"
        shutil.copytree(html, copy)
        page = copy / f"{root_page}.html"
        text = page.read_text()
        article = text.index(">", text.index('<article class="bd-article"')) + 1
        page.write_text(text[:article] + "<section>" + BROKEN_FORMULA + STDERR_OUTPUT + "</section>" + text[article:])
        problems = check_pages(copy, [root_page], None)[f"{root_page}.html"]
    caught = {"invalid formula": any("TeX error" in p or "unrendered TeX" in p for p in problems),
              "print to stderr": any(p.startswith("stderr block") for p in problems)}
    for what, ok in caught.items():
        print(f"self-test: {what} {'reported' if ok else 'NOT reported'}")
    print("self-test: the check reported: " + "; ".join(problems))
    return all(caught.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html", help="built book (default _build/html)")
    parser.add_argument("--toc", type=Path, default=ROOT / "_toc.yml", help="table of contents (default _toc.yml)")
    parser.add_argument("--screenshots", type=Path, default=ROOT / "_build" / "screenshots",
                        help="where the screenshots of every page go (default _build/screenshots)")
    parser.add_argument("--self-test", action="store_true",
                        help="first check that a broken formula and a stderr output on a copy of a page are reported")
    opts = parser.parse_args()

    if not opts.html.is_dir():
        print(f"FAIL no built book at {opts.html}: run jupyter-book build . first")
        return 1
    pages = toc_pages(opts.toc)
    start = time.monotonic()
    if opts.self_test and not self_test(opts.html, pages[0]):
        print("FAIL the check did not report a page broken on purpose")
        return 1
    results = check_pages(opts.html, pages, opts.screenshots)
    for rel, problems in results.items():
        print(f"FAIL {rel}: " + "; ".join(problems) if problems else f"OK   {rel}")
    failed = sum(bool(p) for p in results.values())
    print(f"{len(pages) - failed} of {len(pages)} pages OK ({time.monotonic() - start:.1f} s); "
          f"screenshots in {opts.screenshots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
