"""What the book's chapters use: their setup, the committed JSON results, and how to describe and show them."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..data import repository_root
from ..errors import DfmpcError

__all__ = ["setup", "SETUP_CELL", "repository_url", "pages_url", "book_data_dir", "load_result", "describe", "provenance",
           "data_label", "md_table", "show_table"]

# The first cell of every chapter (hidden in the book). `.ci/sync_notebooks.py` writes it, with the URL of
# _config.yml, and tests/test_book_pages.py checks that every chapter starts with it. Colab needs the
# repository itself: the chapters read the committed results in book/data.
SETUP_CELL = """\
# Setup. In Colab: fetch the repository (the book's results live in it) and install dfmpc from it.
import sys

if "google.colab" in sys.modules:
    !git clone -q --depth 1 {url} /content/dfmpc && pip install -q "/content/dfmpc[lite]"
    %cd /content/dfmpc/notebooks
from dfmpc.experiments.book import setup

device = setup()  # finds the offline data for every command, seeds torch, picks cuda or cpu"""


def setup(seed: int = 0) -> str:
    """What every chapter runs first; returns the device its computations use: "cuda" if there is a GPU, else "cpu".

    Finds the offline data folder (``$DFMPC_SHARED``, else ``../shared`` beside the repository) and writes its
    absolute path into ``$DFMPC_SHARED``, so that a ``dfmpc`` command the chapter starts reads the same folder
    whatever its working directory; without one, data sets and weights are downloaded. Seeds torch. In a
    kernel, every figure the chapter displays is checked for overlapping text and a legend over its data
    (:func:`dfmpc.experiments.figures.install_figure_check`).
    """
    import torch

    from ..data import shared_dir

    shared = shared_dir()
    if shared is not None:
        os.environ["DFMPC_SHARED"] = str(shared)
    torch.manual_seed(seed)
    from .figures import install_figure_check

    install_figure_check()
    return "cuda" if torch.cuda.is_available() else "cpu"


def repository_url() -> str:
    """The repository's URL: ``repository: url:`` of _config.yml (the one place it is written), else the
    installed package's "Repository" project URL."""
    root = repository_root()
    config = root / "_config.yml" if root is not None else None
    if config is not None and config.is_file():
        match = re.search(r"^repository:\s*\n(?:\s+.*\n)*?\s+url:\s*(\S+)", config.read_text(), re.M)
        if match:
            return match.group(1)
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("dfmpc").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() == "repository":
            return url.strip()
    raise DfmpcError("the repository's URL is not known here: neither _config.yml nor the installed package name it")


def pages_url() -> str:
    """Where the book is published: the GitHub Pages site of the repository (:func:`repository_url`),
    ``https://<owner>.github.io/<repo>/``, which .github/workflows/book.yml deploys."""
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?", repository_url())
    if not match:
        raise DfmpcError(f"{repository_url()} is not a GitHub repository: its Pages address is not known")
    owner, repo = match.groups()
    return f"https://{owner.lower()}.github.io/{repo}/"


def book_data_dir() -> Path:
    """``book/data`` of the repository: the results the book shows, committed with their provenance."""
    root = repository_root()
    if root is None:
        raise DfmpcError("the dfmpc repository was not found (book/data holds the book's results); clone it, "
                         f"e.g. git clone {repository_url()}, and run from inside it")
    return root / "book" / "data"


def load_result(name: str, directory: str | os.PathLike | None = None) -> dict:
    """The result of experiment ``name``: ``<directory>/<name>.json``, by default the book's (:func:`book_data_dir`).

    Nothing is computed here, so a chapter shows the same numbers whatever ran before it.
    """
    from .runner import SCHEMA

    path = Path(directory if directory is not None else book_data_dir()) / f"{name}.json"
    if not path.is_file():
        raise DfmpcError(f"{path} not found; regenerate it with: dfmpc experiments {name} --out {path.parent}")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DfmpcError(f"{path} is not valid JSON ({e}); regenerate it with dfmpc experiments {name}") from None
    if result.get("experiment") != name or result.get("schema") != SCHEMA:
        raise DfmpcError(f"{path} is not a schema-{SCHEMA} result of {name}; regenerate it with dfmpc experiments {name}")
    return result


def describe(result: dict) -> str:
    """A stable one-line summary of how a result was produced (no paths, no dates: the same on every build)."""
    images = result.get("images_override")
    extra = "" if images is None else f" --images {images}"
    # --book: the book's preset with the experiment's own book settings (e.g. every image of the test half)
    how = "--book" if " --book" in result.get("command", "") else f"--{result['preset']}"
    return (f"dfmpc experiments {result['experiment']} {how}{extra} (seed {result['seed']}; "
            f"committed in book/data/{result['experiment']}.json)")


def provenance(result: dict) -> str:
    """Command, machine, versions, date and data folders of a result (they differ between machines)."""
    d, v = result["device"], result["versions"]
    lines = [f"command: {result['command']}",
             f"device {d['device']} ({d['name']}), {d['threads']} thread(s); {result['wall_s']:.0f} s; "
             f"created {result['created']}",
             "versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]
    lines += [f"data: {r['path']} ({r['images']:,} of {r['available']:,} images)" for r in result["data"]]
    for method, rerun in (result.get("method_versions") or {}).items():  # rows rerun since (--rerun-method)
        commit = rerun["versions"].get("commit") or "no commit"
        lines.append(f"{method}'s rows rerun by {rerun['command']} at {commit[:7]}; {rerun['wall_s']:.0f} s; "
                     f"created {rerun['created']}")
    return "\n".join(lines)


def data_label(record: dict | None, fallback_note: bool = True) -> str:
    """A short description of the data a number was measured on, for the "data" column of the book's tables.

    E.g. "CIFAR-10 test, JPEG copy, 400 of 10,000": which set, whether it is the lossy offline copy (or the
    easier offline ImageNet subset), and how many of its images. ``fallback_note=False`` leaves out the note
    that the offline copy stood in for an unavailable real set (for a page that says it once).
    """
    if not record:
        return "weights only (no images)"
    names = {"cifar10": "CIFAR-10 test", "cifar100": "CIFAR-100 test", "imagenet": "ImageNet val"}
    kind = names.get(record["dataset"], record["dataset"])
    if record["offline_copy"] and record["dataset"] == "cifar10":
        kind += ", JPEG copy"
    elif record["offline_copy"] and record["dataset"] == "imagenet":
        kind += ", offline subset"
    elif record["jpeg"] and record["dataset"] != "imagenet":
        kind += ", JPEG"
    count = f"{record['images']:,} of {record['available']:,}" if record["images"] < record["available"] \
        else f"all {record['images']:,}"
    extra = " (fallback: the real set was unavailable)" if record.get("fallback") and fallback_note else ""
    return f"{kind}, {count}{extra}"


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (for ``IPython.display.Markdown``); cells are converted with ``str``."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def show_table(header: list[str], rows: list[list]) -> None:
    """Show a table in a notebook as a rendered (HTML) table, where a printed one would wrap or be cut off."""
    from IPython.display import Markdown, display

    display(Markdown(md_table(header, rows)))
