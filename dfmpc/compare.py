"""Every method at every bit width on every model, in one run: ``dfmpc compare``.

    from dfmpc.compare import run_comparison, format_table
    data = run_comparison(["resnet20_cifar10_a"], images=500)   # a dict, also what --json writes
    print(format_table(data))

For each model: load it and its evaluation data once (decoded and cached in memory), evaluate the
full-precision model, then for every bit width and every method quantize a copy with the method's
own default settings (``dfmpc methods`` lists them) and evaluate it on the same images. Quantization
runs on the CPU with one thread (its tensors are small: more threads only add overhead, and on a
busy machine a lot of it), so its seconds are single-thread CPU seconds; evaluation runs on
``device`` with torch's threads. The result records the
data folders, the number of images, the device, the versions and the seed, and every row carries the
method's name, bits, top-1/top-5, size in MB and seconds to quantize.

The offline data sets (``$DFMPC_SHARED``) are for relative comparisons only: the CIFAR-10 test images
are JPEG-compressed, the ImageNet images a 1,300-image subset of the validation set.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from . import __version__
from .errors import DfmpcError
from .methods import METHODS
from .plan import parse_bits

__all__ = ["DEFAULT_MODELS", "DEFAULT_BITS", "QUICK", "ABLATION", "ABLATION_BITS", "run_comparison", "format_table", "format_ablation", "pivot", "figure", "load_results",
           "default_results_path"]

DEFAULT_MODELS = ("resnet20_cifar10_a", "resnet56_cifar10_a", "efficientnet_lite0")
DEFAULT_BITS = ("2/6", "3/6", "4/6", "6/6")
#: ``dfmpc compare --quick``: what CI runs before the notebooks (about 2 minutes on 2 CPU cores).
QUICK = {"models": ("resnet20_cifar10_a",), "images": 500, "bits": DEFAULT_BITS, "ablation_bits": ("2/6",)}
#: ``--ablation``: dfmpc+ with one ingredient changed at a time (label -> settings), at ABLATION_BITS.
ABLATION = {
    "dfmpc+": {},
    "no mean correction": {"mean_correction": False},
    "least-squares gain (DF-MPC's c)": {"gain": "least-squares"},
    "variance-matching gain": {"gain": "variance"},
    "no gain correction": {"gain": "none"},
    "codes without kernel correlation (rho = 0)": {"correlation": 0.0},
    "codes weighted by input variances": {"weighting": "variance"},
    "one scale per tensor": {"granularity": "tensor"},
}
ABLATION_BITS = ("2/6", "3/6")


def _versions() -> dict:
    import torchvision

    out = {"dfmpc": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version(), "platform": platform.platform()}
    try:
        import pytorchcv

        out["pytorchcv"] = getattr(pytorchcv, "__version__", "installed")
    except ImportError:
        pass
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_comparison(models=DEFAULT_MODELS, methods=None, bits=DEFAULT_BITS, images: int | None = None,
                   device: str | None = None, seed: int = 0, batch_size: int = 256, progress: bool = True,
                   data_dirs: dict | None = None, json_path: str | os.PathLike | None = None,
                   command: str | None = None, ablation=False, ablation_bits=ABLATION_BITS) -> dict:
    """Run the comparison and return it as a dict (written to ``json_path`` after every model, if given).

    Args:
        models: model names (``dfmpc models``).
        methods: method names (default: all of :data:`dfmpc.methods.METHODS`).
        bits: ``"LOW/HIGH"`` strings.
        images: evaluate on a fixed random subset of this many images per data set (seeded by
            ``seed``); None = all images.
        device: where to evaluate ("cpu", "cuda"; default: CUDA if available).
        data_dirs: data set name -> folder (default: the offline copy under ``$DFMPC_SHARED``, else download).
        command: the command line to record in the result (the CLI passes its own).
        ablation: also run the dfmpc+ variants of :data:`ABLATION` at ``ablation_bits`` (rows in
            ``data["ablation"]``, with a ``variant`` label): True for every model, or the model names.
    """
    from tqdm import tqdm

    from .api import quantize
    from .data import load_dataset
    from .evaluate import evaluate
    from .models import load_model
    from .size import fp32_size_mb

    methods = list(METHODS) if methods is None else list(methods)
    for name in methods:
        if name not in METHODS:
            raise DfmpcError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    bits = [f"{lo}/{hi}" for lo, hi in (parse_bits(b) for b in bits)]
    if images is not None and images < 1:
        raise DfmpcError(f"images must be a positive number or None (all), got {images}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DfmpcError("device cuda requested but CUDA is not available; use --device cpu")
    data_dirs = dict(data_dirs or {})
    torch.manual_seed(seed)
    out = {"command": command,
           "seed": seed, "images_requested": images if images is not None else "all",
           "device": _device_name(dev), "quantize_device": "cpu (1 thread)", "versions": _versions(),
           "shared": os.environ.get("DFMPC_SHARED"), "bits": bits,
           "methods": {m: METHODS[m].description for m in methods},
           "models": [], "results": [], "ablation": []}
    start = time.perf_counter()
    ablation_models = set(models) if ablation is True else set(ablation or ())
    ablation_bits = [f"{lo}/{hi}" for lo, hi in (parse_bits(b) for b in ablation_bits)]
    total = (len(models) * (1 + len(methods) * len(bits))
             + len(ablation_models & set(models)) * len(ABLATION) * len(ablation_bits))
    bar = tqdm(total=total, desc="compare", unit="run", disable=not progress, leave=True)
    datasets = {}
    try:
        for model_name in models:
            model, spec = load_model(model_name)
            key = (spec.dataset, repr(spec.eval_transform()), images)
            if key not in datasets:
                bar.set_postfix_str(f"loading {spec.dataset}")
                datasets[key] = load_dataset(spec.dataset, data_dirs.get(spec.dataset), transform=spec.eval_transform(),
                                             limit=images, seed=seed, cache=True)
            data = datasets[key]
            from .data import default_data_dir

            data_dir = data_dirs.get(spec.dataset) or default_data_dir(spec.dataset)
            entry = {"model": model_name, "dataset": spec.dataset, "data_dir": None if data_dir is None else str(data_dir),
                     "images": len(data), "weights": spec.weights, "fp32_size_mb": fp32_size_mb(model)}
            bar.set_postfix_str(f"{model_name} fp32")
            fp = evaluate(model, data, batch_size=batch_size, device=dev, progress=False)
            entry["fp32"] = {"top1": fp["top1"], "top5": fp["top5"]}
            out["results"].append({"model": model_name, "method": "fp32", "bits": "32", "top1": fp["top1"],
                                   "top5": fp["top5"], "size_mb": entry["fp32_size_mb"], "quantize_seconds": None,
                                   "settings": {}})
            bar.update(1)
            for b in bits:
                for method in methods:
                    bar.set_postfix_str(f"{model_name} {b} {method}")
                    qmodel, report = _quantize_one_thread(quantize, model, b, method)
                    acc = evaluate(qmodel, data, batch_size=batch_size, device=dev, progress=False)
                    out["results"].append({"model": model_name, "method": method, "bits": b, "top1": acc["top1"],
                                           "top5": acc["top5"], "size_mb": report.size_mb,
                                           "quantize_seconds": report.seconds, "settings": report.settings})
                    del qmodel
                    bar.update(1)
            for b in ablation_bits if model_name in ablation_models else ():
                for label, settings in ABLATION.items():
                    bar.set_postfix_str(f"{model_name} {b} ablation: {label}")
                    qmodel, report = _quantize_one_thread(quantize, model, b, "dfmpc+", **settings)
                    acc = evaluate(qmodel, data, batch_size=batch_size, device=dev, progress=False)
                    out["ablation"].append({"model": model_name, "variant": label, "method": "dfmpc+", "bits": b,
                                            "top1": acc["top1"], "top5": acc["top5"], "size_mb": report.size_mb,
                                            "quantize_seconds": report.seconds, "settings": report.settings})
                    del qmodel
                    bar.update(1)
            out["models"].append(entry)
            out["seconds"] = time.perf_counter() - start
            if json_path:
                _write(out, json_path)
    finally:
        bar.close()
    out["seconds"] = time.perf_counter() - start
    if json_path:
        _write(out, json_path)
    return out


def _quantize_one_thread(quantize, model, bits, method, **settings):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return quantize(model, bits=bits, method=method, **settings)
    finally:
        torch.set_num_threads(threads)


def _write(data: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def default_results_path() -> Path:
    """``$DFMPC_RESULTS/compare.json``, else ``<repository>/results/quick/compare.json``."""
    env = os.environ.get("DFMPC_RESULTS")
    if env:
        return Path(env) / "compare.json"
    return Path(__file__).resolve().parents[1] / "results" / "quick" / "compare.json"


def load_results(path: str | os.PathLike | None = None) -> dict | None:
    """The JSON of a comparison run, or None if the file does not exist."""
    path = Path(path) if path is not None else default_results_path()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DfmpcError(f"{str(path)!r} is not a comparison JSON ({e}); rerun dfmpc compare") from None


def pivot(data: dict, model: str, field: str = "top1") -> tuple[list[str], list[str], dict]:
    """(bits, methods, {(bits, method): value}) of one model."""
    rows = [r for r in data["results"] if r["model"] == model and r["method"] != "fp32"]
    bits = [b for b in data["bits"] if any(r["bits"] == b for r in rows)]
    methods = [m for m in data["methods"] if any(r["method"] == m for r in rows)]
    return bits, methods, {(r["bits"], r["method"]): r[field] for r in rows}


def figure(data: dict, model: str, bits: str, method: str = "dfmpc+", field: str = "top1",
           variant: str | None = None) -> float:
    """One measured value of a comparison: ``field`` of (model, bits, method), or of a dfmpc+ ablation
    ``variant``. The book checks every figure its text quotes against the JSON with it."""
    rows = data.get("ablation", []) if variant is not None else data["results"]
    for r in rows:
        if r["model"] == model and r["bits"] == bits and r["method"] == method and r.get("variant") == variant:
            return r[field]
    what = f"ablation variant {variant!r}" if variant is not None else f"method {method!r}"
    raise DfmpcError(f"no result for {model} at {bits} with {what} in this comparison")


def format_ablation(data: dict) -> str:
    """The dfmpc+ ablation rows: variants down, (model, bits) across, top-1 in %."""
    rows = data.get("ablation") or []
    if not rows:
        return ""
    cols = list(dict.fromkeys((r["model"], r["bits"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["model"], r["bits"]): r["top1"] for r in rows}
    header = ["dfmpc+ variant"] + [f"{m} {b}" for m, b in cols]
    lines = [header] + [[v] + [f"{cell[(v, m, b)]:.2f}" if (v, m, b) in cell else "" for m, b in cols] for v in variants]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
                     for line in lines)


def format_table(data: dict, field: str = "top1", fmt: str = "{:.2f}") -> str:
    """One block per model: bit widths down, methods across, ``field`` in the cells; the best cell of a row starred."""
    blocks = []
    for entry in data["models"]:
        bits, methods, cells = pivot(data, entry["model"], field)
        head = (f"{entry['model']} on {entry['dataset']} ({entry['images']:,} images), fp32 top-1 "
                f"{entry['fp32']['top1']:.2f} %, {entry['fp32_size_mb']:.2f} MB")
        header = ["bits"] + methods
        lines = [header]
        for b in bits:
            values = [cells.get((b, m)) for m in methods]
            best = max((v for v in values if v is not None), default=None) if field == "top1" else None
            lines.append([b] + ["" if v is None else fmt.format(v) + ("*" if best is not None and v == best else " ")
                                for v in values])
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        body = "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)
        blocks.append(head + "\n" + body)
    return "\n\n".join(blocks)
