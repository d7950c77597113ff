"""A session of experiments: one device, one seed, and caches that the experiments of a run share.

Models, decoded data sets, quantized copies and predictions are computed once per session, so a table
and a figure measured on the same model and images in one ``dfmpc experiments`` run cost one pass.
Quantization always runs on the CPU with one thread (its tensors are small; more threads only add
overhead), so the seconds a report gives are single-thread CPU seconds on every machine.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..api import quantize
from ..data import DATASETS, default_data_dir
from ..errors import DfmpcError
from ..evaluate import Predictions, predict, resolve_device
from ..models import load_model
from ..pipeline import CACHE_LIMIT, evaluation_data
from ..size import fp32_size_mb

__all__ = ["Session", "PRESETS", "CACHE_LIMIT", "c_summary", "one_thread"]

PRESETS = ("quick", "full")
_DATA_ENV = {"cifar10": "DFMPC_CIFAR10_DIR", "cifar100": "DFMPC_CIFAR100_DIR", "imagenet": "DFMPC_IMAGENET_DIR"}


@contextlib.contextmanager
def one_thread():
    """Run the block with one torch thread (quantization: comparable seconds everywhere)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the system after every batch.

    Each forward pass allocates activations of several MB; by default glibc maps and unmaps them every
    time, and the page faults cost about a fifth of the CPU time of an evaluation. Allocations above
    256 MB (the weights of a VGG classifier and their copies) are still mapped and given back: kept on the
    heap, they fragmented it until a run over every listed model held 12 GB. Only affects this process
    (Linux / glibc; elsewhere nothing happens).
    """
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_trim_threshold, 1 << 28)
        libc.mallopt(m_mmap_threshold, 1 << 28)


def c_summary(report) -> dict:
    """Statistics of every compensation vector c of a quantization report (empty for other methods)."""
    cs = [c.detach().double().flatten() for c in report.compensation.values()]
    if not cs:
        return {}
    c = torch.cat(cs)
    return {"c_mean": float(c.mean()), "c_min": float(c.min()), "c_max": float(c.max()),
            "c_zero_fraction": float((c == 0).double().mean()), "c_below_half": float((c < 0.5).double().mean())}


@dataclass
class Session:
    """Settings shared by the experiments of one run, and their caches.

    ``preset``: "quick" (the offline copies, CPU) or "full" (the real data sets first, falling back to the
    offline copies; recorded). ``data_dirs``: data set name -> folder, overriding both. ``threads``: torch's
    CPU threads while an experiment runs (default 1 in quick mode: the same numbers on every machine, and
    no OpenMP spin-waiting when two experiment processes share two cores).
    """

    preset: str = "quick"
    device: str | None = None
    seed: int = 0
    progress: bool = False
    threads: int | None = None
    data_dirs: dict = field(default_factory=dict)
    batch_size: int | None = None
    _models: dict = field(default_factory=dict, repr=False)
    _data: dict = field(default_factory=dict, repr=False)
    _preds: dict = field(default_factory=dict, repr=False)
    _quant: dict = field(default_factory=dict, repr=False)
    _failed: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise DfmpcError(f"unknown preset {self.preset!r}; use {' or '.join(PRESETS)}")
        default = "cuda" if self.preset == "full" and torch.cuda.is_available() else "cpu"
        self.device = str(resolve_device(self.device or default))
        if self.threads is None:
            self.threads = 1 if self.preset == "quick" else torch.get_num_threads()
        if self.threads < 1:
            raise DfmpcError(f"--threads must be at least 1, got {self.threads}")
        if self.batch_size is not None and self.batch_size < 1:
            raise DfmpcError(f"--batch-size must be at least 1, got {self.batch_size}")
        for name in self.data_dirs:
            if name not in DATASETS:
                raise DfmpcError(f"--data-dir names unknown data set {name!r}; use one of {', '.join(DATASETS)}")
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
        shared = default_data_dir(dataset)
        shared = str(shared) if shared is not None and shared.is_dir() else None
        given = self.data_dirs.get(dataset) or os.environ.get(_DATA_ENV[dataset])
        if self.preset == "quick":
            return [(given or shared, False)]  # None: torchvision's download (CIFAR, e.g. in Colab)
        if given is None and dataset != "imagenet":
            given = str(Path.home() / ".cache" / "dfmpc" / dataset)  # torchvision downloads the real test set here
        out = [(given, False)] if given else []
        if shared and shared != given:
            out.append((shared, True))
        return out

    def data(self, dataset: str, spec, images, split: str | None = None):
        """(data set preprocessed for ``spec``'s model, record) of ``images`` images of ``dataset``, taken from its
        ``split`` half ("dev", "test"; None: the whole set)."""
        problems = []
        if self.preset == "full" and dataset == "imagenet" and not (
                self.data_dirs.get("imagenet") or os.environ.get(_DATA_ENV["imagenet"])):
            problems.append("no ImageNet validation folder given (--data-dir imagenet=DIR or $DFMPC_IMAGENET_DIR)")
        for directory, is_fallback in self._candidates(dataset):
            key = (dataset, directory, tuple(spec.mean), tuple(spec.std), spec.resize, spec.input_size, images, split)
            if key in self._data:
                return self._data[key]
            if (dataset, directory) in self._failed:  # do not retry a download that failed in this session
                problems.append(self._failed[(dataset, directory)])
                continue
            try:
                ds, record = evaluation_data(dataset, spec, directory, images, self.seed, split, progress=self.progress,
                                             fallback="; ".join(problems) if is_fallback or problems else None)
            except DfmpcError as e:
                self._failed[(dataset, directory)] = str(e)
                problems.append(str(e))
                continue
            self._data[key] = (ds, record)
            return self._data[key]
        raise DfmpcError("; ".join(problems) or f"no {dataset} data available; point DFMPC_SHARED at the offline "
                                                "data folder or pass --data-dir")

    # ---- quantized models and predictions ---------------------------------------------------------
    def quantized(self, name: str, method: str, bits: str, **settings):
        """(quantized copy, report) of model ``name``, cached; quantized on the CPU with one thread."""
        key = (name, method, bits, tuple(sorted(settings.items())))
        if key not in self._quant:
            model, _ = self.model(name)
            with one_thread():
                self._quant[key] = quantize(model, bits=bits, method=method, **settings)
        return self._quant[key]

    def predict(self, name: str, dataset: str, images, method: str = "fp32", bits: str | None = None,
                split: str | None = None, settings: dict | None = None) -> tuple[Predictions, dict]:
        """Predictions of model ``name`` (fp32 or quantized by ``method`` at ``bits`` with ``settings``) on ``images``
        images of ``dataset``'s ``split`` half (None: the whole set), cached. The method's settings come as a dict,
        not as keywords, because a method may have a setting of the same name as one of these arguments (ZeroQ's
        ``images``: the number of images it distils)."""
        settings = dict(settings or {})
        model, spec = self.model(name)
        data, record = self.data(dataset, spec, images, split)
        key = (name, dataset, record["path"], images, split, method, bits, tuple(sorted(settings.items())))
        if key not in self._preds:
            net = model if method == "fp32" else self.quantized(name, method, bits, **settings)[0]
            desc = f"{name} {method}" + ("" if bits is None else f" {bits}")
            self._preds[key] = self.evaluate(net, name, dataset, images, split, desc)[0]
        return self._preds[key], record

    def evaluate(self, net: nn.Module, name: str, dataset: str, images, split: str | None = None,
                 desc: str = "") -> tuple[Predictions, dict]:
        """Predictions of ``net`` (a network built for model ``name``, e.g. a quantized model changed by hand) on
        the images :meth:`predict` would use, not cached."""
        _, spec = self.model(name)
        data, record = self.data(dataset, spec, images, split)
        workers = 0 if record["in_memory"] else min(8, os.cpu_count() or 1)
        return predict(_fast(net, self.device, dataset), data, device=self.device,
                       batch_size=self.batch_size or _batch(dataset), progress=self.progress, desc=desc or name,
                       num_workers=workers), record

    def measure(self, name: str, dataset: str, images, variants, split: str | None = None) -> dict:
        """fp32 plus each (label, method, bits, settings) variant: top-1/top-5, loss, agreement, size, seconds, on
        ``images`` images of ``dataset``'s ``split`` half (None: the whole set)."""
        fp, record = self.predict(name, dataset, images, split=split)
        model, spec = self.model(name)
        out = {"fp32": {**fp.scores(), "size_mb": fp32_size_mb(model)}}
        for label, method, bits, settings in variants:
            pred, _ = self.predict(name, dataset, images, method, bits, split, settings)
            _, report = self.quantized(name, method, bits, **settings)
            out[label] = {**pred.scores(), "agreement_with_fp32": pred.agreement(fp), "method": method, "bits": bits,
                          "settings": {k: v for k, v in report.settings.items() if k != "keep_fp32"},
                          "size_mb": report.size_mb, "quantize_s": report.seconds, "pairs": len(report.pairs),
                          **c_summary(report)}
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
