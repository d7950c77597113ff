"""Table 1 of the paper: CIFAR-10, full precision vs direct MP2/6 ("Original") vs DF-MPC MP2/6."""
from __future__ import annotations

from ..errors import DfmpcError
from .paper import DFMPC_SETTINGS
from .paper import PAPER as _PAPER

__all__ = ["NAME", "TITLE", "SETTINGS", "BOOK_OVERRIDES", "PAPER", "run", "paper_variants", "not_measured"]

NAME = "table1"
TITLE = "Table 1: CIFAR-10, FP32 vs MP2/6 vs DF-MPC"
PAPER = _PAPER["table1"]
SETTINGS = {
    "quick": {"models": [{"model": "resnet20_cifar10_a", "paper_model": None, "images": 2000},
                         {"model": "resnet56_cifar10_a", "paper_model": "ResNet56", "images": 1000}],
              "bits": "2/6", "split": "test"},
    "full": {"models": [{"model": "resnet20_cifar10_a", "paper_model": None, "images": None},
                        {"model": "resnet56_cifar10_a", "paper_model": "ResNet56", "images": None},
                        {"model": "resnet20_cifar10", "paper_model": None, "images": None},
                        {"model": "resnet56_cifar10", "paper_model": "ResNet56", "images": None}],
             "bits": "2/6", "split": "test"},
}
# The book's table: every image of the test half, the images and half of the comparison (book/data/compare.json),
# so that a figure for the same model, method and bits is the same number in both.
BOOK_OVERRIDES = {"models": [{**m, "images": None} for m in SETTINGS["quick"]["models"]]}
# The paper's models we cannot measure, and why.
MISSING = {"ResNet18": "pytorchcv (the paper's model source) publishes no CIFAR-10 ResNet-18, and no such weights "
                       "are available offline",
           "VGG16": "pytorchcv publishes no CIFAR-10 VGG-16, and no such weights are available offline"}


def paper_variants(bits: str) -> list:
    """The two quantized columns of the paper's Tables 1-2: direct ("Original") and DF-MPC, at ``bits``."""
    return [("original", "original", bits, {}), ("dfmpc", "dfmpc", bits, dict(DFMPC_SETTINGS))]


def not_measured(missing: dict) -> list[dict]:
    """Rows for the paper's models that cannot be measured here (paper model -> why)."""
    return [{"paper_model": m, "model": None, "status": "not measured", "reason": why} for m, why in missing.items()]


def run(session, cfg: dict) -> dict:
    bits = cfg["bits"]
    rows = []
    for entry in cfg["models"]:
        row = {"paper_model": entry["paper_model"], "model": entry["model"]}
        try:
            row.update(session.measure(entry["model"], "cifar10", entry["images"], paper_variants(bits),
                                       cfg.get("split")), status="measured")
        except DfmpcError as e:
            row.update(status="not measured", reason=str(e))
        rows.append(row)
    return {"bits": bits, "dfmpc_settings": DFMPC_SETTINGS, "rows": rows + not_measured(MISSING)}
