"""How long DF-MPC takes: quantize + compensate a loaded model, evaluation excluded.

The paper reports 2 s for ResNet-18 on a GTX 1080 Ti and ZeroQ's 12 s on 8 V100s (Section 5.2).
``dfmpc benchmark`` times :func:`dfmpc.quantize` on models whose weights are already in memory:
one cold call (the first in the process, with PyTorch's lazy initialisations), then the median and
minimum of ``repeat`` warm calls. The time does not depend on the weight values, so a model whose
pretrained weights cannot be had offline is timed with random weights (the output says which).
"""
from __future__ import annotations

import statistics
import time

import torch

from .api import quantize
from .errors import DfmpcError
from .models import load_model


def time_quantize(model, bits="2/6", repeat: int = 5, **settings) -> dict:
    """Cold, median and minimum seconds of ``quantize(model, bits, **settings)`` (the report's own timer)."""
    if repeat < 1:
        raise DfmpcError(f"repeat must be at least 1, got {repeat}")
    _, report = quantize(model, bits, **settings)
    cold = report.seconds
    warm = [quantize(model, bits, **settings)[1].seconds for _ in range(repeat)]
    return {"cold_s": cold, "median_s": statistics.median(warm), "min_s": min(warm), "repeat": repeat,
            "parameters": sum(p.numel() for p in model.parameters()), "pairs": len(report.pairs)}


def benchmark(models=("resnet18", "resnet56_cifar10_a"), bits="2/6", repeat: int = 5, device: str = "cpu") -> list[dict]:
    rows = []
    for name in models:
        try:
            model, spec = load_model(name)
            weights = spec.weights or "pretrained"
        except DfmpcError:  # offline: the time does not depend on the values of the weights
            model, spec = load_model(name, pretrained=False)
            weights = "random (pretrained weights not available offline)"
        model = model.to(device)
        row = {"model": name, "bits": bits, "device": device, "threads": torch.get_num_threads(), "weights": weights}
        row.update(time_quantize(model, bits, repeat))
        rows.append(row)
    return rows
