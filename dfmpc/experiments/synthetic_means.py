"""Could images distilled from the BN statistics improve dfmpc+'s mean correction? A probe on the development half.

dfmpc+'s step 3 predicts from the BN statistics how quantization shifts the mean of every layer's output, for
full-precision inputs. On images distilled from those statistics (ZeroQ's Eq. 2, :func:`dfmpc.distill.distill_data`)
the shift can be measured instead, in execution order, on the quantized model itself, where every layer sees the
quantized layers before it. This experiment quantizes with dfmpc+ without its mean correction, then, in one pass over
the distilled images, sets the running mean of every BatchNorm after a quantized layer to

    E_d[X^] + rm - E_d[X] / c                                                    (:func:`correct_means`)

(E_d: the mean over the distilled images; X^ the BN's input in the quantized model, X in the full-precision one; rm
the running mean dfmpc+ left, mu / c; c the gain folded into the BN), that is (mu + E_d[c X^ - X]) / c: step 3 with
the measured shift in place of the predicted one. The BN's output then has on the distilled images the mean of the
full-precision model's (tested). A layer without a BN after it (the classifier) keeps its bias.

Nothing here is a method or a default: it measures whether a "dfmpc+, synthetic data" variant is worth building (the
comparison's synthetic-data target), on the cells where choices are made, with several distillation seeds and two
budgets on ResNet-20 and EfficientNet-Lite0.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..distill import distill_data, hooked_pass, model_input_shape
from ..graph import BATCH_NORMS
from ..methods.zeroq import collect_statistics
from ..propagation import following_batch_norms
from .compare import DEVELOPMENT_MODELS, accuracy_scores, evaluation_set, measured_row

__all__ = ["NAME", "TITLE", "BOOK_PRESET", "SETTINGS", "run", "correct_means", "table"]

NAME = "synthetic_means"
TITLE = "dfmpc+ with its mean correction measured on distilled images, on the development half"
BOOK_PRESET = "full"
SETTINGS = {
    "quick": {"models": ["resnet20_cifar10_a"], "bits": ["2/6"], "images": 200, "split": "dev",
              "distillations": {"resnet20_cifar10_a": [[5, 8, 0]]}},
    # [steps, images, seed]: ZeroQ's authors' budget (500 on 32) with three seeds and the comparison's ZeroQ budget
    # (100) on ResNet-20; on Lite0 the comparison's (100 steps on 8 images at 224 px) and the authors' (about 20
    # minutes on one CPU thread)
    "full": {"models": DEVELOPMENT_MODELS, "bits": ["2/6", "3/6", "4/6"], "images": None, "split": "dev",
             "distillations": {"resnet20_cifar10_a": [[500, 32, 0], [500, 32, 1], [500, 32, 2], [100, 32, 0]],
                               "efficientnet_lite0": [[100, 8, 0], [500, 32, 0]]}},
}


def correct_means(qmodel: nn.Module, fp_model: nn.Module, batch_norms, x: torch.Tensor) -> None:
    """Set the running mean of every BatchNorm named in ``batch_norms`` of ``qmodel`` (quantized by dfmpc+ without
    its mean correction, from ``fp_model``) to E_d[X^] + rm - E_d[X] / c, in one pass over ``x`` in execution order
    (module docstring); c is read from the BN: its weight over the full-precision one's, or without an affine weight
    from the running variances dfmpc+ divided by c^2."""
    _, _, fp_moments = collect_statistics(fp_model, [], x, grams=False, bn_inputs=True)
    fp_modules, done = dict(fp_model.named_modules()), set()

    def correct(bn, inputs, name):
        if name in done:  # a BN called twice keeps its first correction
            return
        done.add(name)
        fp = fp_modules[name]
        if bn.weight is not None:
            c = bn.weight.double() / fp.weight.double()
        else:
            c = torch.sqrt((fp.running_var.double() + fp.eps) / (bn.running_var.double() + bn.eps))
        dims = [d for d in range(inputs[0].dim()) if d != 1]
        mean_q = inputs[0].double().mean(dim=dims)
        bn.running_mean.copy_(mean_q + bn.running_mean.double() - fp_moments[name][0] / c)

    wanted = set(batch_norms)
    handles = [m.register_forward_pre_hook(lambda m, i, n=n: correct(m, i, n)) for n, m in qmodel.named_modules()
               if n in wanted and isinstance(m, BATCH_NORMS)]
    hooked_pass(qmodel, x, handles)


def run(session, cfg: dict) -> dict:
    out = {"ablation": [], "ablation_fp32": [], "distillations": {}}
    for name in cfg["models"]:
        model, spec = session.model(name)
        dataset, fp, record, labelled = evaluation_set(session, name, spec, cfg["images"], cfg["split"])
        out["ablation_fp32"].append({"model": name, "data": record, **accuracy_scores(fp, labelled)})
        for bits in cfg["bits"]:
            for label, settings in (("dfmpc+", {}), ("no mean correction", {"mean_correction": False})):
                row = measured_row(session, name, dataset, cfg["images"], cfg["split"], "dfmpc+", bits, fp, labelled,
                                   settings)
                out["ablation"].append({"variant": label, **row})
        shape, after = model_input_shape(model, spec.input_size), following_batch_norms(model)
        for steps, images, seed in cfg["distillations"][name]:
            start = time.perf_counter()
            x = distill_data(model, shape, images, steps, 0.5, seed)  # ZeroQ's lr; its own seeded generator
            seconds = time.perf_counter() - start
            label = f"means on distilled images ({steps} steps, {images} images, seed {seed})"
            out["distillations"][f"{name}: {label}"] = {"steps": steps, "images": images, "seed": seed,
                                                        "seconds": seconds}
            for bits in cfg["bits"]:
                qmodel, report = session.quantized(name, "dfmpc+", bits, mean_correction=False)
                corrected = copy.deepcopy(qmodel)
                correct_means(corrected, model, [after[n] for n in report.quantized if n in after], x)
                pred, _ = session.evaluate(corrected, name, dataset, cfg["images"], cfg["split"])
                out["ablation"].append({"variant": label, "model": name, "method": "dfmpc+", "bits": bits,
                                        **accuracy_scores(pred, labelled), "agreement_with_fp32": pred.agreement(fp),
                                        "distillation": [steps, images, seed]})
    return out


def table(data: dict, labels: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """The chapter's table: per model, one row per variant (dfmpc+ as it is, without its mean correction, and with
    its means measured on each distillation), top-1 % at every bit width."""
    rows = data["results"]["ablation"]
    bits = list(dict.fromkeys(r["bits"] for r in rows))
    cell = {(r["model"], r["variant"], r["bits"]): r["top1"] for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == model):
            out.append([labels.get(model, model), variant,
                        *(f"{cell[(model, variant, b)]:.2f}" if (model, variant, b) in cell else "" for b in bits)])
    return ["model", "dfmpc+", *bits], out
