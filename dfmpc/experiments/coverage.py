"""Architecture coverage: every listed model x every method x bit width runs, and how faithfully.

No pretrained weights of most listed architectures can be had offline, so every model here has **random
weights** (BatchNorm affine parameters included) whose BatchNorm statistics were calibrated by one
train-mode pass over real images (:mod:`dfmpc.calibration`): a consistent network whose BN statistics
describe real inputs, as a trained network's do. On other real images (never those of the calibration) the
experiment measures, per model:

* for every method and bit width, the signal-to-quantization-noise ratio of the logits,
  SQNR = 10 log10(sum y^2 / sum (y_q - y)^2) in dB, and the agreement of the top-1 classes with fp32;
* how well the data-free input means that dfq and dfmpc+ use (:func:`dfmpc.propagation.input_moments`)
  match the measured ones, layer by layer.

This is the **fidelity of random-weight models, not accuracy**: it shows that a method runs on an
architecture and how much of the network's function it keeps, in a setting where the weights are not
trained. A CIFAR-100 model is shown CIFAR-10 test images (no CIFAR-100 test set is available offline;
fidelity needs no labels).
"""
from __future__ import annotations

import re

import torch

from ..api import quantize
from ..calibration import random_calibrated
from ..errors import DfmpcError
from ..methods import METHODS
from ..models import list_models, load_model
from ..propagation import input_moments
from .measure import batch_of, correlation, logits_of, measured_input_means, sqnr_db
from .session import one_thread

__all__ = ["NAME", "TITLE", "BOOK_PRESET", "SETTINGS", "METHODS_SETTING", "FAMILIES", "family", "run"]

NAME = "coverage"
TITLE = "Architecture coverage: random calibrated weights, every model x method x bits (fidelity, not accuracy)"
BOOK_PRESET = "full"

#: (pattern, family, the model that stands for the family in CI: ``pytest -m coverage``)
FAMILIES = (
    (r"resnet\d+_cifar10_a", "ResNet, CIFAR, option A (He et al.)", "resnet20_cifar10_a"),
    (r"chenyaofo_resnet\d+_cifar100", "ResNet, CIFAR, projection shortcuts (chenyaofo)", "chenyaofo_resnet56_cifar100"),
    (r"resnet\d+_cifar(10|100)", "ResNet, CIFAR (pytorchcv)", "resnet20_cifar10"),
    (r"resnet\d+", "ResNet, ImageNet (pytorchcv)", "resnet18"),
    (r"densenet\d+", "DenseNet (pytorchcv)", "densenet121"),
    (r"mobilenetv2_w1", "MobileNetV2 (pytorchcv)", "mobilenetv2_w1"),
    (r"bn_vgg\d+", "VGG with BN (pytorchcv)", "bn_vgg16"),
    (r"tv_resnet\d+", "ResNet (torchvision)", "tv_resnet18"),
    (r"tv_densenet\d+", "DenseNet (torchvision)", "tv_densenet121"),
    (r"tv_mobilenet_v2", "MobileNetV2 (torchvision)", "tv_mobilenet_v2"),
    (r"tv_vgg\d+_bn", "VGG with BN (torchvision)", "tv_vgg16_bn"),
    (r"efficientnet_lite\d", "EfficientNet-Lite", "efficientnet_lite0"),
)
REPRESENTATIVES = [representative for _, _, representative in FAMILIES]
# the methods this experiment measures: those of its committed run (book/data/coverage.json); ocs, squant and zeroq
# came later and are exercised on every listed model by tests/test_coverage.py (zeroq's distillation and output-error
# search take minutes per ImageNet model on a CPU), not yet measured here
COVERAGE_METHODS = ["original", "per-channel", "dfq", "omse", "dfmpc", "dfmpc+"]
#: The setting that lists the methods measured: one method's rows can be rerun alone (:mod:`.merge`).
METHODS_SETTING = "methods"
SETTINGS = {
    # CI: the small families, a few images
    "quick": {"models": ["resnet20_cifar10_a", "chenyaofo_resnet56_cifar100", "resnet20_cifar10", "mobilenetv2_w1",
                         "efficientnet_lite0"], "methods": COVERAGE_METHODS, "bits": ["2/6", "3/6"], "images": 32,
              "calibration_images": 32},
    "full": {"models": list_models(), "methods": COVERAGE_METHODS, "bits": ["2/6", "3/6"], "images": 256,
             "calibration_images": 64},
}


def family(name: str) -> str:
    """The architecture family of a model name (the coverage table groups by it)."""
    for pattern, label, _ in FAMILIES:
        if re.fullmatch(pattern, name):
            return label
    raise DfmpcError(f"model {name!r} belongs to no family of the coverage experiment; add it to FAMILIES")


def _moment_check(model, images: torch.Tensor) -> dict:
    """Predicted (from BN statistics) against measured input means, every Conv2d / Linear layer."""
    predicted = input_moments(model)
    measured = measured_input_means(model, images)
    rows = []
    for name, moments in list(predicted.items())[1:]:  # the first layer sees the image: assumed, not derived
        p, m = moments.mean.double(), measured[name]
        rows.append({"layer": name, "channels": int(m.numel()),
                     "rel_error": float((p - m).norm() / m.norm().clamp(min=1e-12)), "corr": correlation(p, m)})
    errors = sorted(r["rel_error"] for r in rows)
    corrs = sorted(r["corr"] for r in rows if r["corr"] is not None)
    worst = max(rows, key=lambda r: r["rel_error"])
    return {"layers": len(rows), "median_rel_error": errors[len(errors) // 2],
            "median_corr": corrs[len(corrs) // 2] if corrs else None,
            "worst_layer": worst["layer"], "worst_rel_error": worst["rel_error"], "rows": rows}


def run(session, cfg: dict) -> dict:
    from tqdm import tqdm

    methods = list(cfg["methods"])
    for m in methods:
        if m not in METHODS:
            raise DfmpcError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    n_cal, n_eval = cfg["calibration_images"], cfg["images"]
    out = {"methods": methods, "bits": list(cfg["bits"]), "models": [], "rows": []}
    total = len(cfg["models"]) * (1 + len(methods) * len(cfg["bits"]))
    with tqdm(total=total, desc="coverage", unit="run", disable=not session.progress, leave=False) as bar:
        for name in cfg["models"]:
            torch.manual_seed(session.seed)
            model, spec = load_model(name, pretrained=False)
            dataset = "imagenet" if spec.dataset == "imagenet" else "cifar10"  # no CIFAR-100 test set offline
            data, record = session.data(dataset, spec, None if n_eval is None else n_cal + n_eval)
            images, _ = batch_of(data, len(data))
            calibration, evaluation = images[:n_cal], images[n_cal:]
            if evaluation.shape[0] < 1:
                raise DfmpcError(f"coverage needs more than {n_cal} images of {dataset}")
            random_calibrated(model, calibration, session.seed)
            fp = logits_of(model, evaluation)
            out["models"].append({"model": name, "family": family(name), "dataset": dataset, "data": record,
                                  "calibration_images": int(calibration.shape[0]), "images": int(evaluation.shape[0]),
                                  "parameters": sum(p.numel() for p in model.parameters()),
                                  "moments": _moment_check(model, evaluation)})
            bar.update(1)
            for bits in cfg["bits"]:
                for method in methods:
                    bar.set_postfix_str(f"{name} {bits} {method}")
                    with one_thread():
                        q, report = quantize(model, bits, method=method)
                    logits = logits_of(q, evaluation)
                    out["rows"].append({"model": name, "method": method, "bits": bits, "sqnr_db": sqnr_db(fp, logits),
                                        "agreement_with_fp32": 100.0 * float((logits.argmax(1) == fp.argmax(1))
                                                                             .double().mean()),
                                        "finite": bool(torch.isfinite(logits).all()), "pairs": len(report.pairs),
                                        "quantize_seconds": report.seconds})
                    del q
                    bar.update(1)
    return out
