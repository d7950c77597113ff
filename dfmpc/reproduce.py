"""Every experiment of the paper's Section 5, as functions that return JSON-able dicts.

    dfmpc reproduce [--quick | --full] [--out results/quick] [--limit N | --images all] [--device cuda]

``run_all(mode, out)`` runs them all and writes one JSON file per table / figure into ``out``; the book's
experiment chapters read those files (``load_result``), so every number in the book was produced by a
command. Each file records the command, the data (path, number of images, JPEG or not, whether it is an
offline copy), the device, the library versions, the seed, the settings (image limits included), the
paper's own numbers and ours.

Modes:

* ``quick`` (default; CI and nbval): CPU, the offline copies under ``$DFMPC_SHARED`` (CIFAR-10 test set as
  JPEG, 1,300 ImageNet validation images), fixed random subsets of images, coarse grids. A few minutes on
  two cores. The offline data supports **relative** comparisons only (JPEG costs the CIFAR-10 models about
  ten points; the ImageNet subset is easier than the full validation set).
* ``full``: for a GPU and the real data sets: CIFAR-10 / CIFAR-100 test sets through torchvision
  (``--cifar10-dir`` / ``--cifar100-dir`` or a download), ImageNet validation images from
  ``--imagenet-dir`` (``$DFMPC_IMAGENET_DIR``), the paper's pytorchcv models (downloaded), all images, fine
  grids. Whatever cannot be had (no internet, no ImageNet folder) falls back to the offline copy, and the
  JSON says so; rows whose weights cannot be had are recorded as not measured, with the reason.

Overrides for either mode: ``limit`` (every image subset gets N images) or ``images="all"``, ``device``.

Experiments (names of the JSON files): ``table1`` (CIFAR-10), ``table2`` (CIFAR-100), ``table34``
(ImageNet, Tables 3-4, with exact model sizes), ``fig3`` (lambda sweep), ``fig4`` (weight distributions),
``fig5`` (loss surfaces), ``timing`` (seconds per model), ``diagnosis`` (why MP2/6 falls short: per-layer
error growth, single pairs, bits and granularity).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .analysis import (agreement, batch_of, feature_errors, loss_surface, predict, top1, top5, weight_fit,
                       weight_histogram)
from .api import quantize
from .data import default_data_dir, load_dataset
from .errors import DfmpcError
from .methods import METHODS
from .models import load_model
from .plan import parse_bits, plan_layers
from .quantizers import quantize_weight
from .size import fp32_size_mb, quantized_size_mb

__all__ = ["EXPERIMENTS", "MODES", "PAPER", "settings_for", "run_experiment", "run_all", "load_result",
           "planned_size_mb", "describe", "results_dir", "data_label", "md_table"]

SCHEMA = 1
MODES = ("quick", "full")

# --------------------------------------------------------------------------------------------------
# The paper's numbers (Chen et al. 2023, Section 5), verbatim.

PAPER = {
    "table1": {  # CIFAR-10 top-1 %, FP32 / Original MP2/6 / DF-MPC MP2/6
        "ResNet18": {"fp32": 92.61, "original": 10.78, "dfmpc": 89.12},
        "ResNet56": {"fp32": 93.88, "original": 38.03, "dfmpc": 91.05},
        "VGG16": {"fp32": 93.70, "original": 10.00, "dfmpc": 90.48},
    },
    "table2": {  # CIFAR-100
        "ResNet18": {"fp32": 73.62, "original": 1.05, "dfmpc": 64.90},
        "VGG16": {"fp32": 70.09, "original": 3.80, "dfmpc": 64.95},
    },
    # ImageNet: (model, method, W-bit, size MB, top-1 %)
    "table3": [
        ("ResNet18", "Full-precision", "32", 44.59, 71.47), ("ResNet18", "OMSE", "4", 5.58, 64.03),
        ("ResNet18", "GZNQ", "4", 5.58, 64.50), ("ResNet18", "DFQ", "6", 8.36, 66.30),
        ("ResNet18", "DF-MPC", "2/6", 5.48, 66.46),
        ("ResNet50", "Full-precision", "32", 97.49, 76.12), ("ResNet50", "OCS", "4", 12.28, 69.30),
        ("ResNet50", "OMSE", "4", 12.28, 70.06), ("ResNet50", "DF-MPC", "2/6", 10.55, 71.20),
        ("ResNet101", "Full-precision", "32", 170.41, 77.31), ("ResNet101", "OMSE", "4", 21.30, 71.49),
        ("ResNet101", "DF-MPC", "2/6", 18.36, 72.59),
    ],
    "table4": [
        ("DenseNet121", "Full-precision", "32", 31.92, 74.36), ("DenseNet121", "OCS", "4", 4.09, 63.00),
        ("DenseNet121", "OMSE", "4", 4.09, 64.40), ("DenseNet121", "DF-MPC", "3/6", 3.39, 70.02),
        ("MobileNetV2", "Full-precision", "32", 13.37, 73.03), ("MobileNetV2", "GDFQ", "6", 2.50, 70.98),
        ("MobileNetV2", "GZNQ", "6", 2.50, 71.12), ("MobileNetV2", "DFQ", "8", 3.34, 71.20),
        ("MobileNetV2", "DF-MPC", "6", 2.50, 71.29),
    ],
    "fig3": {"model": "ResNet56", "dataset": "CIFAR-10", "bits": "2/6", "lambda1": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
             "lambda2": [0.0, 0.002, 0.004, 0.006, 0.008, 0.01], "best": {"lambda1": 0.5, "lambda2": 0.0},
             "claim": "accuracy rises steadily as lambda1 goes from 0.1 to 0.5 and drops at 0.6; it mainly "
                      "declines as lambda2 goes from 0 to 0.01; lambda1 = 0.5, lambda2 = 0 is best for ResNet56 "
                      "on CIFAR10"},
    "fig4": {"claim": "after compensation the mean of the 6-bit quantized weight distribution approaches zero",
             "layers": ["ResNet56 layer1-2", "ResNet56 layer3-8"]},
    "fig5": {"claim": "before compensation the loss landscape of the quantized model is sharp with no noticeable "
                      "convexity; after compensation it is smooth, flat and convex, like the full-precision "
                      "model's"},
    "timing": {"dfmpc_resnet18_s": 2.0, "dfmpc_device": "one GTX 1080 Ti", "zeroq_resnet18_s": 12.0,
               "zeroq_device": "an 8-V100 system",
               "claim": "DF-MPC of ResNet18 takes only 2 seconds on a single GTX 1080 Ti, or can even run on CPU "
                        "only; ZeroQ of ResNet18 takes 12 seconds on an 8-V100 system"},
}

# The paper's ImageNet architectures and the pytorchcv names of the same architectures.
IMAGENET_ARCHS = {"ResNet18": "resnet18", "ResNet50": "resnet50", "ResNet101": "resnet101",
                  "DenseNet121": "densenet121", "MobileNetV2": "mobilenetv2_w1"}

# --------------------------------------------------------------------------------------------------
# Settings per mode. Every image count is a fixed random subset (seed) of the data set; None = all.

_LAMBDA1 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
_LAMBDA2 = [0.0, 0.002, 0.004, 0.006, 0.008, 0.01]

QUICK = {
    "table1": {"models": [["resnet20_cifar10_a", None, 2000], ["resnet56_cifar10_a", "ResNet56", 1000]],
               "bits": "2/6"},
    "table2": {"models": [["chenyaofo_resnet56_cifar100", None, 1000]], "bits": "2/6"},
    "table34": {"standin": "efficientnet_lite0", "standin_bits": ["6/6"], "images": 300, "models": []},
    "fig3": {"model": "resnet56_cifar10_a", "bits": ["2/6", "3/6"], "images": 250,
             "lambda1": _LAMBDA1, "lambda2": _LAMBDA2, "lambda1_beyond": [1.0, 10.0]},
    "fig4": {"model": "resnet56_cifar10_a", "bits": "2/6", "layers": ["layer1.2.conv2", "layer3.8.conv2"], "bins": 64},
    "fig5": {"model": "resnet20_cifar10_a", "bits": "2/6", "steps": 9, "span": 1.0, "images": 96},
    "timing": {"models": ["resnet18", "resnet56_cifar10_a"], "bits": "2/6", "repeat": 3},
    "diagnosis": {"layer_model": "resnet56_cifar10_a", "layer_bits": ["2/6", "4/6"], "layer_images": 64,
                  "sweep_model": "resnet20_cifar10_a", "sweep_bits": ["2/6", "3/6", "4/6", "6/6"],
                  "sweep_granularity": ["tensor", "channel"], "sweep_images": 400,
                  "pair_model": "resnet20_cifar10_a", "pair_bits": "2/6", "pair_images": 200, "pair_error_images": 64},
}

FULL = {
    "table1": {"models": [["resnet20_cifar10_a", None, None], ["resnet56_cifar10_a", "ResNet56", None],
                          ["resnet20_cifar10", None, None], ["resnet56_cifar10", "ResNet56", None]],
               "bits": "2/6"},
    "table2": {"models": [["chenyaofo_resnet56_cifar100", None, None], ["resnet56_cifar100", None, None]],
               "bits": "2/6"},
    "table34": {"standin": "efficientnet_lite0", "standin_bits": ["2/6", "3/6", "6/6"], "images": None,
                "models": [["ResNet18", "2/6"], ["ResNet50", "2/6"], ["ResNet101", "2/6"], ["DenseNet121", "3/6"],
                           ["MobileNetV2", "6/6"]]},
    "fig3": {"model": "resnet56_cifar10_a", "bits": ["2/6", "3/6"], "images": None,
             "lambda1": _LAMBDA1, "lambda2": _LAMBDA2, "lambda1_beyond": [1.0, 3.0, 10.0]},
    "fig4": dict(QUICK["fig4"]),
    "fig5": {"model": "resnet56_cifar10_a", "bits": "2/6", "steps": 21, "span": 1.0, "images": 2000},
    "timing": {"models": ["resnet18", "resnet50", "resnet101", "densenet121", "mobilenetv2_w1", "resnet56_cifar10_a"],
               "bits": "2/6", "repeat": 5},
    "diagnosis": {"layer_model": "resnet56_cifar10_a", "layer_bits": ["2/6", "3/6", "4/6", "6/6"], "layer_images": 1000,
                  "sweep_model": "resnet56_cifar10_a", "sweep_bits": ["2/6", "3/6", "4/6", "6/6"],
                  "sweep_granularity": ["tensor", "channel"], "sweep_images": None,
                  "pair_model": "resnet20_cifar10_a", "pair_bits": "2/6", "pair_images": None, "pair_error_images": 1000},
}

_IMAGE_KEYS = ("images", "layer_images", "sweep_images", "pair_images", "pair_error_images")
DFMPC_SETTINGS = {"lambda1": 0.5, "lambda2": 0.0}  # the paper's choice (Section 5.1)
CACHE_LIMIT = 12000  # data sets up to this many images are decoded once and kept in memory as tensors


def settings_for(name: str, mode: str = "quick", limit: int | str | None = None) -> dict:
    """The settings of experiment ``name`` in ``mode``, with every image count replaced by ``limit``.

    ``limit``: None keeps the mode's counts, an int N gives every subset N images, ``"all"`` uses all.
    """
    if mode not in MODES:
        raise DfmpcError(f"unknown mode {mode!r}; use quick or full")
    if name not in EXPERIMENTS:
        raise DfmpcError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    cfg = copy.deepcopy((QUICK if mode == "quick" else FULL)[name])
    if limit is None:
        return cfg
    n = None if limit == "all" else int(limit)
    if n is not None and n < 1:
        raise DfmpcError(f"--limit must be a positive number of images, got {n}")
    for key in _IMAGE_KEYS:
        if key in cfg:
            cfg[key] = n
    if name in ("table1", "table2"):
        cfg["models"] = [[m, p, n] for m, p, _ in cfg["models"]]
    return cfg


# --------------------------------------------------------------------------------------------------
# A run: device, data sources and caches shared by the experiments of one ``run_all``.

def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the system after every batch.

    Each forward pass allocates activations of several MB; by default glibc maps and unmaps them every time,
    and the page faults cost about a fifth of the CPU time of an evaluation. Only affects this process
    (Linux / glibc; elsewhere nothing happens).
    """
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_trim_threshold, 1 << 30)
        libc.mallopt(m_mmap_threshold, 1 << 30)


@dataclass
class Run:
    mode: str = "quick"
    limit: int | str | None = None
    device: str | None = None
    seed: int = 0
    progress: bool = False
    command: str = ""
    cifar10_dir: str | None = None
    cifar100_dir: str | None = None
    imagenet_dir: str | None = None
    threads: int | None = None
    _models: dict = field(default_factory=dict, repr=False)
    _data: dict = field(default_factory=dict, repr=False)
    _preds: dict = field(default_factory=dict, repr=False)
    _quant: dict = field(default_factory=dict, repr=False)
    _failed: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise DfmpcError(f"unknown mode {self.mode!r}; use quick or full")
        self.device = self.device or ("cuda" if self.mode == "full" and torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise DfmpcError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        # Quick mode runs single-threaded: the same numbers on every machine, and no OpenMP spin-waiting on a
        # shared two-core machine (there, two threads made quantization 20x slower in CPU time).
        if self.threads is None:
            self.threads = 1 if self.mode == "quick" else torch.get_num_threads()
        if self.threads < 1:
            raise DfmpcError(f"--threads must be at least 1, got {self.threads}")
        if self.device == "cpu":
            _keep_freed_memory()

    # ---- models -----------------------------------------------------------------------------------
    def model(self, name: str):
        """(model, spec) with its pretrained weights, cached; DfmpcError if they cannot be had."""
        if name not in self._models:
            self._models[name] = load_model(name)
        return self._models[name]

    # ---- data -------------------------------------------------------------------------------------
    def _candidates(self, dataset: str) -> list[tuple[str | None, bool]]:
        """Folders to try for ``dataset``, in order, each with a flag "is a fallback"."""
        explicit = {"cifar10": self.cifar10_dir, "cifar100": self.cifar100_dir, "imagenet": self.imagenet_dir}[dataset]
        shared = default_data_dir(dataset)
        shared = str(shared) if shared is not None and shared.is_dir() else None
        if self.mode == "quick":
            return [(explicit or shared, False)]  # None: torchvision's download (CIFAR, e.g. in Colab)
        env = {"cifar10": "DFMPC_CIFAR10_DIR", "cifar100": "DFMPC_CIFAR100_DIR", "imagenet": "DFMPC_IMAGENET_DIR"}
        given = explicit or os.environ.get(env[dataset])
        if given is None and dataset != "imagenet":
            cache = Path.home() / ".cache" / "dfmpc" / dataset  # torchvision downloads the real test set here
            with contextlib.suppress(OSError):
                cache.mkdir(parents=True, exist_ok=True)
            given = str(cache)
        out = [(given, False)] if given else []
        if shared and shared != given:
            out.append((shared, True))
        return out

    def data(self, dataset: str, spec, limit):
        """(cached tensor data set, record) of ``dataset`` preprocessed for ``spec``'s model.

        Full mode tries the real data set first and falls back to the offline copy (recorded).
        """
        problems = []
        if self.mode == "full" and dataset == "imagenet" and not (self.imagenet_dir or os.environ.get("DFMPC_IMAGENET_DIR")):
            problems.append("no ImageNet validation folder given (--imagenet-dir or $DFMPC_IMAGENET_DIR)")
        for directory, is_fallback in self._candidates(dataset):
            key = (dataset, directory, tuple(spec.mean), tuple(spec.std), spec.resize, spec.input_size, limit, self.seed)
            if key in self._data:
                return self._data[key]
            if (dataset, directory) in self._failed:  # do not retry a download that failed in this run
                problems.append(self._failed[(dataset, directory)])
                continue
            try:
                available = len(load_dataset(dataset, directory, seed=self.seed))
                # small sets are decoded once and kept in memory; the full ImageNet validation set is streamed
                cache = min(limit or available, available) <= CACHE_LIMIT
                ds = load_dataset(dataset, directory, transform=spec.eval_transform(), limit=limit, seed=self.seed,
                                  cache=cache, progress=self.progress)
            except DfmpcError as e:
                self._failed[(dataset, directory)] = str(e)
                problems.append(str(e))
                continue
            record = _data_record(dataset, directory, available, len(ds), limit, self.seed,
                                  "; ".join(problems) if is_fallback or problems else None)
            record["in_memory"] = cache
            self._data[key] = (ds, record)
            return self._data[key]
        raise DfmpcError("; ".join(problems) or f"no {dataset} data available; set DFMPC_SHARED or pass a data folder")

    # ---- quantized models and predictions ---------------------------------------------------------
    def quantized(self, name: str, method: str, bits: str, **settings):
        """(quantized copy, report) of model ``name``; quantization runs on the CPU (cheap), cached."""
        key = (name, method, bits, tuple(sorted(settings.items())))
        if key not in self._quant:
            model, _ = self.model(name)
            self._quant[key] = quantize(model, bits=bits, method=method, **settings)
        return self._quant[key]

    def predict(self, name: str, dataset: str, limit, method: str = "fp32", bits: str | None = None, **settings):
        """Predictions of model ``name`` (fp32 or quantized) on ``dataset``; cached per run."""
        model, spec = self.model(name)
        data, record = self.data(dataset, spec, limit)
        key = (name, dataset, record["path"], limit, method, bits, tuple(sorted(settings.items())))
        if key not in self._preds:
            net = model if method == "fp32" else self.quantized(name, method, bits, **settings)[0]
            desc = f"{name} {method}" + ("" if bits is None else f" {bits}")
            net = _fast(net, self.device, dataset)
            workers = 0 if record["in_memory"] else min(8, os.cpu_count() or 1)
            self._preds[key] = predict(net, data, device=self.device, batch_size=_batch(dataset),
                                       progress=self.progress, desc=desc, num_workers=workers)
        return self._preds[key], record

    def measure(self, name: str, dataset: str, limit, variants) -> dict:
        """fp32 plus each (label, method, bits, settings) variant: top-1/top-5, loss, agreement, size, seconds."""
        fp, record = self.predict(name, dataset, limit)
        model, spec = self.model(name)
        out = {"fp32": {**_scores(fp), "size_mb": fp32_size_mb(model)}}
        for label, method, bits, settings in variants:
            pred, _ = self.predict(name, dataset, limit, method, bits, **settings)
            _, report = self.quantized(name, method, bits, **settings)
            out[label] = {**_scores(pred), "agreement_with_fp32": agreement(pred, fp), "method": method, "bits": bits,
                          "settings": {k: v for k, v in report.settings.items() if k != "keep_fp32"},
                          "size_mb": report.size_mb, "quantize_s": report.seconds, "pairs": len(report.pairs),
                          **_c_summary(report)}
        return {"model": name, "weights": spec.weights, "data": record, "results": out}


def _batch(dataset: str) -> int:
    # small batches: large ones cost more in page faults (malloc's mmap) than they gain on a CPU
    return 50 if dataset == "imagenet" else 128


def _fast(model: nn.Module, device: str, dataset: str) -> nn.Module:
    """A channels-last copy of an ImageNet model for the CPU: the same outputs up to float rounding, 1.5x faster
    for depthwise convolutions (EfficientNet-Lite). CIFAR models are returned as they are."""
    if dataset != "imagenet" or device != "cpu":
        return model
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _scores(pred: dict) -> dict:
    return {"top1": top1(pred), "top5": top5(pred), "loss": float(pred["loss"].mean()), "images": int(pred["labels"].numel())}


def _c_summary(report) -> dict:
    cs = [c.detach().double().flatten() for c in report.compensation.values()]
    if not cs:
        return {}
    c = torch.cat(cs)
    return {"c_mean": float(c.mean()), "c_min": float(c.min()), "c_max": float(c.max()),
            "c_zero_fraction": float((c == 0).double().mean()), "c_below_half": float((c < 0.5).double().mean())}


def _data_record(dataset: str, directory, available: int, used: int, limit, seed: int, fallback) -> dict:
    shared = default_data_dir(dataset)
    offline = bool(directory and shared and Path(directory).resolve() == shared.resolve())
    jpeg = bool(directory and Path(directory).is_dir() and any(Path(directory).rglob("*.jp*g"))) if directory else False
    if dataset == "imagenet":
        jpeg = True
    if offline and dataset == "cifar10":
        desc = "offline copy of the CIFAR-10 test set, stored as JPEG quality 75 (lossy: about 10 points below " \
               "published accuracies); for relative comparisons only"
    elif offline and dataset == "imagenet":
        desc = "offline subset of 1,300 ILSVRC2012 validation images (725 classes, pre-scaled to 227x227); easier " \
               "than the full validation set (+6 to +7 points); for relative comparisons only"
    elif dataset == "imagenet":
        desc = "ImageNet validation images from a local folder"
    else:
        desc = f"{dataset} test set (torchvision files, lossless)" if not jpeg else f"{dataset} images from a local folder"
    return {"dataset": dataset, "path": str(directory) if directory else None, "offline_copy": offline,
            "jpeg": jpeg, "images": used, "available": available, "limit": limit,
            "selection": "all" if used >= available else f"random subset, seed {seed}",
            "comparable_to_paper": not offline and not (jpeg and dataset != "imagenet"),
            "description": desc, "fallback": fallback}


# --------------------------------------------------------------------------------------------------
# Sizes from shapes (no weights needed, no quantization run).

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
    return quantized_size_mb(model, plan.bits_by_layer(), granularity, m.compensation_storage(comp))


def _uniform_bits(wbit: str) -> str:
    return wbit if "/" in wbit else f"{wbit}/{wbit}"


# --------------------------------------------------------------------------------------------------
# The experiments.

def _paper_variants(bits: str) -> list:
    """The two quantized columns of the paper's Tables 1-2: direct ("Original") and DF-MPC, at ``bits``."""
    return [("original", "original", bits, {}), ("dfmpc", "dfmpc", bits, dict(DFMPC_SETTINGS))]


def _not_measured(missing: dict) -> list[dict]:
    """Rows for the paper's models that cannot be measured here (paper model -> why)."""
    return [{"paper_model": m, "model": None, "status": "not measured", "reason": why} for m, why in missing.items()]


def exp_table1(run: Run, cfg: dict) -> dict:
    """CIFAR-10: FP32 vs direct MP2/6 ("Original") vs DF-MPC MP2/6 (paper Table 1)."""
    bits = cfg["bits"]
    variants = _paper_variants(bits)
    rows = []
    for name, paper_model, limit in cfg["models"]:
        row = {"paper_model": paper_model, "model": name}
        try:
            row.update(run.measure(name, "cifar10", limit, variants), status="measured")
        except DfmpcError as e:
            row.update(status="not measured", reason=str(e))
        rows.append(row)
    missing = {"ResNet18": "pytorchcv (the paper's model source) publishes no CIFAR-10 ResNet-18, and no such "
                           "weights are available offline",
               "VGG16": "pytorchcv publishes no CIFAR-10 VGG-16, and no such weights are available offline"}
    return {"bits": bits, "dfmpc_settings": DFMPC_SETTINGS, "rows": rows + _not_measured(missing)}


def exp_table2(run: Run, cfg: dict) -> dict:
    """CIFAR-100 (paper Table 2). Without a CIFAR-100 test set only what needs no labels is reported."""
    bits = cfg["bits"]
    variants = _paper_variants(bits)
    rows = []
    for name, paper_model, limit in cfg["models"]:
        row = {"paper_model": paper_model, "model": name}
        try:
            model, spec = run.model(name)
        except DfmpcError as e:
            rows.append({**row, "status": "not measured", "reason": str(e)})
            continue
        try:
            row.update(run.measure(name, "cifar100", limit, variants), status="measured", metric="accuracy")
        except DfmpcError as e:
            # No CIFAR-100 test set: run the method, and compare the quantized models with the full-precision
            # one on CIFAR-10 test images (other classes: agreement, never accuracy).
            measured = run.measure(name, "cifar10", limit, variants)
            for label in ("fp32", "original", "dfmpc"):
                res = measured["results"][label]
                for k in ("top1", "top5", "loss"):
                    res.pop(k, None)  # CIFAR-10 labels are not CIFAR-100 classes
            row.update(measured, status="agreement only", metric="agreement_with_fp32", reason=
                       f"no CIFAR-100 test set ({e}); agreement with full precision on CIFAR-10 test images is "
                       "NOT an accuracy")
        rows.append(row)
    missing = {"ResNet18": "pytorchcv publishes no CIFAR-100 ResNet-18, and no such weights are available offline",
               "VGG16": "pytorchcv publishes no CIFAR-100 VGG-16, and no such weights are available offline"}
    return {"bits": bits, "dfmpc_settings": DFMPC_SETTINGS, "rows": rows + _not_measured(missing)}


def exp_table34(run: Run, cfg: dict) -> dict:
    """ImageNet (paper Tables 3-4): exact sizes for every row, accuracy where weights and data allow."""
    sizes = []
    built = {}
    for table in ("table3", "table4"):
        for arch, method, wbit, size, acc in PAPER[table]:
            if arch not in built:
                built[arch] = load_model(IMAGENET_ARCHS[arch], pretrained=False)[0]
            model = built[arch]
            if method == "Full-precision":
                ours = fp32_size_mb(model)
                how = "parameters x 32 bits"
            elif method == "DF-MPC":
                ours = planned_size_mb(model, _uniform_bits(wbit), "dfmpc")
                how = "our DF-MPC plan (pairs low, all other layers high bits), scales and c at 32 bits"
            else:
                ours = planned_size_mb(model, _uniform_bits(wbit), "original")
                how = f"every weight layer at {wbit} bits, one 32-bit scale per tensor, BN at 32 bits"
            row = {"table": table, "model": arch, "pytorchcv": IMAGENET_ARCHS[arch], "method": method, "wbit": wbit,
                   "paper_size_mb": size, "paper_top1": acc, "size_mb": ours, "size_rule": how}
            if method == "DF-MPC":
                row["size_mb_unpaired_low"] = planned_size_mb(model, _uniform_bits(wbit), "dfmpc", unpaired="low")
                plan = plan_layers(model, _uniform_bits(wbit))
                modules = dict(model.named_modules())
                n_low = sum(modules[a.name].weight.numel() for a in plan.layers if a.role == "low")
                n_all = sum(modules[a.name].weight.numel() for a in plan.layers)
                row["low_weight_fraction"] = n_low / n_all
                row["pairs"] = len(plan.pairs)
            sizes.append(row)
    built.clear()

    accuracy = []
    for arch, bits in cfg["models"]:  # the paper's models (full mode: pytorchcv weights + real ImageNet)
        name = IMAGENET_ARCHS[arch]
        row = {"paper_model": arch, "model": name, "bits": bits}
        try:
            variants = [("original", "original", bits, {}), ("dfmpc", "dfmpc", bits, dict(DFMPC_SETTINGS))]
            row.update(run.measure(name, "imagenet", cfg["images"], variants), status="measured")
        except DfmpcError as e:
            row.update(status="not measured", reason=str(e))
        accuracy.append(row)
    if not cfg["models"]:
        for arch in IMAGENET_ARCHS:
            accuracy.append({"paper_model": arch, "model": IMAGENET_ARCHS[arch], "status": "not measured",
                             "reason": "quick mode: pytorchcv's ImageNet weights cannot be downloaded offline and a "
                                       "CPU is too slow for the full validation set; run dfmpc reproduce --full on a "
                                       "GPU with --imagenet-dir"})
    standin = cfg["standin"]
    row = {"paper_model": None, "model": standin, "role": "offline stand-in (not a model of the paper)"}
    try:
        variants = []
        for bits in cfg["standin_bits"]:
            variants += [(f"original {bits}", "original", bits, {}), (f"dfmpc {bits}", "dfmpc", bits, dict(DFMPC_SETTINGS))]
        row.update(run.measure(standin, "imagenet", cfg["images"], variants), status="measured")
    except DfmpcError as e:
        row.update(status="not measured", reason=str(e))
    return {"sizes": sizes, "accuracy": accuracy, "standin": row}


def exp_fig3(run: Run, cfg: dict) -> dict:
    """The lambda_1 / lambda_2 sweep on ResNet-56, CIFAR-10 (paper Figure 3)."""
    name, limit = cfg["model"], cfg["images"]
    out = {"model": name, "sweeps": {}}
    for bits in cfg["bits"]:
        base = run.measure(name, "cifar10", limit, [("original", "original", bits, {})])
        out["data"] = base["data"]
        sweep = {"fp32": base["results"]["fp32"]["top1"], "original": base["results"]["original"]["top1"],
                 "lambda1": [], "lambda2": [], "lambda1_beyond": []}

        def point(l1, l2):
            pred, _ = run.predict(name, "cifar10", limit, "dfmpc", bits, lambda1=l1, lambda2=l2)
            _, report = run.quantized(name, "dfmpc", bits, lambda1=l1, lambda2=l2)
            return {"lambda1": l1, "lambda2": l2, "top1": top1(pred), **_c_summary(report)}

        sweep["lambda1"] = [point(l1, 0.0) for l1 in cfg["lambda1"]]
        sweep["lambda2"] = [point(0.5, l2) for l2 in cfg["lambda2"]]
        # beyond the paper's range: lambda1 -> infinity gives c -> 1, i.e. direct quantization
        sweep["lambda1_beyond"] = [point(l1, 0.0) for l1 in cfg.get("lambda1_beyond", [])]
        for key in ("lambda1", "lambda2"):
            accs = [r["top1"] for r in sweep[key]]
            best = max(sweep[key], key=lambda r: r["top1"])  # the first of equals
            sweep[f"best_{key}"] = best[key] if max(accs) > min(accs) else None  # None: all equal
        out["sweeps"][bits] = sweep
    return out


def exp_fig4(run: Run, cfg: dict) -> dict:
    """6-bit weight distributions before / after compensation (paper Figure 4)."""
    name, bits = cfg["model"], cfg["bits"]
    model, spec = run.model(name)
    orig, _ = run.quantized(name, "original", bits)
    comp, report = run.quantized(name, "dfmpc", bits, **DFMPC_SETTINGS)
    fp_mod, o_mod, c_mod = dict(model.named_modules()), dict(orig.named_modules()), dict(comp.named_modules())
    layers = {}
    for layer in cfg["layers"]:
        w_fp, w_o, w_c = fp_mod[layer].weight, o_mod[layer].weight, c_mod[layer].weight
        m = float(max(w.detach().abs().max() for w in (w_fp, w_o, w_c)))
        c = report.compensation.get(layer)
        layers[layer] = {"fp32": weight_histogram(w_fp, cfg["bins"], (-m, m)),
                         "before": weight_histogram(w_o, cfg["bins"], (-m, m)),
                         "after": weight_histogram(w_c, cfg["bins"], (-m, m)),
                         "c_mean": None if c is None else float(c.mean())}
    high = [lr for lr in report.layers if lr.role == "high"]
    every = []
    for lr in high:
        before, after = o_mod[lr.name].weight.detach().double(), c_mod[lr.name].weight.detach().double()
        every.append({"layer": lr.name, "mean_before": float(before.mean()), "mean_after": float(after.mean()),
                      "std_before": float(before.std()), "std_after": float(after.std()),
                      "c_mean": lr.c_mean, "closer_to_zero": abs(float(after.mean())) < abs(float(before.mean()))})
    closer = sum(r["closer_to_zero"] for r in every)
    return {"model": name, "weights": spec.weights, "bits": bits, "dfmpc_settings": DFMPC_SETTINGS, "layers": layers,
            "high_layers": every, "closer_to_zero": closer, "high_layer_count": len(every)}


def exp_fig5(run: Run, cfg: dict) -> dict:
    """Loss surfaces before / after compensation, filter-normalised random directions (paper Figure 5)."""
    name, bits = cfg["model"], cfg["bits"]
    model, spec = run.model(name)
    data, record = run.data("cifar10", spec, cfg["images"])
    images, labels = batch_of(data, len(data))
    models = {"fp32": model, "original": run.quantized(name, "original", bits)[0],
              "dfmpc": run.quantized(name, "dfmpc", bits, **DFMPC_SETTINGS)[0]}
    surfaces = {}
    for label, net in models.items():
        surf = loss_surface(copy.deepcopy(net), images, labels, steps=cfg["steps"], span=cfg["span"], seed=run.seed,
                            batch_size=128, device=run.device, progress=run.progress, desc=f"surface {label}")
        flat = [v for r in surf["loss"] for v in r]
        mid = cfg["steps"] // 2
        centre = surf["loss"][mid][mid]
        surf["summary"] = {"centre_loss": centre, "min_loss": min(flat), "max_loss": max(flat),
                           "mean_rise": sum(flat) / len(flat) - centre,
                           "centre_is_min": centre <= min(flat) + 1e-12,
                           "centre_accuracy": surf["accuracy"][mid][mid]}
        surfaces[label] = surf
    return {"model": name, "weights": spec.weights, "bits": bits, "data": record, "steps": cfg["steps"],
            "span": cfg["span"], "surfaces": surfaces}


def exp_timing(run: Run, cfg: dict) -> dict:
    """Seconds DF-MPC takes per model (quantize + closed form + fold; evaluation excluded)."""
    from .benchmark import time_quantize

    devices = ["cpu"] + ([run.device] if run.device != "cpu" else [])
    rows = []
    for name in cfg["models"]:
        try:
            model, spec = run.model(name)
            weights = spec.weights
        except DfmpcError:
            model, _ = load_model(name, pretrained=False)
            weights = "random (pretrained weights not available offline; the time does not depend on their values)"
        for device in devices:
            row = {"model": name, "weights": weights, "device": device, "device_name": _device_name(device),
                   "threads": torch.get_num_threads() if device == "cpu" else None, "bits": cfg["bits"]}
            try:
                net = copy.deepcopy(model).to(device)
                row.update(time_quantize(net, cfg["bits"], cfg["repeat"], **DFMPC_SETTINGS), status="measured")
            except Exception as e:  # a device-specific failure is a result too
                row.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            rows.append(row)
    return {"rows": rows, "repeat": cfg["repeat"]}


def exp_diagnosis(run: Run, cfg: dict) -> dict:
    """Why MP2/6 falls short here: error growth through the layers, single pairs, bits and granularity."""
    out = {"cpu_s": {}}
    t0 = time.process_time()
    # 1. relative error of every layer's output, accumulated and local
    name = cfg["layer_model"]
    model, spec = run.model(name)
    data, record = run.data("cifar10", spec, cfg["layer_images"])
    images, _ = batch_of(data, len(data))
    layer_rows = {}
    for bits in cfg["layer_bits"]:
        for method, settings in (("original", {}), ("dfmpc", dict(DFMPC_SETTINGS))):
            q, report = run.quantized(name, method, bits, **settings)
            roles = {lr.name: lr for lr in report.layers}
            errs = feature_errors(model, q, images, device=run.device)
            for r in errs:
                lr = roles.get(r["name"])
                r.update(role=lr.role if lr else None, bits=lr.bits if lr else None, c_mean=lr.c_mean if lr else None)
            layer_rows[f"{method} {bits}"] = errs
    out["layers"] = {"model": name, "data": record, "errors": layer_rows}
    out["cpu_s"]["layers"], t0 = time.process_time() - t0, time.process_time()

    # 2. one pair at a time: only that pair quantized, everything else full precision
    name = cfg["pair_model"]
    model, spec = run.model(name)
    bits = cfg["pair_bits"]
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    plan = plan_layers(model, bits)
    err_data, _ = run.data("cifar10", spec, cfg["pair_error_images"])
    err_images, _ = batch_of(err_data, len(err_data))
    pair_rows = []
    fp, pair_record = run.predict(name, "cifar10", cfg["pair_images"])
    for p in plan.pairs:
        keep = tuple(n for n in names if n not in (p.low, p.high))
        row = {"low": p.low, "high": p.high}
        for method, settings in (("original", {}), ("dfmpc", dict(DFMPC_SETTINGS))):
            pred, _ = run.predict(name, "cifar10", cfg["pair_images"], method, bits, keep_fp32=keep, **settings)
            q, report = run.quantized(name, method, bits, keep_fp32=keep, **settings)
            errs = {r["name"]: r for r in feature_errors(model, q, err_images, device=run.device)}
            row[method] = {"top1": top1(pred), "agreement_with_fp32": agreement(pred, fp),
                           "low_error": errs[p.low]["local"], "high_error": errs[p.high]["accumulated"],
                           "logit_error": errs[names[-1]]["accumulated"], **_c_summary(report)}
        pair_rows.append(row)
    out["pairs"] = {"model": name, "bits": bits, "fp32_top1": top1(fp), "data": pair_record, "rows": pair_rows}
    out["cpu_s"]["pairs"], t0 = time.process_time() - t0, time.process_time()

    # 3. accuracy against bits and granularity
    name = cfg["sweep_model"]
    sweep = []
    sweep_record = None
    for gran in cfg["sweep_granularity"]:
        for bits in cfg["sweep_bits"]:
            row = {"granularity": gran, "bits": bits}
            for method, settings in (("original", {}), ("dfmpc", dict(DFMPC_SETTINGS))):
                pred, sweep_record = run.predict(name, "cifar10", cfg["sweep_images"], method, bits, granularity=gran,
                                                 **settings)
                _, report = run.quantized(name, method, bits, granularity=gran, **settings)
                row[method] = {"top1": top1(pred), "size_mb": report.size_mb, **_c_summary(report)}
            sweep.append(row)
    fp, _ = run.predict(name, "cifar10", cfg["sweep_images"])
    out["bits"] = {"model": name, "fp32_top1": top1(fp), "data": sweep_record, "rows": sweep}
    out["cpu_s"]["bits"], t0 = time.process_time() - t0, time.process_time()

    # 4. the weights alone: how far each low-bit layer is from full precision, and how far it could get with
    #    the best rescaling of each output channel (the most any per-channel compensation can do)
    fits = []
    for name in dict.fromkeys([cfg["layer_model"], cfg["sweep_model"]]):
        model, _ = run.model(name)
        modules = dict(model.named_modules())
        for bits in cfg["sweep_bits"]:
            low_bits = parse_bits(bits)[0]
            lows = [a.name for a in plan_layers(model, bits).layers if a.role == "low"]
            for gran in cfg["sweep_granularity"]:
                per_layer = []
                for layer in lows:
                    w = modules[layer].weight.detach()
                    per_layer.append({"layer": layer, **weight_fit(w, quantize_weight(w, low_bits, gran).dequantize())})
                fits.append({"model": name, "low_bits": low_bits, "granularity": gran, "layers": per_layer,
                             "rel_error_mean": sum(r["rel_error"] for r in per_layer) / len(per_layer),
                             "best_scale_rel_error_mean": sum(r["best_scale_rel_error"] for r in per_layer) / len(per_layer)})
    out["weight_fit"] = fits
    out["cpu_s"]["weight_fit"] = time.process_time() - t0
    return out


EXPERIMENTS = {
    "table1": ("Table 1: CIFAR-10, FP32 vs MP2/6 vs DF-MPC", exp_table1),
    "table2": ("Table 2: CIFAR-100, FP32 vs MP2/6 vs DF-MPC", exp_table2),
    "table34": ("Tables 3-4: ImageNet, sizes and top-1", exp_table34),
    "fig3": ("Figure 3: lambda_1 / lambda_2 sweep", exp_fig3),
    "fig4": ("Figure 4: 6-bit weight distributions before and after compensation", exp_fig4),
    "fig5": ("Figure 5: loss surfaces before and after compensation", exp_fig5),
    "timing": ("Timing: seconds DF-MPC takes per model", exp_timing),
    "diagnosis": ("Diagnosis: why MP2/6 differs from the paper", exp_diagnosis),
}


# --------------------------------------------------------------------------------------------------
# Provenance, running and loading.

def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _versions() -> dict:
    out = {"dfmpc": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("torchvision", "pytorchcv", "numpy", "efficientnet_lite_pytorch"):
        with contextlib.suppress(Exception):
            out[mod] = getattr(__import__(mod), "__version__", "installed")
    if "pytorchcv" in out and out["pytorchcv"] == "installed":
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            out["pytorchcv"] = version("pytorchcv")
    return out


def _collect_data(obj, found: list) -> list:
    """Every data record (a dict with 'dataset' and 'selection') inside ``obj``, without duplicates."""
    if isinstance(obj, dict):
        if "dataset" in obj and "selection" in obj:
            if obj not in found:
                found.append(obj)
            return found
        for v in obj.values():
            _collect_data(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _collect_data(v, found)
    return found


def run_experiment(name: str, mode: str = "quick", limit=None, device: str | None = None, seed: int = 0,
                   progress: bool = False, command: str | None = None, run: Run | None = None, **dirs) -> dict:
    """Run one experiment and return its JSON-able result (with provenance)."""
    if name not in EXPERIMENTS:
        raise DfmpcError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    run = run or Run(mode=mode, limit=limit, device=device, seed=seed, progress=progress,
                     command=command or f"dfmpc.reproduce.run_experiment({name!r}, mode={mode!r})", **dirs)
    cfg = settings_for(name, run.mode, run.limit)
    title, fn = EXPERIMENTS[name]
    torch.manual_seed(run.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(run.threads)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        results = fn(run, cfg)
    finally:
        torch.set_num_threads(threads)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "schema": SCHEMA, "experiment": name, "title": title, "mode": run.mode,
        "command": run.command, "limit_override": run.limit, "seed": run.seed,
        "device": {"device": run.device, "name": _device_name(run.device), "threads": run.threads},
        "versions": _versions(), "settings": cfg, "data": _collect_data(results, []),
        "paper": _paper_for(name), "results": results, "wall_s": wall, "cpu_s": cpu,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _paper_for(name: str):
    if name == "table34":
        return {"table3": PAPER["table3"], "table4": PAPER["table4"]}
    if name == "diagnosis":
        return {"table1": PAPER["table1"]}
    return PAPER.get(name)


# Experiments that share models and data run in the same process; two processes fill two cores.
GROUPS = (("table1", "fig3", "fig4", "diagnosis"), ("table34", "fig5", "table2", "timing"))


def _run_group(names, out: str, options: dict) -> list[tuple[str, float, float]]:
    options = dict(options)
    jobs = options.pop("jobs", 1)
    run = Run(**options)
    done = []
    for n in names:
        result = run_experiment(n, run=run)
        result["device"]["jobs"] = jobs
        path = Path(out) / f"{n}.json"
        path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
        print(f"{n:<10} {result['wall_s']:7.1f} s wall {result['cpu_s']:7.1f} s CPU  -> {path}", file=sys.stderr,
              flush=True)
        done.append((n, result["wall_s"], result["cpu_s"]))
    return done


def run_all(mode: str = "quick", out: str | os.PathLike | None = None, limit=None, device: str | None = None,
            seed: int = 0, only=None, progress: bool = True, command: str | None = None, jobs: int | None = None,
            **options) -> dict:
    """Run every experiment (or those in ``only``) and write ``<out>/<name>.json``; return {name: path}.

    Within a process one :class:`Run` is shared, so data sets, quantized models and predictions are computed
    once. ``jobs`` processes (default: 2 in quick mode on a CPU with two or more cores, else 1) run the groups
    of :data:`GROUPS` side by side, each single-threaded in quick mode.
    """
    out = Path(out) if out is not None else Path("results") / mode
    names = list(EXPERIMENTS) if not only else list(only)
    for n in names:
        if n not in EXPERIMENTS:
            raise DfmpcError(f"unknown experiment {n!r}; choose from {', '.join(EXPERIMENTS)}")
    options = dict(mode=mode, limit=limit, device=device, seed=seed, progress=progress,
                   command=command or f"dfmpc.reproduce.run_all(mode={mode!r})", **options)
    probe = Run(**options)  # validates the options (device, threads) before anything runs
    if jobs is None:
        jobs = 2 if probe.mode == "quick" and probe.device == "cpu" and (os.cpu_count() or 1) >= 2 else 1
    groups = [[n for n in g if n in names] for g in GROUPS]
    groups = [g for g in groups if g]
    if jobs < 2 or len(groups) < 2:
        groups = [[n for g in GROUPS for n in g if n in names]]
    options["jobs"] = min(jobs, len(groups))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if len(groups) == 1:
        _run_group(groups[0], str(out), options)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited OpenMP state
        with ProcessPoolExecutor(max_workers=len(groups), mp_context=ctx) as pool:
            for future in [pool.submit(_run_group, g, str(out), options) for g in groups]:
                future.result()
    print(f"{'total':<10} {time.perf_counter() - start:7.1f} s wall  ({mode} mode, device {probe.device}, "
          f"{options['jobs']} process(es) x {probe.threads} thread(s))", file=sys.stderr, flush=True)
    return {n: out / f"{n}.json" for n in names}


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def results_dir() -> Path:
    """``$DFMPC_RESULTS``, else ``results/quick`` of the repository (found from the working directory)."""
    env = os.environ.get("DFMPC_RESULTS")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "dfmpc").is_dir():
            return folder / "results" / "quick"
    return here / "results" / "quick"


def load_result(name: str, directory: str | os.PathLike | None = None, compute: bool = True) -> dict:
    """The result of experiment ``name`` from ``<directory>/<name>.json`` (default :func:`results_dir`).

    If the file is missing and ``compute`` is true, the experiment is run now in quick mode (what a Colab
    user without the results folder gets); the returned dict then has ``"computed_now": True``.
    """
    path = Path(directory or results_dir()) / f"{name}.json"
    if path.is_file():
        result = json.loads(path.read_text())
        if result.get("experiment") != name or result.get("schema") != SCHEMA:
            raise DfmpcError(f"{path} is not a schema-{SCHEMA} result of {name}; rerun dfmpc reproduce")
        result["computed_now"] = False
        return result
    if not compute:
        raise DfmpcError(f"{path} not found; run dfmpc reproduce --quick --out {path.parent}")
    result = json.loads(json.dumps(run_experiment(name, "quick"), default=_json_default))
    result["computed_now"] = True
    return result


def describe(result: dict) -> str:
    """A stable one-line summary of how a result was produced (no paths, no dates: safe for nbval)."""
    mode = f"--{result['mode']}"
    extra = ""
    if result.get("limit_override") == "all":
        extra = " --images all"
    elif result.get("limit_override"):
        extra = f" --limit {result['limit_override']}"
    how = "computed just now by the chapter" if result.get("computed_now") else "read from its JSON file"
    return f"dfmpc reproduce {mode}{extra} (experiment {result['experiment']}, seed {result['seed']}; {how})"


def data_label(record: dict | None) -> str:
    """A short description of the data a number was measured on, for the "data" column of the book's tables.

    E.g. "CIFAR-10 test, JPEG copy, 400 of 10,000": which set, whether it is the lossy offline copy (or the
    easier offline ImageNet subset), and how many of its images.
    """
    if not record:
        return "weights only (no images)"
    names = {"cifar10": "CIFAR-10 test", "cifar100": "CIFAR-100 test", "imagenet": "ImageNet val"}
    kind = names.get(record["dataset"], record["dataset"])
    if record["offline_copy"] and record["dataset"] == "cifar10":
        kind += ", JPEG copy"
    elif record["offline_copy"] and record["dataset"] == "imagenet":
        kind += ", offline subset"
    elif record["jpeg"] and record["dataset"] != "imagenet":
        kind += ", JPEG"
    count = f"{record['images']:,} of {record['available']:,}" if record["images"] < record["available"] \
        else f"all {record['images']:,}"
    extra = " (fallback: the real set was unavailable)" if record.get("fallback") else ""
    return f"{kind}, {count}{extra}"


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (for ``IPython.display.Markdown``); cells are converted with ``str``."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
