"""One number per fact: a figure for the same model, method, bits and split is the same committed result on every
page, and every figure the README quotes comes from, or is asserted against, a committed JSON."""
import json
import re
from pathlib import Path

import pytest

from dfmpc.experiments import compare, load_result

ROOT = Path(__file__).resolve().parents[1]
COMPARE = load_result("compare", ROOT / "book" / "data")
README = " ".join((ROOT / "README.md").read_text().split())


def compare_entry(model):
    return next(e for e in COMPARE["results"]["models"] if e["model"] == model)


def same_images(record, model):
    """The record names the comparison's images: the same half, every image of it."""
    theirs = compare_entry(model)["data"]
    return (record["split"], record["images"], record["path"]) == (theirs["split"], theirs["images"], theirs["path"])


@pytest.mark.parametrize("name", ["table1", "table2"])
def test_the_papers_cifar_tables_are_the_comparisons_figures(name):
    """Tables 1-2 are measured on the comparison's test half: fp32, original and dfmpc at 2/6 are its numbers."""
    result = load_result(name, ROOT / "book" / "data")
    rows = [r for r in result["results"]["rows"] if r["status"] in ("measured", "agreement only")]
    assert rows
    for row in rows:
        assert same_images(row["data"], row["model"]), (name, row["model"], row["data"]["images"])
        field = "top1" if row["status"] == "measured" else "agreement_with_fp32"
        assert row["results"]["fp32"].get(field, 100.0) == (compare_entry(row["model"])["fp32"].get(field) or 100.0)
        for method in ("original", "dfmpc"):
            assert row["results"][method][field] == compare.figure(COMPARE, row["model"], "2/6", method, field), \
                (name, row["model"], method)


def test_the_stand_in_of_tables_3_4_is_the_comparisons_figure():
    standin = load_result("table34", ROOT / "book" / "data")["results"]["standin"]
    model = standin["model"]
    assert same_images(standin["data"], model)
    assert standin["results"]["fp32"]["top1"] == compare_entry(model)["fp32"]["top1"]
    for key, q in standin["results"].items():
        if key != "fp32":
            method, bits = key.split()
            assert q["top1"] == compare.figure(COMPARE, model, bits, method), key


def test_the_readme_main_command_quotes_its_committed_result():
    """The main command's figures and the saved file's size are those of book/data/main_command.json, which is
    the README's command run with --json (and --save), and they are the comparison's figures for ResNet-56."""
    main = json.loads((ROOT / "book" / "data" / "main_command.json").read_text())
    command = re.search(r"\.venv/bin/dfmpc quantize ([^\n`]*)", (ROOT / "README.md").read_text()).group(1).strip()
    assert main["command"] == f"dfmpc quantize {command} --save q.dfmpc --json main_command.json"
    top1 = {r["method"]: r["top1"] for r in main["results"]}
    model = main["model"]
    assert main["data"]["split"] == "test" and same_images(main["data"], model)
    quoted = (f"full precision {main['fp32']['top1']:.2f} %" if "fp32" in main else None)
    assert quoted is None or quoted in README
    for method in ("original", "dfmpc", "dfmpc+"):
        assert f"`{method}` {top1[method]:.2f} %" in README, method
        assert top1[method] == pytest.approx(compare.figure(COMPARE, model, "2/6", method), abs=1e-9), method
    assert f"{main['saved']['bytes']:,} bytes" in README
