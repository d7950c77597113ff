"""Diagnosis: why MP2/6 falls short here -- error growth through the layers, single pairs, bits and granularity,
and where DF-MPC's coefficients act (after the BatchNorm, as Eq. 7 puts them, or before it) against how large
they are (least-squares shrinkage or an unbiased gain)."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..plan import parse_bits, plan_layers
from ..quantizers import quantize_weight
from .measure import batch_of, feature_errors, weight_fit
from .paper import DFMPC_SETTINGS
from .paper import PAPER as _PAPER
from .session import c_summary

__all__ = ["NAME", "TITLE", "SETTINGS", "BOOK_OVERRIDES", "PAPER", "PLACEMENT_VARIANTS", "compensation_before_batch_norm", "run"]

NAME = "diagnosis"
TITLE = "Diagnosis: why MP2/6 differs from the paper"
PAPER = {"table1": _PAPER["table1"]}
SETTINGS = {
    "quick": {"layer_model": "resnet56_cifar10_a", "layer_bits": ["2/6", "4/6"], "layer_images": 64,
              "sweep_model": "resnet20_cifar10_a", "sweep_bits": ["2/6", "3/6", "4/6", "6/6"],
              "sweep_granularity": ["tensor", "channel"], "sweep_images": 400,
              "pair_model": "resnet20_cifar10_a", "pair_bits": "2/6", "pair_images": 200, "pair_error_images": 64,
              "placement_model": "resnet20_cifar10_a", "placement_bits": ["3/6"], "placement_images": 200},
    "full": {"layer_model": "resnet56_cifar10_a", "layer_bits": ["2/6", "3/6", "4/6", "6/6"], "layer_images": 1000,
             "sweep_model": "resnet56_cifar10_a", "sweep_bits": ["2/6", "3/6", "4/6", "6/6"],
             "sweep_granularity": ["tensor", "channel"], "sweep_images": None,
             "pair_model": "resnet20_cifar10_a", "pair_bits": "2/6", "pair_images": None, "pair_error_images": 1000,
             "placement_model": "resnet56_cifar10_a", "placement_bits": ["2/6", "3/6"], "placement_images": None},
}
#: What the book's result (``dfmpc experiments diagnosis --book``) changes in the quick preset: section 5 on every
#: test image of ResNet-56 at 2/6 and 3/6, where the paper's Table 1 and the issue's 1,000-image figures are.
BOOK_OVERRIDES = {"placement_model": "resnet56_cifar10_a", "placement_bits": ["2/6", "3/6"], "placement_images": None}
# Section 5: one scale per tensor (the paper's quantizers), one change at a time. "dfmpc+ ..." rows use dfmpc+
# stripped to a per-channel gain folded into the BatchNorm after the low layer (no mean correction), which is a gain
# applied *before* that BatchNorm. Its k-bit codes and scales are original's (max-scale, rounded to nearest: without
# rounding="nearest" they would be flip-rounded, a second change); its ternary codes are dfmpc+'s MSE-optimal ones
# with rho = 0, which differ from the paper's threshold on a few per cent of the weights (tested).
# The paper's grid and order are named, not left to dfmpc+'s defaults, so that a new default of either (the asymmetric
# grid and the least-error low layer are pending: dfmpc.experiments.adoption) cannot change these rows' k-bit codes.
_GAIN_ONLY = {"granularity": "tensor", "clipping": "none", "rounding": "nearest", "correlation": 0.0,
              "mean_correction": False, "grid": "symmetric", "low_layer": "first"}
PLACEMENT_VARIANTS = {
    "original (c = 1)": ("original", {}),
    "DF-MPC: c after BN and ReLU (Eq. 7)": ("dfmpc", dict(DFMPC_SETTINGS)),
    "DF-MPC's c moved before the BN": ("dfmpc-before-bn", dict(DFMPC_SETTINGS)),
    "least-squares c (lambda = 0) before the BN": ("dfmpc+", {**_GAIN_ONLY, "gain": "least-squares"}),
    "unbiased c = 1/a before the BN": ("dfmpc+", {**_GAIN_ONLY, "gain": "unbiased"}),
    "unbiased c before the BN + mean correction": ("dfmpc+", {**_GAIN_ONLY, "gain": "unbiased", "mean_correction": True}),
}


def compensation_before_batch_norm(original_q: nn.Module, dfmpc_report) -> nn.Module:
    """DF-MPC's coefficients moved before the BatchNorm: a copy of the ``original`` quantized model (the same codes
    as DF-MPC's) whose low layer of every pair has output channel j multiplied by c_j, instead of the high layer's
    input channel j (Eq. 7, which acts after the BatchNorm and ReLU between them)."""
    moved = copy.deepcopy(original_q)
    modules = dict(moved.named_modules())
    with torch.no_grad():
        for low, high in dfmpc_report.pairs:
            c = dfmpc_report.compensation[high].to(modules[low].weight.dtype)
            w = modules[low].weight
            w.mul_(c.reshape(-1, *([1] * (w.dim() - 1))))
    return moved



def run(session, cfg: dict) -> dict:
    out = {"cpu_s": {}}
    t0 = time.process_time()
    # 1. relative error of every layer's output, accumulated and local
    name = cfg["layer_model"]
    model, spec = session.model(name)
    data, record = session.data("cifar10", spec, cfg["layer_images"])
    images, _ = batch_of(data, len(data))
    layer_rows = {}
    for bits in cfg["layer_bits"]:
        for method, settings in (("original", {}), ("dfmpc", dict(DFMPC_SETTINGS))):
            q, report = session.quantized(name, method, bits, **settings)
            roles = {lr.name: lr for lr in report.layers}
            errs = feature_errors(model, q, images, device=session.device)
            for r in errs:
                lr = roles.get(r["name"])
                r.update(role=lr.role if lr else None, bits=lr.bits if lr else None, c_mean=lr.c_mean if lr else None)
            layer_rows[f"{method} {bits}"] = errs
    out["layers"] = {"model": name, "data": record, "errors": layer_rows}
    out["cpu_s"]["layers"], t0 = time.process_time() - t0, time.process_time()

    # 2. one pair at a time: only that pair quantized, everything else full precision
    name = cfg["pair_model"]
    model, spec = session.model(name)
    bits = cfg["pair_bits"]
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    plan = plan_layers(model, bits)
    err_data, _ = session.data("cifar10", spec, cfg["pair_error_images"])
    err_images, _ = batch_of(err_data, len(err_data))
    pair_rows = []
    fp, pair_record = session.predict(name, "cifar10", cfg["pair_images"])
    for p in plan.pairs:
        keep = tuple(n for n in names if n not in (p.low, p.high))
        row = {"low": p.low, "high": p.high}
        for method, settings in (("original", {}), ("dfmpc", dict(DFMPC_SETTINGS))):
            pred, _ = session.predict(name, "cifar10", cfg["pair_images"], method, bits,
                                      settings={"keep_fp32": keep, **settings})
            q, report = session.quantized(name, method, bits, keep_fp32=keep, **settings)
            errs = {r["name"]: r for r in feature_errors(model, q, err_images, device=session.device)}
            row[method] = {"top1": pred.top1_accuracy(), "agreement_with_fp32": pred.agreement(fp),
                           "low_error": errs[p.low]["local"], "high_error": errs[p.high]["accumulated"],
                           "logit_error": errs[names[-1]]["accumulated"], **c_summary(report)}
        pair_rows.append(row)
    out["pairs"] = {"model": name, "bits": bits, "fp32_top1": fp.top1_accuracy(), "data": pair_record, "rows": pair_rows}
    out["cpu_s"]["pairs"], t0 = time.process_time() - t0, time.process_time()

    # 3. accuracy against bits and granularity
    name = cfg["sweep_model"]
    sweep = []
    sweep_record = None
    for gran in cfg["sweep_granularity"]:
        for bits in cfg["sweep_bits"]:
            row = {"granularity": gran, "bits": bits}
            for method, settings in (("original", {}), ("dfmpc", dict(DFMPC_SETTINGS))):
                pred, sweep_record = session.predict(name, "cifar10", cfg["sweep_images"], method, bits,
                                                     settings={"granularity": gran, **settings})
                _, report = session.quantized(name, method, bits, granularity=gran, **settings)
                row[method] = {"top1": pred.top1_accuracy(), "size_mb": report.size_mb, **c_summary(report)}
            sweep.append(row)
    fp, _ = session.predict(name, "cifar10", cfg["sweep_images"])
    out["bits"] = {"model": name, "fp32_top1": fp.top1_accuracy(), "data": sweep_record, "rows": sweep}
    out["cpu_s"]["bits"], t0 = time.process_time() - t0, time.process_time()

    # 4. the weights alone: how far each low-bit layer is from full precision, and how far it could get with
    #    the best rescaling of each output channel (the most any per-channel compensation can do)
    fits = []
    for name in dict.fromkeys([cfg["layer_model"], cfg["sweep_model"]]):
        model, _ = session.model(name)
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
    out["cpu_s"]["weight_fit"], t0 = time.process_time() - t0, time.process_time()

    # 5. where c acts and how large it is: the same codes (one scale per tensor), one change at a time
    out["placement"] = _placement(session, cfg)
    out["cpu_s"]["placement"] = time.process_time() - t0
    return out


def _placement(session, cfg: dict) -> dict:
    from ..evaluate import predict

    name = cfg["placement_model"]
    model, spec = session.model(name)
    fp, record = session.predict(name, "cifar10", cfg["placement_images"])
    rows = []
    for bits in cfg["placement_bits"]:
        for label, (method, settings) in PLACEMENT_VARIANTS.items():
            if method == "dfmpc-before-bn":
                _, report = session.quantized(name, "dfmpc", bits, **settings)
                original_q, _ = session.quantized(name, "original", bits)
                data, _ = session.data("cifar10", spec, cfg["placement_images"])
                pred = predict(compensation_before_batch_norm(original_q, report), data, device=session.device,
                               batch_size=128)
            else:
                pred, _ = session.predict(name, "cifar10", cfg["placement_images"], method, bits, settings=settings)
                _, report = session.quantized(name, method, bits, **settings)
            rows.append({"bits": bits, "variant": label, "method": method, "settings": settings,
                         "top1": pred.top1_accuracy(), "agreement_with_fp32": pred.agreement(fp), **c_summary(report)})
    return {"model": name, "fp32_top1": fp.top1_accuracy(), "data": record, "rows": rows}
