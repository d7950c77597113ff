#!/usr/bin/env python
"""Bring the .ipynb twins of the book's chapters up to date with their MyST sources and re-run them.

The committed .ipynb twins carry the outputs that Colab shows and that nbval compares against, so
after editing a chapter run (from anywhere; paths are relative to the repository root):

    .venv/bin/python .ci/sync_notebooks.py                       # every notebooks/*.md
    .venv/bin/python .ci/sync_notebooks.py notebooks/usage.md    # some chapters (.md or .ipynb)
    .venv/bin/python .ci/sync_notebooks.py --no-execute          # pair only

For each chapter:
  0. its first code cell becomes the book's setup cell (``dfmpc.experiments.book.SETUP_CELL`` with the
     repository URL of _config.yml), hidden in the book,
  1. ``jupytext --sync`` (inputs come from the newer file of the pair, outputs stay in the .ipynb; a
     missing twin is created from the .md; pairing: notebooks/jupytext.toml),
  2. the .ipynb is executed top to bottom in a fresh ``python3`` kernel of this interpreter, with
     notebooks/ as working directory -- what ``jupyter nbconvert --to notebook --execute --inplace``
     does, done here with nbclient (a dependency of jupyter-book) and without per-cell timing
     metadata, so that re-running an unchanged chapter leaves no diff but changed outputs,
  3. the .md is touched, so that it stays the newer file of the pair.
Stops with exit status 1 at the first chapter whose execution fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from dfmpc.experiments.book import SETUP_CELL, repository_url

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def chapters(args: list[str]) -> list[Path]:
    if args:
        return [(Path.cwd() / a).resolve().with_suffix(".md") for a in args]
    return sorted(p for p in NOTEBOOKS.glob("*.md") if p.name != "README.md")


FIRST_CODE_CELL = re.compile(r"```\{code-cell\} ipython3\n.*?```", re.S)


def setup_cell() -> str:
    return "```{code-cell} ipython3\n:tags: [hide-input]\n\n" + SETUP_CELL.format(url=repository_url()) + "\n```"


def write_setup_cell(md: Path) -> None:
    """Make the chapter's first code cell the setup cell (the .md becomes the newer file of the pair)."""
    text = md.read_text()
    new = FIRST_CODE_CELL.sub(lambda _: setup_cell(), text, count=1)
    if new != text:
        md.write_text(new)


def jupytext_sync(md: Path) -> None:
    subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(md)], check=True)


def execute(ipynb: Path, timeout: int) -> None:
    nb = nbformat.read(ipynb, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timing metadata of older runs
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
        resources={"metadata": {"path": str(ipynb.parent)}},
        record_timing=False,
    )
    client.execute()
    nbformat.write(nb, ipynb)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("chapters", nargs="*", help="notebooks/NAME.md (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="only run jupytext --sync")
    parser.add_argument("--timeout", type=int, default=int(os.environ.get("NOTEBOOK_TIMEOUT", 600)),
                        help="seconds per cell (default 600)")
    opts = parser.parse_args()
    for md in chapters(opts.chapters):
        if not md.exists():
            print(f"no such chapter source: {md}", file=sys.stderr)
            return 2
        rel = md.relative_to(ROOT)
        print(f"== {rel}", flush=True)
        write_setup_cell(md)
        jupytext_sync(md)
        if opts.no_execute:
            continue
        ipynb = md.with_suffix(".ipynb")
        start = time.monotonic()
        try:
            execute(ipynb, opts.timeout)
        except CellExecutionError as err:
            print(f"FAILED {ipynb.relative_to(ROOT)}:\n{err}", file=sys.stderr)
            return 1
        print(f"   executed {ipynb.relative_to(ROOT)} in {time.monotonic() - start:.0f} s", flush=True)
        jupytext_sync(md)
        md.touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
