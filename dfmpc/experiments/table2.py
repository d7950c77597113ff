"""Table 2 of the paper: CIFAR-100. Without a CIFAR-100 test set only what needs no labels is reported."""
from __future__ import annotations

from ..errors import DfmpcError
from .paper import DFMPC_SETTINGS
from .paper import PAPER as _PAPER
from .table1 import not_measured, paper_variants

__all__ = ["NAME", "TITLE", "SETTINGS", "BOOK_OVERRIDES", "PAPER", "run"]

NAME = "table2"
TITLE = "Table 2: CIFAR-100, FP32 vs MP2/6 vs DF-MPC"
PAPER = _PAPER["table2"]
SETTINGS = {
    "quick": {"models": [{"model": "chenyaofo_resnet56_cifar100", "paper_model": None, "images": 1000}], "bits": "2/6",
              "split": "test"},
    "full": {"models": [{"model": "chenyaofo_resnet56_cifar100", "paper_model": None, "images": None},
                        {"model": "resnet56_cifar100", "paper_model": None, "images": None}], "bits": "2/6",
             "split": "test"},
}
# The book's table: every image of the test half, as in the comparison (book/data/compare.json).
BOOK_OVERRIDES = {"models": [{**m, "images": None} for m in SETTINGS["quick"]["models"]]}
MISSING = {"ResNet18": "pytorchcv publishes no CIFAR-100 ResNet-18, and no such weights are available offline",
           "VGG16": "pytorchcv publishes no CIFAR-100 VGG-16, and no such weights are available offline"}


def run(session, cfg: dict) -> dict:
    bits = cfg["bits"]
    variants = paper_variants(bits)
    rows = []
    for entry in cfg["models"]:
        name, images = entry["model"], entry["images"]
        row = {"paper_model": entry["paper_model"], "model": name}
        try:
            session.model(name)
        except DfmpcError as e:
            rows.append({**row, "status": "not measured", "reason": str(e)})
            continue
        try:
            row.update(session.measure(name, "cifar100", images, variants, cfg.get("split")), status="measured",
                       metric="accuracy")
        except DfmpcError as e:
            # No CIFAR-100 test set: run the method, and compare the quantized models with the full-precision
            # one on CIFAR-10 test images (other classes: agreement, never accuracy).
            measured = session.measure(name, "cifar10", images, variants, cfg.get("split"))
            for label in ("fp32", "original", "dfmpc"):
                for k in ("top1", "top5", "loss"):
                    measured["results"][label].pop(k, None)  # CIFAR-10 labels are not CIFAR-100 classes
            row.update(measured, status="agreement only", metric="agreement_with_fp32",
                       reason=f"no CIFAR-100 test set ({e}); agreement with full precision on CIFAR-10 test images "
                              "is NOT an accuracy")
        rows.append(row)
    return {"bits": bits, "dfmpc_settings": DFMPC_SETTINGS, "rows": rows + not_measured(MISSING)}
