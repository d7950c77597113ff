"""Figure 5 of the paper: loss surfaces before and after compensation (filter-normalised random directions)."""
from __future__ import annotations

import copy

from .measure import batch_of, loss_surface
from .paper import DFMPC_SETTINGS
from .paper import PAPER as _PAPER

__all__ = ["NAME", "TITLE", "SETTINGS", "PAPER", "run"]

NAME = "fig5"
TITLE = "Figure 5: loss surfaces before and after compensation"
PAPER = _PAPER["fig5"]
SETTINGS = {
    "quick": {"model": "resnet20_cifar10_a", "bits": "2/6", "steps": 9, "span": 1.0, "images": 96},
    "full": {"model": "resnet56_cifar10_a", "bits": "2/6", "steps": 21, "span": 1.0, "images": 2000},
}


def run(session, cfg: dict) -> dict:
    name, bits = cfg["model"], cfg["bits"]
    model, spec = session.model(name)
    data, record = session.data("cifar10", spec, cfg["images"])
    images, labels = batch_of(data, len(data))
    models = {"fp32": model, "original": session.quantized(name, "original", bits)[0],
              "dfmpc": session.quantized(name, "dfmpc", bits, **DFMPC_SETTINGS)[0]}
    surfaces = {}
    mid = cfg["steps"] // 2
    for label, net in models.items():
        surf = loss_surface(copy.deepcopy(net), images, labels, steps=cfg["steps"], span=cfg["span"], seed=session.seed,
                            batch_size=128, device=session.device, progress=session.progress, desc=f"surface {label}")
        flat = [v for r in surf["loss"] for v in r]
        centre = surf["loss"][mid][mid]
        surf["summary"] = {"centre_loss": centre, "min_loss": min(flat), "max_loss": max(flat),
                           "mean_rise": sum(flat) / len(flat) - centre, "centre_is_min": centre <= min(flat) + 1e-12,
                           "centre_accuracy": surf["accuracy"][mid][mid]}
        surfaces[label] = surf
    return {"model": name, "weights": spec.weights, "bits": bits, "data": record, "steps": cfg["steps"],
            "span": cfg["span"], "surfaces": surfaces}
