"""Every book chapter in notebooks/ is a MyST-markdown notebook with a committed .ipynb twin.

The .md file is the source (the book builds it); the .ipynb twin carries the outputs (Colab opens
it, nbval compares against it). They are kept in step by ``.ci/sync_notebooks.py``, which runs
``jupytext --sync`` and re-executes the twin. These tests fail when the two have drifted apart.
"""

from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NOT_NOTEBOOKS = {"README.md"}

MD_FILES = sorted(p for p in NOTEBOOKS.glob("*.md") if p.name not in NOT_NOTEBOOKS)
IPYNB_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))


def _code_sources(path: Path) -> list[str]:
    nb = jupytext.read(path)
    return [cell.source.strip() for cell in nb.cells if cell.cell_type == "code"]


def _ids(paths):
    return [p.name for p in paths]


@pytest.mark.parametrize("md", MD_FILES, ids=_ids(MD_FILES))
def test_md_has_ipynb_twin(md: Path) -> None:
    twin = md.with_suffix(".ipynb")
    assert twin.exists(), f"{md.name} has no {twin.name}: run .ci/sync_notebooks.py {md.relative_to(NOTEBOOKS.parent)}"


@pytest.mark.parametrize("ipynb", IPYNB_FILES, ids=_ids(IPYNB_FILES))
def test_ipynb_has_md_source(ipynb: Path) -> None:
    assert ipynb.with_suffix(".md").exists(), f"{ipynb.name} has no .md source in notebooks/"


@pytest.mark.parametrize("md", MD_FILES, ids=_ids(MD_FILES))
def test_md_is_a_myst_notebook(md: Path) -> None:
    meta = jupytext.read(md).metadata
    fmt = meta.get("jupytext", {}).get("text_representation", {}).get("format_name")
    assert fmt == "myst", f"{md.name}: jupytext header missing or not format_name: myst"
    assert meta.get("kernelspec", {}).get("name") == "python3", f"{md.name}: kernelspec python3 missing"


@pytest.mark.parametrize("md", MD_FILES, ids=_ids(MD_FILES))
def test_twin_code_cells_match(md: Path) -> None:
    twin = md.with_suffix(".ipynb")
    if not twin.exists():
        pytest.skip(f"no {twin.name} (reported by test_md_has_ipynb_twin)")
    md_code, nb_code = _code_sources(md), _code_sources(twin)
    assert len(md_code) == len(nb_code), (
        f"{md.name} has {len(md_code)} code cells, {twin.name} has {len(nb_code)}: run .ci/sync_notebooks.py"
    )
    for i, (a, b) in enumerate(zip(md_code, nb_code)):
        assert a == b, f"code cell {i} of {md.name} differs from {twin.name}: run .ci/sync_notebooks.py"


@pytest.mark.parametrize("md", MD_FILES, ids=_ids(MD_FILES))
def test_twin_is_executed(md: Path) -> None:
    """The committed twin carries outputs: every code cell has been run, in order."""
    twin = md.with_suffix(".ipynb")
    if not twin.exists():
        pytest.skip(f"no {twin.name} (reported by test_md_has_ipynb_twin)")
    cells = jupytext.read(twin).cells
    counts = [c.get("execution_count") for c in cells if c.cell_type == "code" and c.source.strip()]
    assert None not in counts, f"{twin.name} has code cells that were never run: run .ci/sync_notebooks.py"
    assert counts == list(range(1, len(counts) + 1)), f"{twin.name} was not run top to bottom in one kernel"
