"""The W/A comparison (wa) and the engine measurements (engine): a tiny run of each, their views, and the book's data."""
from pathlib import Path

import pytest

from dfmpc import experiments
from dfmpc.errors import DfmpcError
from dfmpc.experiments import wa

ROOT = Path(__file__).resolve().parent.parent


def test_parse_config():
    assert wa.parse_config("W2/6-A8") == ("2/6", 8, "dfq")
    assert wa.parse_config("W4-A4 mse") == ("4/4", 4, "mse")
    for bad in ("W4A4", "A8-W4", "W9-A8"):
        with pytest.raises(DfmpcError, match="a W/A config reads like"):
            wa.parse_config(bad)


def test_wa_and_engine_run_tiny(shared):
    result = experiments.run_experiment("wa", "quick", images=4, overrides={"methods": ["original", "dfmpc+"],
                                                                           "configs": ["W2/6-A8", "W4-A4"]})
    rows = result["results"]["rows"]
    assert [(r["config"], r["method"]) for r in rows] == [("W2/6-A8", "original"), ("W2/6-A8", "dfmpc+"),
                                                          ("W4-A4", "original"), ("W4-A4", "dfmpc+")]
    assert all(r["images"] == 4 and r["weights_only_top1"] is not None for r in rows)
    header, table = wa.format_table(result, "resnet20_cifar10_a")
    assert header == ["config", "original", "dfmpc+"] and [t[0] for t in table] == ["W2/6-A8", "W4-A4"]
    engine = experiments.run_experiment("engine", "quick", images=4, overrides={"repeats": 1})["results"]["models"][0]
    assert engine["size_bytes"]["quantized"] < engine["size_bytes"]["fp32"] / 3  # int8 codes against float32
    assert engine["kernels"]["quantized"]["integer"]["QLinearConv"] == 19 and not engine["kernels"]["quantized"]["float"]
    assert engine["kernels"]["fp32"]["float"]["Conv"] == 19 and not engine["kernels"]["fp32"]["integer"]
    assert set(engine["latency"]) == {"fp32_b1", "fp32_b32", "quantized_b1", "quantized_b32"}


def test_the_books_engine_and_wa_results_meet_the_issues_targets():
    """book/data/engine.json: onnxruntime within 0.1 points of dfmpc's simulation with >= 99 % per-image agreement, on
    the whole test half, and the quantized model ran integer kernels only; wa.json: every method x config once."""
    engine = experiments.load_result("engine", ROOT / "book" / "data")
    for m in engine["results"]["models"]:
        assert m["images"] == 5000
        assert abs(m["top1"]["quantized_onnxruntime"] - m["top1"]["quantized_dfmpc"]) <= 0.1, m["model"]
        assert m["agreement"]["quantized"] >= 99.0 and m["agreement"]["fp32"] == 100.0
        assert m["kernels"]["quantized"]["integer"] and not m["kernels"]["quantized"]["float"]
    result = experiments.load_result("wa", ROOT / "book" / "data")
    res = result["results"]
    cells = [(r["model"], r["config"], r["method"]) for r in res["rows"]]
    assert len(cells) == len(set(cells)) == len(res["models"]) * len(res["configs"]) * len(res["methods"])
