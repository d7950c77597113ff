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
    args = re.search(r"\.venv/bin/dfmpc quantize ([^\n`]*)", (ROOT / "README.md").read_text()).group(1).strip()
    assert main["command"].startswith(f"dfmpc quantize {args} ") and "--save q.dfmpc" in main["command"]
    rows = {r["method"]: r for r in main["results"]}
    model = main["model"]
    assert main["data"]["split"] == "test" and same_images(main["data"], model)
    assert f"full precision {rows['fp32']['top1']:.2f} %" in README
    assert rows["fp32"]["top1"] == compare_entry(model)["fp32"]["top1"]
    for method in ("original", "dfmpc", "dfmpc+"):
        assert f"`{method}` {rows[method]['top1']:.2f} %" in README, method
        assert rows[method]["top1"] == pytest.approx(compare.figure(COMPARE, model, "2/6", method), abs=1e-9), method
    saved = main["saved"]
    assert saved["method"] == "dfmpc+" and saved["bits"] == "2/6"
    assert (f"that is {saved['bytes']:,} bytes ({saved['bytes'] / 2**20:.2f} MB), against "
            f"{rows['dfmpc+']['size_mb']:.2f} MB in the report") in README
    assert f"and {rows['fp32']['size_mb']:.2f} MB in full precision" in README


def test_the_readme_verdict_quotes_the_comparison():
    """The figures of the README's verdict under the table, each computed from book/data/compare.json."""
    r20, r56 = "resnet20_cifar10_a", "resnet56_cifar10_a"
    models = {e["model"]: e for e in COMPARE["results"]["models"]}
    se = [compare.standard_error(50.0, models[m]["images"]) for m in (r20, "efficientnet_lite0")]
    assert f"standard error at most {se[0]:.2f} points; 650 ImageNet-subset images, at most {se[1]:.2f} points" in README
    gaps = {b: compare.figure(COMPARE, r56, b, "squant") - compare.figure(COMPARE, r56, b) for b in ("3/6", "4/6")}
    assert round(gaps["3/6"], 2) == round(gaps["4/6"], 2)
    assert f"SQuant is {gaps['3/6']:.2f} points ahead of it at 3/6 and 4/6 (within one standard error)" in README
    assert gaps["3/6"] < compare.standard_error(compare.figure(COMPARE, r56, "3/6"), models[r56]["images"])
    resnet_rows = [r for r in COMPARE["results"]["rows"] if r["model"] in (r20, r56)]
    zeroq = [r["quantize_seconds"] for r in resnet_rows if r["method"] == "zeroq"]
    plus = [r["quantize_seconds"] for r in resnet_rows if r["method"] == "dfmpc+"]
    assert f"taking {min(zeroq):.0f}-{max(zeroq):.0f} s per ResNet" in README
    assert f"against {min(plus):.1f}-{max(plus):.1f} s for `dfmpc+`" in README
    share = {m: 100 * compare.figure(COMPARE, m, "2/6") / models[m]["fp32"]["top1"] for m in (r20, r56)}
    assert f"`dfmpc+` keeps {share[r20]:.1f} % (ResNet-20) and {share[r56]:.1f} % (ResNet-56) of full precision" in README


def test_the_readme_engine_figures_are_the_committed_engine_result():
    """The README's onnxruntime paragraph (its command's model, ResNet-56 at W2/6-A8) quotes book/data/engine.json."""
    engine = load_result("engine", ROOT / "book" / "data")
    r56 = next(m for m in engine["results"]["models"] if m["model"] == "resnet56_cifar10_a")
    assert (engine["results"]["method"], engine["results"]["bits"], engine["results"]["act_bits"]) == ("dfmpc+", "2/6", 8)
    assert "--bits 2/6 --act-bits 8 --method dfmpc+ --split test --export r56.onnx" in README
    kernels = r56["kernels"]["quantized"]
    assert not kernels["float"], "the README says integer kernels only"
    mb = {k: v / 2**20 for k, v in r56["size_bytes"].items()}
    assert (f"On the test half ({r56['images']:,} JPEG images), one CPU thread: onnxruntime "
            f"{r56['top1']['quantized_onnxruntime']:.2f} % top-1, dfmpc's simulation {r56['top1']['quantized_dfmpc']:.2f} %, "
            f"the same class on {r56['agreement']['quantized']:.2f} % of the images") in README
    integer = kernels["integer"]
    assert (f"({integer['QLinearConv']} `QLinearConv`, {integer['QLinearAdd']} `QLinearAdd`, one `QGemm`), from a "
            f"{mb['quantized']:.2f} MB file (fp32 ONNX: {mb['fp32']:.2f} MB)") in README and integer["QGemm"] == 1
