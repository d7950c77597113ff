"""Where things are: the repository, the offline data folder and its data sets. No torch, so that
``dfmpc models`` can say what is available without importing it."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DfmpcError

__all__ = ["DATASETS", "SHARED_DATA_DIRS", "repository_root", "shared_dir", "default_data_dir", "download_dir"]

DATASETS = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
SHARED_DATA_DIRS = {"cifar10": "data/cifar10/test_jpeg", "imagenet": "data/imagenet/val_subset"}


def repository_root() -> Path | None:
    """The dfmpc repository this code runs from (an editable install or a checkout), else None.

    Looked for above this package's own folder first, then above the working directory (a notebook runs
    in ``notebooks/``, a test in the repository root or below).
    """
    for start in (Path(__file__).resolve().parents[1], Path.cwd().resolve()):
        for folder in (start, *start.parents):
            if (folder / "pyproject.toml").is_file() and (folder / "dfmpc" / "__init__.py").is_file():
                return folder
    return None


def shared_dir() -> Path | None:
    """The offline data folder (the one holding ``data/``), or None where there is none.

    * ``$DFMPC_SHARED`` if set. A relative path is taken from the working directory, else from the
      repository root: ``DFMPC_SHARED=../shared`` typed in the repository root still works in a notebook,
      whose kernel runs in ``notebooks/``. A value that names no such folder is an error, not a silent
      download. ``DFMPC_SHARED=none`` ignores the offline folder (everything is downloaded).
    * Otherwise ``../shared`` beside the repository, if it exists.
    """
    env = os.environ.get("DFMPC_SHARED", "").strip()
    root = repository_root()
    if env.lower() == "none":
        return None
    if env:
        given = Path(env).expanduser()
        tried = [given] if given.is_absolute() else [Path.cwd() / given] + ([root / given] if root else [])
        for folder in tried:
            if (folder / "data").is_dir():
                return folder.resolve()
        raise DfmpcError(f"DFMPC_SHARED={env!r} is not the offline data folder (no data/ in "
                         f"{' or '.join(str(t.resolve()) for t in tried)}); fix the path, or unset it to use "
                         "../shared beside the repository, or set it to none to download")
    if root is not None and (root.parent / "shared" / "data").is_dir():
        return (root.parent / "shared").resolve()
    return None


def default_data_dir(name: str) -> Path | None:
    """The offline copy of data set ``name`` in :func:`shared_dir`, or None if there is none."""
    shared = shared_dir()
    sub = SHARED_DATA_DIRS.get(name.lower())
    return shared / sub if shared is not None and sub else None


def download_dir(name: str) -> Path:
    """Where torchvision's CIFAR test set is downloaded to when no folder is given and there is no offline copy."""
    return Path.home() / ".cache" / "dfmpc" / name
