"""How long dfmpc+ takes to quantize, and how that grows with the model: seconds per million parameters.

The comparison (issue 20, item 4) sets two targets for dfmpc+ at 2/6 on one CPU thread with random weights:
under :data:`TARGET_SECONDS` for ResNet-18, and seconds per million parameters within a factor of
:data:`TARGET_SPREAD` of each other from ResNet-18 through ResNet-50 to VGG-16 (with BatchNorm, so that it has
pairs to compensate). :func:`.timing.time_quantize` times ``quantize`` on a model already in memory (no data, no
evaluation): one cold call, then the median and minimum of ``repeat`` warm ones. The time does not depend on the
values of the weights, so every model has random ones (pretrained or not, the same work is done).
"""
from __future__ import annotations

import torch

from ..methods import settings_for_model
from ..models import load_model
from .provenance import device_name
from .session import one_thread
from .timing import time_quantize

__all__ = ["NAME", "TITLE", "BOOK_PRESET", "SETTINGS", "TARGET_SECONDS", "TARGET_SPREAD", "run", "targets"]

NAME = "speed"
TITLE = "Speed: seconds dfmpc+ takes per model and per million parameters, one CPU thread"
BOOK_PRESET = "full"
TARGET_SECONDS = 0.5  # ResNet-18 at 2/6, one CPU thread
TARGET_SPREAD = 2.0  # the largest seconds per million parameters over the smallest
SETTINGS = {
    "quick": {"models": ["resnet20_cifar10_a"], "bits": "2/6", "repeat": 1, "method": "dfmpc+"},
    "full": {"models": ["resnet18", "resnet50", "bn_vgg16"], "bits": "2/6", "repeat": 3, "method": "dfmpc+"},
}


def run(session, cfg: dict) -> dict:
    rows = []
    for name in cfg["models"]:
        torch.manual_seed(session.seed)  # the random weights (the time does not depend on them)
        model, spec = load_model(name, pretrained=False)
        settings = settings_for_model(cfg["method"], spec)
        with one_thread():
            timed = time_quantize(model, cfg["bits"], cfg["repeat"], method=cfg["method"], **settings)
        rows.append({"model": name, "method": cfg["method"], "bits": cfg["bits"], "weights": "random",
                     "device": "cpu", "device_name": device_name("cpu"), "threads": 1, "settings": settings, **timed,
                     "seconds_per_mparameter": timed["median_s"] / (timed["parameters"] / 1e6)})
    return {"rows": rows}


def targets(data: dict) -> list[dict]:
    """The two targets, each with what was measured (``measured``, and ``shown`` with its unit) and whether it is
    met: ResNet-18 under :data:`TARGET_SECONDS` (median), and the spread of seconds per million parameters within
    :data:`TARGET_SPREAD`. A target whose models were not run is left out."""
    rows = {r["model"]: r for r in data["results"]["rows"]}
    out = []
    if "resnet18" in rows:
        s = rows["resnet18"]["median_s"]
        out.append({"target": f"ResNet-18 at {rows['resnet18']['bits']} in under {TARGET_SECONDS:g} s",
                    "measured": s, "shown": f"{s:.2f} s", "met": s < TARGET_SECONDS})
    if len(rows) > 1:
        per = [r["seconds_per_mparameter"] for r in rows.values()]
        spread = max(per) / min(per)
        out.append({"target": f"seconds per million parameters within {TARGET_SPREAD:g}x of each other",
                    "measured": spread, "shown": f"{spread:.2f}x", "met": spread <= TARGET_SPREAD})
    return out
