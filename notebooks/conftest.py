"""How pytest checks the book's notebooks, so that a plain ``pytest --nbval`` needs no flags.

* nbval compares outputs after the substitutions in ``nbval_sanitize.cfg`` (timings, addresses, ...),
  unless ``--nbval-sanitize-with`` names another file.
* Kernels run with ``notebooks/`` as working directory: a relative ``DFMPC_SHARED`` is made absolute here,
  as meant from where pytest was started (dfmpc would also find it from the repository root).
* The committed outputs were made on the offline data folder (``../shared``); where there is none (a fork's
  CI, say), the notebooks are skipped with that reason instead of failing cell by cell.
"""
import os
from pathlib import Path

import pytest

SANITIZE = Path(__file__).resolve().parent / "nbval_sanitize.cfg"


def pytest_configure(config):
    option = config.option
    if getattr(option, "nbval_sanitize_with", "absent") is None and not getattr(option, "sanitize_with", None):
        option.nbval_sanitize_with = str(SANITIZE)
    shared = os.environ.get("DFMPC_SHARED", "")
    if shared and shared.lower() != "none" and not Path(shared).is_absolute() and (Path.cwd() / shared / "data").is_dir():
        os.environ["DFMPC_SHARED"] = str((Path.cwd() / shared).resolve())


def pytest_collection_modifyitems(config, items):
    notebooks = [item for item in items if item.path.suffix == ".ipynb"]
    if not notebooks:
        return
    from dfmpc.data import shared_dir
    from dfmpc.errors import DfmpcError

    try:
        found = shared_dir()
    except DfmpcError as e:
        raise pytest.UsageError(str(e)) from None
    if found is None:
        skip = pytest.mark.skip(reason="the offline data folder (../shared or $DFMPC_SHARED) is absent; the "
                                       "notebooks' stored outputs were made on it")
        for item in notebooks:
            item.add_marker(skip)
