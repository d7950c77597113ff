"""What the book's chapters use to show results: the committed JSON files and how to describe them."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..data import repository_root
from ..errors import DfmpcError

__all__ = ["book_data_dir", "load_result", "describe", "provenance", "data_label", "md_table"]


def book_data_dir() -> Path:
    """``book/data`` of the repository: the results the book shows, committed with their provenance."""
    root = repository_root()
    if root is None:
        raise DfmpcError("the dfmpc repository was not found (book/data holds the book's results); clone it, "
                         "e.g. git clone https://github.com/dfmpc/dfmpc, and run from inside it")
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
    return (f"dfmpc experiments {result['experiment']} --{result['preset']}{extra} (seed {result['seed']}; "
            f"committed in book/data/{result['experiment']}.json)")


def provenance(result: dict) -> str:
    """Command, machine, versions, date and data folders of a result (they differ between machines)."""
    d, v = result["device"], result["versions"]
    lines = [f"command: {result['command']}",
             f"device {d['device']} ({d['name']}), {d['threads']} thread(s); {result['wall_s']:.0f} s; "
             f"created {result['created']}",
             "versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]
    lines += [f"data: {r['path']} ({r['images']:,} of {r['available']:,} images)" for r in result["data"]]
    return "\n".join(lines)


def data_label(record: dict | None) -> str:
    """A short description of the data a number was measured on, for the "data" column of the book's tables.

    E.g. "CIFAR-10 test, JPEG copy, 400 of 10,000": which set, whether it is the lossy offline copy (or the
    easier offline ImageNet subset), and how many of its images.
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
    extra = " (fallback: the real set was unavailable)" if record.get("fallback") else ""
    return f"{kind}, {count}{extra}"


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (for ``IPython.display.Markdown``); cells are converted with ``str``."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
