"""Tables 3-4 of the paper: ImageNet. Exact model sizes for every row; accuracy where weights and data allow."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import DfmpcError
from ..methods import METHODS
from ..methods.base import Run
from ..models import load_model
from ..plan import plan_layers
from ..size import fp32_size_mb, quantized_size_mb
from .paper import DFMPC_SETTINGS, IMAGENET_ARCHS
from .paper import PAPER as _PAPER

__all__ = ["NAME", "TITLE", "SETTINGS", "BOOK_OVERRIDES", "PAPER", "run", "planned_size_mb"]

NAME = "table34"
TITLE = "Tables 3-4: ImageNet, sizes and top-1"
PAPER = {"table3": _PAPER["table3"], "table4": _PAPER["table4"]}
SETTINGS = {
    "quick": {"standin": "efficientnet_lite0", "standin_bits": ["6/6"], "images": 300, "models": [], "split": "test"},
    "full": {"standin": "efficientnet_lite0", "standin_bits": ["2/6", "3/6", "6/6"], "images": None, "split": "test",
             "models": [["ResNet18", "2/6"], ["ResNet50", "2/6"], ["ResNet101", "2/6"], ["DenseNet121", "3/6"],
                        ["MobileNetV2", "6/6"]]},
}
# The book's table: the stand-in on every image of the test half, as in the comparison (book/data/compare.json).
BOOK_OVERRIDES = {"images": None}


def planned_size_mb(model: nn.Module, bits: str, method: str = "dfmpc", unpaired: str = "high",
                    granularity: str = "tensor") -> float:
    """Model size in MB that ``quantize(model, bits, method)`` would report, computed from the plan and shapes.

    Uses the method's own storage rule for the compensation vectors (one float per input channel of each
    compensated layer for DF-MPC), so it equals ``report.size_mb`` without quantizing anything.
    """
    cls = METHODS[method]
    m = cls(bits, granularity=granularity, unpaired=unpaired)
    plan = plan_layers(model, bits, unpaired, (), None, require_pairs=cls.needs_pairs)
    modules = dict(model.named_modules())
    comp = {}
    if method == "dfmpc":
        for p in plan.pairs:
            low = modules[p.low]
            n = low.out_channels if isinstance(low, nn.Conv2d) else low.out_features
            comp[p.high] = torch.empty(n)
    return quantized_size_mb(model, plan.bits_by_layer(), granularity, m.compensation_storage(comp, Run()))


def _uniform_bits(wbit: str) -> str:
    return wbit if "/" in wbit else f"{wbit}/{wbit}"


def _sizes() -> list[dict]:
    """Our size of every row of the paper's Tables 3-4, from the architectures' shapes (no weights needed)."""
    sizes, built = [], {}
    for table in ("table3", "table4"):
        for arch, method, wbit, size, acc in PAPER[table]:
            if arch not in built:
                built[arch] = load_model(IMAGENET_ARCHS[arch], pretrained=False)[0]
            model = built[arch]
            bits = _uniform_bits(wbit)
            if method == "Full-precision":
                ours, how = fp32_size_mb(model), "parameters x 32 bits"
            elif method == "DF-MPC":
                ours = planned_size_mb(model, bits, "dfmpc")
                how = "our DF-MPC plan (pairs low, all other layers high bits), scales and c at 32 bits"
            else:
                ours = planned_size_mb(model, bits, "original")
                how = f"every weight layer at {wbit} bits, one 32-bit scale per tensor, BN at 32 bits"
            row = {"table": table, "model": arch, "pytorchcv": IMAGENET_ARCHS[arch], "method": method, "wbit": wbit,
                   "paper_size_mb": size, "paper_top1": acc, "size_mb": ours, "size_rule": how}
            if method == "DF-MPC":
                row["size_mb_unpaired_low"] = planned_size_mb(model, bits, "dfmpc", unpaired="low")
                plan = plan_layers(model, bits)
                modules = dict(model.named_modules())
                n_low = sum(modules[a.name].weight.numel() for a in plan.layers if a.role == "low")
                row["low_weight_fraction"] = n_low / sum(modules[a.name].weight.numel() for a in plan.layers)
                row["pairs"] = len(plan.pairs)
            sizes.append(row)
    return sizes


def run(session, cfg: dict) -> dict:
    accuracy = []
    for arch, bits in cfg["models"]:  # the paper's models (full preset: pytorchcv weights + real ImageNet)
        name = IMAGENET_ARCHS[arch]
        row = {"paper_model": arch, "model": name, "bits": bits}
        try:
            variants = [("original", "original", bits, {}), ("dfmpc", "dfmpc", bits, dict(DFMPC_SETTINGS))]
            row.update(session.measure(name, "imagenet", cfg["images"], variants, cfg.get("split")), status="measured")
        except DfmpcError as e:
            row.update(status="not measured", reason=str(e))
        accuracy.append(row)
    if not cfg["models"]:
        for arch in IMAGENET_ARCHS:
            accuracy.append({"paper_model": arch, "model": IMAGENET_ARCHS[arch], "status": "not measured",
                             "reason": "quick preset: pytorchcv's ImageNet weights cannot be downloaded offline and a "
                                       "CPU is too slow for the full validation set; run dfmpc experiments table34 "
                                       "--full on a GPU with --data-dir imagenet=DIR"})
    standin = cfg["standin"]
    row = {"paper_model": None, "model": standin, "role": "offline stand-in (not a model of the paper)"}
    try:
        variants = []
        for bits in cfg["standin_bits"]:
            variants += [(f"original {bits}", "original", bits, {}), (f"dfmpc {bits}", "dfmpc", bits, dict(DFMPC_SETTINGS))]
        row.update(session.measure(standin, "imagenet", cfg["images"], variants, cfg.get("split")), status="measured")
    except DfmpcError as e:
        row.update(status="not measured", reason=str(e))
    return {"sizes": _sizes(), "accuracy": accuracy, "standin": row}
