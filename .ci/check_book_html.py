#!/usr/bin/env python
"""Open every page of the built book in headless Chromium, offline, and fail on what a reader would see broken.

    jupyter-book build .                      # first: the book in _build/html
    .venv/bin/python .ci/check_book_html.py [--html _build/html] [--toc _toc.yml] [--self-test]

For each page listed in _toc.yml it prints one line, ``OK  page`` or ``FAIL page: problem; ...``, and
exits with status 1 if any page fails. The browser has no network: every host name but 127.0.0.1 fails to
resolve, so a page that needs a CDN shows it. A page fails when
  * its HTML file is missing from the build,
  * an <img> has naturalWidth 0 once the page has loaded (broken or missing image),
  * TeX is left unrendered in the visible text (``\\(``, ``\\[``, ``$$``, ``$...$`` or a TeX command outside
    code) or in an output (``$...$``, ``\\(``, ``\\[``, ``$$``),
  * MathJax shows a TeX error or draws an undefined macro (its record of every formula is read: an
    ``merror`` node, or the red text of its "noundefined" package),
  * a Markdown table a cell displays is shown as raw text (pipes and dashes) instead of a table,
  * a notebook cell shows a traceback or a stderr block (warnings, progress bars), or a progress bar
    anywhere in its outputs,
  * a figure has text that overlaps or a legend over its data: the kernel checks every figure where it is
    drawn, from the extents of its texts and artists (``dfmpc.experiments.figures``, installed by the
    chapters' ``setup()``), and prints each problem to stderr as ``figure check: ...``,
  * a code input or code block is wider than the column (cut off; folded inputs are measured unfolded),
  * a code output (text, table or image) is wider than the content column, i.e. cut off or scrolled, or
    a printed table (columns aligned by spaces) only fits by wrapping: it should be a rendered table,
  * a figure is shown at less than 90 % of its drawn size (its text shrinks below 9 pt),
  * the browser console logs an error, or a file of the book answers with HTTP status >= 400.
A screenshot of every page, 1280 px wide and as long as the page (in parts of 16,000 px), goes to
_build/screenshots/.

``--self-test`` first copies the build and injects each defect of :func:`self_test_defects` into its own
copy of the root page (an invalid formula, an undefined macro, raw ``$c_j$`` in the text and in an output,
raw ``\\(`` in an output, a code input and an output cut off, a stderr block, a console error, and two
figures broken on purpose, run through the figure check: overlapping titles, a legend over the data); it
fails unless the check fails every copy with the expected problem: a check that cannot fail proves nothing.

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
from html import escape as html_escape
from pathlib import Path

import yaml
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dfmpc.experiments.figures import FIGURE_PROBLEM_PREFIX, figure_problems, self_test_figures  # noqa: E402

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
const FIGURE_PREFIX = arguments[0];
const folded = Array.from(document.querySelectorAll('details')).filter(d => !d.open);
folded.forEach(d => { d.open = true; });  // folded inputs are checked as a reader who unfolds them sees them
const problems = [];
const imgs = Array.from(document.images);
imgs.forEach(img => { if (img.loading === 'lazy') img.loading = 'eager'; });
const deadline = Date.now() + 15000;
const first = t => t.trim().split('\n')[0].slice(0, 100);
// TeX delimiters, or a common TeX command
const TEX = /\\\(|\\\)|\\\[|\\\]|\$\$|\\(frac|mathcal|mathbf|mathrm|lambda|sum|tag|begin|left|right|operatorname|tilde|hat)\b/;
// $...$ left raw: a dollar, then TeX (a backslash, _ ^ { }) before the closing dollar on the same line
const DOLLAR_TEX = /(^|[^\\$])\$(?=\S)[^$\n]{0,200}?[\\_^{}][^$\n]{0,200}?\S\$(?!\d)/;
const OUTPUT_TEX = new RegExp(DOLLAR_TEX.source + '|\\\\\\(|\\\\\\[|\\$\\$');
function outputText(el) {  // an output's text outside typeset math (HTML and Markdown outputs are typeset)
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      return node.parentElement.closest('mjx-container, script, style') ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT;
    }
  });
  const parts = [];
  while (walker.nextNode()) parts.push(walker.currentNode.nodeValue);
  return parts.join('');
}
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
  // MathJax's own record of every formula: an merror node, or the red text its "noundefined" package draws for
  // an undefined macro (\Thetaa_j), is an error a reader sees
  const mjDoc = window.MathJax && window.MathJax.startup && window.MathJax.startup.document;
  if (mjDoc && mjDoc.math && window.MathJax.startup.toMML) {
    for (const item of mjDoc.math) {
      let mml = '';
      try { mml = window.MathJax.startup.toMML(item.root); } catch (e) { continue; }
      if (/<merror|mathcolor="red"/.test(mml)) {
        const macro = (mml.match(/mathcolor="red"[^>]*>([^<]*)</) || [])[1];
        problems.push('MathJax error in formula "' + String(item.math).slice(0, 60) + '"' +
                      (macro ? ' (undefined macro ' + macro + ')' : ''));
      }
    }
  }
  const text = visibleText();
  const tex = text.match(TEX);
  if (tex) {
    const i = tex.index;
    problems.push('unrendered TeX: "' + text.slice(Math.max(0, i - 30), i + 50).replace(/\s+/g, ' ') + '"');
  }
  const dollars = text.match(DOLLAR_TEX);
  if (dollars) problems.push('unrendered $...$ in the text: "' + dollars[0].trim().slice(0, 80) + '"');
  document.querySelectorAll('.cell_output').forEach(el => {
    if (/\|\s*-{3,}\s*\|/.test(el.innerText)) problems.push('Markdown table shown as text: ' + first(el.innerText));
    const raw = outputText(el).match(OUTPUT_TEX);
    if (raw) problems.push('unrendered TeX in an output: "' + raw[0].trim().slice(0, 80) + '"');
  });
  const tb = document.querySelectorAll('.output.traceback');
  if (tb.length) problems.push(tb.length + ' cell output(s) with a traceback');
  if ((document.body ? document.body.innerText : '').includes('Traceback (most recent call last)')) {
    problems.push('page shows "Traceback (most recent call last)"');
  }
  document.querySelectorAll('.output.stderr').forEach(el => {
    const lines = el.textContent.split('\n').filter(line => line.startsWith(FIGURE_PREFIX));
    if (lines.length) lines.forEach(line => problems.push('figure: ' + line.slice(FIGURE_PREFIX.length).trim().slice(0, 160)));
    else problems.push('stderr block: ' + first(el.textContent));
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
  // A code input or code block that scrolls sideways shows its lines cut off at the column's edge (folded
  // inputs, not displayed, are measured when a reader unfolds them: the page is checked with them open)
  document.querySelectorAll('.cell_input pre, article div.highlight pre').forEach(el => {
    if (el.closest('.cell_output') || el.clientWidth === 0) return;
    if (el.scrollWidth > el.clientWidth + 2) {
      problems.push('code wider than the column (' + el.scrollWidth + ' > ' + el.clientWidth + ' px): ' + first(el.innerText));
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
  folded.forEach(d => { d.open = false; });  // the screenshot shows the page as it opens
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

# What --self-test writes into copies of the root page, one defect per copy, as a chapter would show it (MyST
# renders `$...$` as a span of class "math"; myst-nb a stderr stream and a cell as below). Each copy must fail
# with a problem that starts with the given text.
def _output(inner: str, kind: str = "output text_plain") -> str:
    return (f'<div class="cell_output docutils container"><div class="{kind} highlight-myst-ansi notranslate">'
            f'<div class="highlight"><pre><span></span>{inner}</pre></div></div></div>')


def _cell(source: str, output: str = "") -> str:
    return ('<div class="cell docutils container"><div class="cell_input docutils container">'
            '<div class="highlight-ipython3 notranslate"><div class="highlight"><pre><span></span>'
            f'{source}</pre></div></div></div>{output}</div>')


def _figure_output(problems: list[str], png: str) -> str:
    """A figure's output as the book shows it: the figure check's stderr lines, then the image."""
    lines = "\n".join(f"{FIGURE_PROBLEM_PREFIX} {p}" for p in problems)
    return ('<div class="cell_output docutils container"><div class="output stderr highlight-myst-ansi notranslate">'
            f'<div class="highlight"><pre><span></span>{html_escape(lines)}</pre></div></div>'
            f'<img alt="figure" src="data:image/png;base64,{png}" /></div>')


def self_test_defects() -> dict[str, tuple[str, str]]:
    """{defect: (HTML to inject, start of the problem the check must report)}."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defects = {
        "invalid formula": ('<p>Invalid: <span class="math notranslate nohighlight">\\(\\frac{1}\\)</span></p>',
                            "MathJax error"),
        "undefined macro": ('<p>A typo: <span class="math notranslate nohighlight">\\(\\Thetaa_j\\)</span></p>',
                            "MathJax error"),
        "raw $c_j$ in the text": ("<p>Each channel gets $c_j$ in closed form.</p>", "unrendered $...$ in the text"),
        "raw $c_j$ in an output": (_cell("print(text)", _output("the coefficient $c_j$ of channel j")),
                                   "unrendered TeX in an output"),
        "raw \\( in an output": (_cell("print(text)", _output("the coefficient \\(c_j\\) of channel j")),
                                  "unrendered TeX in an output"),
        "code input cut off": (_cell('KEY = "' + "0123456789abcdef" * 12 + '"'),
                               "code wider than the column"),
        "output cut off": (_cell("show(table)", '<div class="cell_output docutils container"><table style="width: 2000px">'
                                 '<tr><th>a table too wide for the column</th></tr></table></div>'),
                           "output wider than the column"),
        "print to stderr": (_cell("load()", _output("caching cifar10:   0%|          | 0/300", "output stderr")),
                            "stderr block"),
        "console error": ('<script>console.error("self-test: broken on purpose")</script>', "console error"),
    }
    for name, fig in self_test_figures().items():
        buf = io.BytesIO()
        problems = figure_problems(fig)
        fig.savefig(buf, format="png", dpi=72)
        plt.close(fig)
        defects[name] = (_cell("plot()", _figure_output(problems, base64.b64encode(buf.getvalue()).decode())), "figure: ")
    return defects


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


SHOT_HEIGHT = 16000  # the most one screenshot holds (Chromium's limit is about 16,384 px)


def screenshot(driver: webdriver.Chrome, path: Path) -> None:
    """The whole page at 1280 px wide, as a reader scrolls through it: the window is made as tall as the page for
    the shot (the DevTools "beyond the viewport" capture shifted some pages); a page longer than 16,000 px is
    shot in parts, ``NAME.png``, ``NAME-2.png``, ... (each part starts where the previous one ends)."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.stem}-*.png"):
        stale.unlink()
    for part, top in enumerate(range(0, height, SHOT_HEIGHT), start=1):
        window = min(SHOT_HEIGHT, height - top)
        driver.set_window_size(1280, window + 140)  # + the window's own frame in headless mode
        driver.execute_script("window.scrollTo(0, arguments[0])", top)
        driver.save_screenshot(str(path if part == 1 else path.with_name(f"{path.stem}-{part}.png")))
    driver.execute_script("window.scrollTo(0, 0)")
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
                problems = driver.execute_async_script(PAGE_CHECK_JS, FIGURE_PROBLEM_PREFIX) + console_errors(driver)
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
    """Inject each defect of :func:`self_test_defects` into its own copy of the root page; True if the check
    fails every copy with the expected problem."""
    defects = self_test_defects()
    with tempfile.TemporaryDirectory(prefix="check-book-self-test-") as tmp:
        copy = Path(tmp) / "html"
        shutil.copytree(html, copy)
        text = (copy / f"{root_page}.html").read_text()
        article = text.index(">", text.index('<article class="bd-article"')) + 1
        pages = []
        for i, (inject, _) in enumerate(defects.values()):
            page = f"{root_page}-self-test-{i}"
            (copy / f"{page}.html").write_text(text[:article] + "<section>" + inject + "</section>" + text[article:])
            pages.append(page)
        results = check_pages(copy, pages, None)
    ok = True
    for page, (what, (_, expected)) in zip(pages, defects.items()):
        problems = results[f"{page}.html"]
        caught = any(p.startswith(expected) for p in problems)
        ok &= caught
        print(f"self-test: {what}: {'reported' if caught else 'NOT reported'}: " + "; ".join(problems))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html", help="built book (default _build/html)")
    parser.add_argument("--toc", type=Path, default=ROOT / "_toc.yml", help="table of contents (default _toc.yml)")
    parser.add_argument("--screenshots", type=Path, default=ROOT / "_build" / "screenshots",
                        help="where the screenshots of every page go (default _build/screenshots)")
    parser.add_argument("--self-test", action="store_true",
                        help="first check that each defect of self_test_defects, injected into a copy of a page, is reported")
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
