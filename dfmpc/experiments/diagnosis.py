"""Diagnosis: why MP2/6 falls short here -- error growth through the layers, single pairs, bits and granularity."""
from __future__ import annotations

import time

from torch import nn

from ..plan import parse_bits, plan_layers
from ..quantizers import quantize_weight
from .measure import batch_of, feature_errors, weight_fit
from .paper import DFMPC_SETTINGS
from .paper import PAPER as _PAPER
from .session import c_summary

__all__ = ["NAME", "TITLE", "SETTINGS", "PAPER", "run"]

NAME = "diagnosis"
TITLE = "Diagnosis: why MP2/6 differs from the paper"
PAPER = {"table1": _PAPER["table1"]}
SETTINGS = {
    "quick": {"layer_model": "resnet56_cifar10_a", "layer_bits": ["2/6", "4/6"], "layer_images": 64,
              "sweep_model": "resnet20_cifar10_a", "sweep_bits": ["2/6", "3/6", "4/6", "6/6"],
              "sweep_granularity": ["tensor", "channel"], "sweep_images": 400,
              "pair_model": "resnet20_cifar10_a", "pair_bits": "2/6", "pair_images": 200, "pair_error_images": 64},
    "full": {"layer_model": "resnet56_cifar10_a", "layer_bits": ["2/6", "3/6", "4/6", "6/6"], "layer_images": 1000,
             "sweep_model": "resnet56_cifar10_a", "sweep_bits": ["2/6", "3/6", "4/6", "6/6"],
             "sweep_granularity": ["tensor", "channel"], "sweep_images": None,
             "pair_model": "resnet20_cifar10_a", "pair_bits": "2/6", "pair_images": None, "pair_error_images": 1000},
}


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
            pred, _ = session.predict(name, "cifar10", cfg["pair_images"], method, bits, keep_fp32=keep, **settings)
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
                pred, sweep_record = session.predict(name, "cifar10", cfg["sweep_images"], method, bits, granularity=gran,
                                                 **settings)
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
    out["cpu_s"]["weight_fit"] = time.process_time() - t0
    return out
