"""The book as its readers get it: one setup cell and one repository URL, legible figures, offline equations,
and a Pages workflow that installs what the chapters import.

What only a browser sees (rendered formulas, stderr blocks, widths) is checked on the built pages by
.ci/check_book_html.py; these tests check the sources, fast, everywhere.
"""
import re
from pathlib import Path

import jupytext
import pytest

from dfmpc.experiments.book import SETUP_CELL, repository_url

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p for p in (ROOT / "notebooks").glob("*.md") if p.name != "README.md")
URL = re.compile(r"https?://github\.com/dfmpc/[\w.-]+")


def _ids(paths):
    return [p.name for p in paths]


def _extras(command: str) -> set[str]:
    """The extras a `pip install -e ".[a,b]"` in ``command`` names."""
    match = re.search(r'-e\s+"?\.\[([\w,\s-]+)\]', command)
    return {e.strip() for e in match.group(1).split(",")} if match else set()


def test_the_repository_url_is_the_configs_everywhere():
    url = repository_url()
    assert url in (ROOT / "_config.yml").read_text()
    assert f'Repository = "{url}"' in (ROOT / "pyproject.toml").read_text()
    files = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in {".md", ".py", ".yml", ".toml", ".ipynb"}
             and not {".venv", "_build", ".git", "results"} & set(p.relative_to(ROOT).parts)]
    others = {(str(p.relative_to(ROOT)), u) for p in files for u in URL.findall(p.read_text()) if u != url}
    assert not others, f"another spelling of the repository URL than _config.yml's {url}: {sorted(others)}"


@pytest.mark.parametrize("md", CHAPTERS, ids=_ids(CHAPTERS))
def test_every_chapter_starts_with_the_setup_cell(md):
    first = next(c for c in jupytext.read(md).cells if c.cell_type == "code")
    assert first.source.strip() == SETUP_CELL.format(url=repository_url()).strip(), (
        f"{md.name}: the first code cell is not the book's setup cell; run .ci/sync_notebooks.py {md.name}")
    assert "hide-input" in first.metadata.get("tags", []), f"{md.name}: the setup cell should be hidden (hide-input)"


@pytest.mark.parametrize("md", CHAPTERS + [ROOT / "dfmpc" / "visualize.py"],
                         ids=_ids(CHAPTERS + [ROOT / "dfmpc" / "visualize.py"]))
def test_figures_keep_their_text_legible_at_the_page_width(md):
    # The content column is about 676 px wide; matplotlib draws 100 px per inch. A figure wider than
    # 6.75 in is shrunk to fit, and with it every font; no text is set below 9 pt to begin with.
    text = md.read_text()
    wide = [float(w) for w in re.findall(r"figsize=\((\d+(?:\.\d+)?),", text) if float(w) > 6.75]
    small = [int(s) for s in re.findall(r"fontsize=(\d+)\b", text) if int(s) < 9]
    assert not wide, f"{md.name}: figures {wide} in wide; at most 6.75 in (arrange panels in rows instead)"
    assert not small, f"{md.name}: font sizes {small} pt; at least 9"


def test_display_math_never_puts_a_tag_inside_a_split():
    # Sphinx wraps a $$ block that holds "\\" in a split environment, where MathJax rejects \tag
    for md in CHAPTERS:
        for block in re.findall(r"\$\$(.*?)\$\$", md.read_text(), re.S):
            assert not ("\\\\" in block and "\\tag" in block), (
                f"{md.name}: a $$ block with both \\\\ and \\tag renders as a TeX error; use \\begin{{equation}}")


def test_the_book_serves_mathjax_itself():
    config = (ROOT / "_config.yml").read_text()
    assert re.search(r"^\s+offline_mathjax: book/_ext", config, re.M), "the offline MathJax extension is not loaded"
    assert (ROOT / "book" / "_ext" / "offline_mathjax.py").is_file()


def test_the_pages_workflow_installs_every_extra_the_chapters_need():
    readme = (ROOT / "README.md").read_text()
    test_command = next(line for line in readme.splitlines() if "pytest --nbval" in line and "pip install" in line)
    needed = _extras(test_command) - {"test"}  # what runs every chapter, less the test tools
    workflow = (ROOT / ".github" / "workflows" / "book.yml").read_text()
    installs = [line for line in workflow.splitlines() if "pip install" in line]
    installed = set().union(*(_extras(line) for line in installs))
    assert needed and needed <= installed, f"the Pages workflow installs {installed}; the chapters need {needed}"


def test_the_introductions_headline_numbers_are_measured_and_quoted_right():
    """The intro's "In brief" quotes the paper's Table 1 and our full comparison (book/data/compare.json)."""
    from dfmpc.experiments import load_result
    from dfmpc.experiments.paper import PAPER
    from dfmpc.methods import METHODS

    intro = " ".join((ROOT / "book" / "intro.md").read_text().split())
    paper = PAPER["table1"]["ResNet56"]
    assert (f"the paper reports {paper['dfmpc']:.2f} % against {paper['original']:.2f} % for direct quantization "
            f"(fp32 {paper['fp32']:.2f} %)") in intro
    entry = next(e for e in load_result("compare")["results"]["models"] if e["model"] == "resnet56_cifar10_a")
    top1 = {(r["method"], r["bits"]): r["top1"] for r in load_result("compare")["results"]["rows"]
            if r["model"] == "resnet56_cifar10_a"}
    assert entry["images"] == 5000 and entry["data"]["split"] == "test"
    assert (f"we measure {top1[('dfmpc', '2/6')]:.2f} % against {top1[('original', '2/6')]:.2f} % "
            f"(fp32 {entry['fp32']['top1']:.2f} %, the 5,000 test-half images") in intro
    assert f"reaches {top1[('dfmpc+', '2/6')]:.2f} % on the same images" in intro
    data_free = [m for m, cls in METHODS.items() if m not in ("original", "dfmpc", "dfmpc+") and not cls.uses_synthetic_data]
    best = max(data_free, key=lambda m: top1[(m, "2/6")])
    assert f"(best: {best.upper() if best == 'dfq' else best}, {top1[(best, '2/6')]:.2f} %)" in intro
    assert f"synthetic images reaches {top1[('zeroq', '2/6')]:.2f} %" in intro


def test_the_readme_links_the_published_book_and_its_api_reference():
    """The Pages address is derived from the one repository URL of _config.yml (book.yml deploys there)."""
    from dfmpc.experiments.book import pages_url, repository_url

    assert repository_url() == "https://github.com/dfmpc/dfmpc" and pages_url() == "https://dfmpc.github.io/dfmpc/"
    readme = (ROOT / "README.md").read_text()
    assert f"<{pages_url()}>" in readme and f"{pages_url()}book/api.html" in readme
    assert "upload-pages-artifact" in (ROOT / ".github" / "workflows" / "book.yml").read_text()


def test_colab_links_have_no_dot_segment():
    """sphinx-book-theme puts path_to_book between the branch and the notebook: "." gave .../blob/main/./notebooks."""
    import yaml

    repository = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    assert repository.get("path_to_book", "").strip("/") in ("", None), repository


def test_the_api_reference_documents_every_public_name():
    import dfmpc

    page = (ROOT / "book" / "api.md").read_text()
    for name in dfmpc.__all__:
        entry = re.search(rf"^\.\. (auto\w+|py:data):: {name}$", page, re.M)
        assert entry, f"{name} has no entry in book/api.md"
        if entry.group(1) != "py:data":  # data has no docstring of its own: its entry is written by hand
            assert re.search(rf"^   {name}$", page, re.M), f"{name} is missing from the summary of book/api.md"
    assert "file: book/api" in (ROOT / "_toc.yml").read_text()
    assert "(../book/api.md)" in (ROOT / "notebooks" / "usage.md").read_text(), "the usage chapter links the API reference"


def test_the_comparison_chapter_quotes_its_own_run_time():
    from dfmpc.experiments import load_result

    minutes = round(load_result("compare")["wall_s"] / 60)
    text = " ".join((ROOT / "notebooks" / "comparison.md").read_text().split())
    assert f"on a 2-core CPU ({minutes} minutes;" in text, f"book/data/compare.json took {minutes} minutes"


def test_no_committed_result_names_a_path_of_the_machine_that_made_it():
    """Weights and data are named relative to the offline data folder ($DFMPC_SHARED/...) or to site-packages."""
    import json

    def strings(o):
        if isinstance(o, dict):
            for v in o.values():
                yield from strings(v)
        elif isinstance(o, list):
            for v in o:
                yield from strings(v)
        elif isinstance(o, str):
            yield o

    for path in sorted((ROOT / "book" / "data").glob("*.json")):
        absolute = [s for s in strings(json.loads(path.read_text())) if re.match(r"/\w", s) or " /home/" in s
                    or " /work/" in s]
        assert not absolute, f"{path.name}: {absolute[:3]}"
