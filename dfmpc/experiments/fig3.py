"""Figure 3 of the paper: the lambda_1 / lambda_2 sweep of DF-MPC on ResNet-56, CIFAR-10."""
from __future__ import annotations

from .paper import PAPER as _PAPER
from .session import c_summary

__all__ = ["NAME", "TITLE", "SETTINGS", "PAPER", "run"]

NAME = "fig3"
TITLE = "Figure 3: lambda_1 / lambda_2 sweep"
PAPER = _PAPER["fig3"]
_GRID = {"lambda1": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "lambda2": [0.0, 0.002, 0.004, 0.006, 0.008, 0.01]}
SETTINGS = {
    "quick": {"model": "resnet56_cifar10_a", "bits": ["2/6", "3/6"], "images": 250, **_GRID,
              "lambda1_beyond": [1.0, 10.0]},
    "full": {"model": "resnet56_cifar10_a", "bits": ["2/6", "3/6"], "images": None, **_GRID,
             "lambda1_beyond": [1.0, 3.0, 10.0]},
}


def run(session, cfg: dict) -> dict:
    name, images = cfg["model"], cfg["images"]
    out = {"model": name, "sweeps": {}}
    for bits in cfg["bits"]:
        base = session.measure(name, "cifar10", images, [("original", "original", bits, {})])
        out["data"] = base["data"]
        sweep = {"fp32": base["results"]["fp32"]["top1"], "original": base["results"]["original"]["top1"]}

        def point(l1, l2):
            pred, _ = session.predict(name, "cifar10", images, "dfmpc", bits, settings={"lambda1": l1, "lambda2": l2})
            _, report = session.quantized(name, "dfmpc", bits, lambda1=l1, lambda2=l2)
            return {"lambda1": l1, "lambda2": l2, "top1": pred.top1_accuracy(), **c_summary(report)}

        sweep["lambda1"] = [point(l1, 0.0) for l1 in cfg["lambda1"]]
        sweep["lambda2"] = [point(0.5, l2) for l2 in cfg["lambda2"]]
        # beyond the paper's range: lambda1 -> infinity gives c -> 1, i.e. direct quantization
        sweep["lambda1_beyond"] = [point(l1, 0.0) for l1 in cfg["lambda1_beyond"]]
        for key in ("lambda1", "lambda2"):
            accs = [r["top1"] for r in sweep[key]]
            best = max(sweep[key], key=lambda r: r["top1"])  # the first of equals
            sweep[f"best_{key}"] = best[key] if max(accs) > min(accs) else None  # None: all equal
        out["sweeps"][bits] = sweep
    return out
