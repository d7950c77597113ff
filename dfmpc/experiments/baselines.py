"""How strong the baselines are: each one checked against the property its paper leads with.

A comparison is only as honest as its weakest baseline. On pretrained models (the option-A ResNets,
EfficientNet-Lite0 and -Lite2; Lite2 is never used to decide anything) this experiment measures:

* **8 bits**: every baseline within about a point of full precision, as all of their papers report;
* **DFQ** (Nagel et al. 2019), their two claims: cross-layer equalization leaves the full-precision network's
  output unchanged (logits before and after, on real images; across ReLU6 with per-channel clip bounds, and
  the cost of replacing ReLU6 by ReLU instead), and the analytic bias correction predicts the bias that
  quantization adds (per layer, against the mean output shift measured on real images); then DFQ at 6/6 and
  4/6 against direct per-tensor quantization, which is what equalization is for;
* **OMSE** (Choukroun et al. 2019): its per-channel weight error is never above plain per-channel max
  scaling, layer by layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import DfmpcError
from ..methods import METHODS
from ..methods.base import Run
from ..methods.dfq import DataFreeQuantization
from ..methods.omse import weighted_quantization_error
from ..moments import expected_output_shift
from ..plan import plan_layers
from ..quantizers import quantize_weight
from .measure import batch_of, channel_means, correlation, logits_of

__all__ = ["NAME", "TITLE", "BOOK_PRESET", "SETTINGS", "BASELINES", "run"]

NAME = "baselines"
TITLE = "Baselines at their published strength: the property each paper leads with"
BOOK_PRESET = "full"
BASELINES = ["original", "per-channel", "dfq", "omse"]
_MODELS = ["resnet20_cifar10_a", "resnet56_cifar10_a", "efficientnet_lite0", "efficientnet_lite2"]
SETTINGS = {
    "quick": {"models": ["resnet20_cifar10_a", "efficientnet_lite0"], "images": 200, "check_images": 32,
              "methods": BASELINES, "dfq_bits": ["6/6", "4/6"], "dfq_models": ["efficientnet_lite0"]},
    "full": {"models": _MODELS, "images": None, "check_images": 256, "methods": BASELINES,
             "dfq_bits": ["6/6", "4/6"], "dfq_models": ["efficientnet_lite0", "efficientnet_lite2"]},
}


def _measured_output_shifts(model: nn.Module, deltas: dict, images: torch.Tensor) -> dict:
    """For every named layer, the mean over images and pixels of its output change when its weight changes by
    ``deltas[name]``, on its real inputs in ``model``."""
    layers = dict(model.named_modules())
    probes = {}
    for name, delta in deltas.items():
        probes[name] = copy.deepcopy(layers[name])
        with torch.no_grad():
            probes[name].weight.copy_(delta)
        probes[name].bias = None
    return channel_means(model, images, probes, batch_size=32)


def _dfq_checks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Equalization exactness (logits) and the analytic bias correction against the measured output shift."""
    reference = logits_of(model, images)
    out = {"fp32_top1": 100.0 * float((reference.argmax(1) == labels).double().mean())}
    for relu6 in ("clip", "relu"):
        method = DataFreeQuantization("6/6", relu6=relu6)
        with torch.no_grad():
            prepared = method.prepare(copy.deepcopy(model), plan_layers(model, "6/6", require_pairs=False), Run())
        logits = logits_of(prepared, images)
        out[f"equalized_{relu6}"] = {
            "max_rel_logit_change": float((logits - reference).abs().max() / reference.abs().max()),
            "top1": 100.0 * float((logits.argmax(1) == labels).double().mean()),
            "top1_agreement": 100.0 * float((logits.argmax(1) == reference.argmax(1)).double().mean())}
    method, run = DataFreeQuantization("6/6"), Run()
    with torch.no_grad():
        prepared = method.prepare(copy.deepcopy(model), plan_layers(model, "6/6", require_pairs=False), run)
    layers = dict(prepared.named_modules())
    quantized = [a for a in plan_layers(prepared, "6/6", require_pairs=False).layers if a.bits < 32]
    deltas = {}
    for a in quantized:
        w = layers[a.name].weight.detach()
        deltas[a.name] = method.quantize_layer(a.name, w, a.bits, run).dequantize() - w
    measured_shifts = _measured_output_shifts(prepared, deltas, images)
    rows = []
    for a in quantized:
        analytic = expected_output_shift(layers[a.name], deltas[a.name], run.moments[a.name])
        measured = measured_shifts[a.name]
        scale = float(measured.norm())
        rows.append({"layer": a.name, "rel_error": float((analytic - measured).norm()) / scale if scale > 0 else None,
                     "corr": correlation(analytic, measured),
                     "measured_norm": scale})
    errs = sorted(r["rel_error"] for r in rows if r["rel_error"] is not None)
    corrs = sorted(r["corr"] for r in rows if r["corr"] is not None)
    out["bias_correction"] = {"bits": "6/6", "layers": len(rows), "median_rel_error": errs[len(errs) // 2],
                              "median_corr": corrs[len(corrs) // 2], "rows": rows}
    return out


def _omse_check(model: nn.Module, bits: str) -> dict:
    """OMSE's per-channel weight error against per-channel max scaling, every quantized layer."""
    omse = METHODS["omse"](bits)
    modules = dict(model.named_modules())
    worst = None
    layers = 0
    for a in plan_layers(model, bits, require_pairs=False).layers:
        if a.bits >= 32:
            continue
        w = modules[a.name].weight.detach()
        e_omse = weighted_quantization_error(w, omse.quantize_layer(a.name, w, a.bits, Run()))
        e_max = weighted_quantization_error(w, quantize_weight(w, a.bits, "channel"))
        ratio = float((e_omse / e_max.clamp(min=1e-30)).max())
        worst = ratio if worst is None else max(worst, ratio)
        layers += 1
    # "never above" up to float32 rounding: both store their scales in the weight's float32 (1e-4 relative)
    return {"bits": bits, "layers": layers, "worst_error_ratio": worst, "never_above": worst <= 1 + 1e-4}


def run(session, cfg: dict) -> dict:
    for m in cfg["methods"]:
        if m not in METHODS:
            raise DfmpcError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    out = {"models": []}
    for name in cfg["models"]:
        model, spec = session.model(name)
        fp, record = session.predict(name, spec.dataset, cfg["images"])
        entry = {"model": name, "dataset": spec.dataset, "data": record, "fp32": fp.scores(), "rows": []}
        for bits in ["8/8"] + (list(cfg["dfq_bits"]) if name in cfg["dfq_models"] else []):
            for method in cfg["methods"] if bits == "8/8" else ["original", "dfq"]:
                pred, _ = session.predict(name, spec.dataset, cfg["images"], method, bits)
                entry["rows"].append({"method": method, "bits": bits, **pred.scores(),
                                      "agreement_with_fp32": pred.agreement(fp)})
        check_data, check_record = session.data(spec.dataset, spec, cfg["check_images"])
        images, labels = batch_of(check_data, len(check_data))
        entry["dfq_checks"] = {**_dfq_checks(model, images, labels), "data": check_record}
        entry["omse_checks"] = [_omse_check(model, bits) for bits in ("2/6", "4/6", "8/8")]
        out["models"].append(entry)
    return out
