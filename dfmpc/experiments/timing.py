"""How long DF-MPC takes: quantize + compensate a loaded model, evaluation excluded.

The paper reports 2 s for ResNet-18 on a GTX 1080 Ti and ZeroQ's 12 s on 8 V100s (Section 5.2).
:func:`time_quantize` (and ``dfmpc benchmark``) times :func:`dfmpc.quantize` on a model whose weights are
already in memory: one cold call (the first in the process, with PyTorch's lazy initialisations), then
the median and minimum of ``repeat`` warm calls. The time does not depend on the weight values, so a
model whose pretrained weights cannot be had offline is timed with random weights (the output says which).
"""
from __future__ import annotations

import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..api import quantize
from ..errors import DfmpcError
from ..models import load_model
from .paper import DFMPC_SETTINGS
from .paper import PAPER as _PAPER
from .provenance import device_name

__all__ = ["NAME", "TITLE", "SETTINGS", "PAPER", "STARTUP_COMMANDS", "run", "time_quantize", "benchmark",
           "startup_seconds"]

NAME = "timing"
TITLE = "Timing: seconds DF-MPC takes per model"
PAPER = _PAPER["timing"]
SETTINGS = {
    "quick": {"models": ["resnet18", "resnet56_cifar10_a"], "bits": "2/6", "repeat": 3},
    "full": {"models": ["resnet18", "resnet50", "resnet101", "densenet121", "mobilenetv2_w1", "resnet56_cifar10_a"],
             "bits": "2/6", "repeat": 5},
}
STARTUP_COMMANDS = (("--help",), ("models",), ("methods",))  # what must answer at once: no torch import
_RANDOM = "random (pretrained weights not available offline; the time does not depend on their values)"


def time_quantize(model, bits="2/6", repeat: int = 5, **settings) -> dict:
    """Cold, median and minimum seconds of ``quantize(model, bits, **settings)`` (the report's own timer)."""
    if repeat < 1:
        raise DfmpcError(f"repeat must be at least 1, got {repeat}")
    _, report = quantize(model, bits, **settings)
    cold = report.seconds
    warm = [quantize(model, bits, **settings)[1].seconds for _ in range(repeat)]
    return {"cold_s": cold, "median_s": statistics.median(warm), "min_s": min(warm), "repeat": repeat,
            "parameters": sum(p.numel() for p in model.parameters()), "pairs": len(report.pairs)}


def _model_or_random(name: str, session=None):
    """(model, where its weights came from): pretrained if they can be had, else random."""
    try:
        model, spec = session.model(name) if session is not None else load_model(name)
        return model, spec.weights or "pretrained"
    except DfmpcError:  # offline: the time does not depend on the values of the weights
        return load_model(name, pretrained=False)[0], _RANDOM


def benchmark(models=("resnet18", "resnet56_cifar10_a"), bits="2/6", repeat: int = 5, device: str = "cpu",
              **settings) -> list[dict]:
    """:func:`time_quantize` for every model in ``models`` on ``device`` (``dfmpc benchmark``)."""
    rows = []
    for name in models:
        model, weights = _model_or_random(name)
        row = {"model": name, "bits": bits, "device": device, "threads": torch.get_num_threads(), "weights": weights}
        row.update(time_quantize(model.to(device), bits, repeat, **settings))
        rows.append(row)
    return rows


def run(session, cfg: dict) -> dict:
    devices = ["cpu"] + ([session.device] if session.device != "cpu" else [])
    rows = []
    for name in cfg["models"]:
        model, weights = _model_or_random(name, session)
        for device in devices:
            row = {"model": name, "weights": weights, "device": device, "device_name": device_name(device),
                   "threads": torch.get_num_threads() if device == "cpu" else None, "bits": cfg["bits"]}
            try:
                net = copy.deepcopy(model).to(device)
                row.update(time_quantize(net, cfg["bits"], cfg["repeat"], **DFMPC_SETTINGS), status="measured")
            except Exception as e:  # a device-specific failure is a result too
                row.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            rows.append(row)
    return {"rows": rows, "repeat": cfg["repeat"]}


def startup_seconds(repeat: int = 5, commands=STARTUP_COMMANDS) -> list[dict]:
    """Wall seconds of ``dfmpc ARGS`` for each of ``commands``, each run ``repeat`` times in a fresh process
    (the console script beside this Python, else ``python -m dfmpc.cli``): the start-up a user waits for."""
    if repeat < 1:
        raise DfmpcError(f"repeat must be at least 1, got {repeat}")
    script = Path(sys.executable).with_name("dfmpc")
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "dfmpc.cli"]
    rows = []
    for args in commands:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            done = subprocess.run([*base, *args], capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                raise DfmpcError(f"`dfmpc {' '.join(args)}` failed with status {done.returncode}: "
                                 f"{(done.stderr.strip().splitlines() or [''])[-1]}")
        rows.append({"command": "dfmpc " + " ".join(args), "median_s": statistics.median(times), "min_s": min(times),
                     "max_s": max(times), "repeat": repeat, "runner": " ".join(base)})
    return rows
