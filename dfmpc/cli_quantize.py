"""``dfmpc quantize``: quantize a model, evaluate it against full precision, say what was measured, save the best.

Every argument and output path is checked before the model is loaded; torch is imported only after that.
The output states the weights file, the data (folder, images, and whether it is the lossy offline copy that
allows relative comparisons only), one row per quantized model, and which model ``--save`` wrote and why.
"""
from __future__ import annotations

from pathlib import Path

from . import __version__
from .bits import parse_bits
from .cli_export import act_settings, check_quantize_options, export_kept
from .errors import DfmpcError
from .options import (
    check_model,
    check_output_file,
    check_positive,
    check_seed,
    parse_data_dirs,
    parse_floats,
    parse_images,
    parse_methods,
    parse_set_flags,
    parse_setting,
    write_json,
)
from .paths import DATASETS

__all__ = ["CALIBRATION_IMAGES", "DEFAULT_METHODS", "method_settings", "format_table", "best_row", "cmd_quantize"]

CALIBRATION_IMAGES = 64  # images of the one train-mode pass that calibrates BN statistics (--random-weights)
DEFAULT_METHODS = "original,dfmpc,dfmpc+"
_NOTES = {  # what a number measured on an offline copy can be compared with
    "cifar10": ["JPEG copy: relative comparisons only (the offline CIFAR-10 test set is stored as JPEG quality 75,",
                "which costs full precision about 10 points against published accuracies)"],
    "imagenet": ["offline subset: relative comparisons only (1,300 ILSVRC2012 validation images of 725 classes,",
                 "pre-scaled; 6 to 7 points easier than the full validation set)"],
}


#: settings that have a flag of their own (a --set of them would say the same thing twice)
FLAGGED_SETTINGS = {"granularity": "--granularity", "unpaired": "--unpaired", "keep_fp32": "--keep-fp32",
                    "fold": "--fold", "lambda1": "--lambda1", "lambda2": "--lambda2", "pairs": None, "inplace": None,
                    "progress": "--no-progress"}


def method_settings(method: str, args, spec=None) -> list[dict]:
    """The settings each run of ``method`` gets: one per (lambda1, lambda2) if it takes lambdas, else one; the
    model's input size for zeroq (``spec``: the model's ModelSpec); every ``--set KEY=VALUE`` the method takes,
    converted to the type of its default."""
    from .methods import setting_defaults, settings_for_model

    accepted = setting_defaults(method)
    sets = {key: parse_setting(text, accepted[key], f"--set {key}=")
            for key, text in parse_set_flags(getattr(args, "set", None)).items() if key in accepted}
    common = {"unpaired": args.unpaired, "keep_fp32": tuple(args.keep_fp32), **settings_for_model(method, spec), **sets}
    if spec is not None:
        common.update(act_settings(args, spec))
    if args.granularity is not None:  # else each method's own default (per-channel, omse, dfmpc+: channel)
        common["granularity"] = args.granularity
    if "fold" in accepted:
        common["fold"] = args.fold
    if "lambda1" not in accepted:
        return [common]
    return [{**common, "lambda1": l1, "lambda2": l2}
            for l1 in parse_floats("lambda1", args.lambda1) for l2 in parse_floats("lambda2", args.lambda2)]


def format_table(rows: list[dict]) -> str:
    header = ("method", "bits", "lambda1", "lambda2", "size MB", "top-1 %", "top-5 %", "agree %", "quantize s")
    lines = [header]
    for r in rows:
        seconds = "" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.3f}"
        lams = ["" if r[k] is None else f"{r[k]:g}" for k in ("lambda1", "lambda2")]
        lines.append((r["method"], r["bits"], *lams, f"{r['size_mb']:.2f}", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                      f"{r['agreement']:.2f}", seconds))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths)))
                     for line in lines)


def best_row(rows: list[dict], criterion: str, method: str | None = None) -> int:
    """Index of the quantized row with the highest ``criterion`` ("top1" or "agreement"), among ``method``'s rows if
    given; the first such row on a tie (rows run in the order the user listed the methods)."""
    candidates = [i for i, r in enumerate(rows) if r["method"] != "fp32" and (method is None or r["method"] == method)]
    return max(candidates, key=lambda i: (rows[i][criterion], -i))


def _checked(args) -> dict:
    """Every argument that can be checked without loading anything, output paths included."""
    check_model(args.model)
    checked = {"bits": ["{}/{}".format(*parse_bits(b)) for b in args.bits.split(",")],
               "methods": parse_methods(args.method), "images": parse_images(args.images)}
    parse_floats("lambda1", args.lambda1), parse_floats("lambda2", args.lambda2)
    check_positive("--batch-size", args.batch_size, unset_ok=False)
    check_positive("--threads", args.threads)
    check_seed(args.seed)
    for key in parse_set_flags(args.set):
        if key in FLAGGED_SETTINGS:
            flag = FLAGGED_SETTINGS[key]
            raise DfmpcError(f"--set {key}= is not for the command line" if flag is None else
                             f"{key} has its own flag: use {flag} instead of --set {key}=")
    if args.save_method is not None:
        if not args.save and not args.export:
            raise DfmpcError("--save-method says which model --save (or --export) writes; add --save FILE")
        if parse_methods(args.save_method, "--save-method") != [args.save_method.strip()]:
            raise DfmpcError(f"--save-method takes one method name, got {args.save_method!r}")
        if args.save_method.strip() not in checked["methods"]:
            raise DfmpcError(f"--save-method {args.save_method!r} is not among the methods run "
                             f"({', '.join(checked['methods'])}); add it to --method")
    if args.weights is not None and args.random_weights:
        raise DfmpcError("give either --weights or --random-weights, not both")
    if args.weights is not None and Path(args.weights).expanduser().is_dir():
        raise DfmpcError(f"--weights {args.weights!r} is a folder; pass the weights file itself")
    if args.weights is not None and not Path(args.weights).expanduser().is_file():
        raise DfmpcError(f"weights file {args.weights!r} does not exist; check the --weights path")
    if args.dataset is not None and args.dataset not in DATASETS:
        raise DfmpcError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    parse_data_dirs(args.data_dir, args.dataset or "cifar10")
    check_output_file(args.json, "--json")
    check_output_file(args.save, "--save")
    check_quantize_options(args)  # --act-bits, --act-rule, --export
    return checked


def _check_sets(args, checked) -> None:
    """Every ``--set`` key is a setting of at least one method run, and every method takes its values (its
    constructor checks them): before any model or image is loaded."""
    from .methods import METHODS, setting_defaults

    sets = parse_set_flags(args.set)
    for key in sets:
        if not any(key in setting_defaults(m) for m in checked["methods"]):
            takes = {m: sorted(set(setting_defaults(m)) - set(FLAGGED_SETTINGS)) for m in checked["methods"]}
            listed = "; ".join(f"{m}: {', '.join(k) or 'none'}" for m, k in takes.items())
            raise DfmpcError(f"no method run takes the setting {key!r} of --set (settings per method: {listed})")
    for method in checked["methods"]:
        for settings in method_settings(method, args):
            try:
                METHODS[method](checked["bits"][0], **settings)
            except TypeError as e:
                raise DfmpcError(f"method {method} does not take these settings ({e})") from None


def _data(args, spec, dataset_name: str, images):
    """The evaluation images (cached tensors) and a record of what they are (folder, count, offline copy)."""
    from .pipeline import evaluation_data

    data_dir = parse_data_dirs(args.data_dir, dataset_name).get(dataset_name)
    split = None if args.split == "all" else args.split
    data, record = evaluation_data(dataset_name, spec, data_dir, images, args.seed, split, progress=not args.no_progress,
                                   skip_unreadable=bool(args.skip_unreadable), fallback=False, cache=True)
    record.setdefault("unreadable_skipped", [])
    load = dict(name=dataset_name, data_dir=data_dir, transform=spec.eval_transform(), progress=not args.no_progress,
                skip_unreadable=args.skip_unreadable)
    return data, record, load


def _header(args, spec, record, weights: str) -> list[str]:
    lines = [f"model    {args.model} ({spec.dataset}, {spec.source})", f"weights  {weights}",
             f"data     {record['dataset']}: {record['images']:,} images from {record['path']}"]
    if record["selection"] != "all":
        of = f", out of {record['available']:,} images" if record["images"] < record["available"] else ""
        lines.append(f"         {record['selection']}{of}")
    if record.get("unreadable_skipped"):
        skipped = record["unreadable_skipped"]
        lines.append(f"         {len(skipped):,} unreadable images skipped (--skip-unreadable), e.g. {skipped[0]}")
    if record["offline_copy"] and record["dataset"] in _NOTES:
        lines += [f"         {line}" for line in _NOTES[record["dataset"]]]
    return lines


def cmd_quantize(args) -> int:
    checked = _checked(args)
    import torch

    from .evaluate import resolve_device

    device = resolve_device(args.device)
    _check_sets(args, checked)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, spec, data, record, weights = _model_and_data(args, checked["images"])
    print("\n".join(_header(args, spec, record, weights)))
    if args.act_bits is not None:
        print(f"acts     {args.act_bits}-bit activations, per tensor, asymmetric, ranges by the {args.act_rule} rule from "
              "the BatchNorm statistics (no data); the fp32 row keeps fp32 activations")
    labelled = not args.random_weights and record["dataset"] == spec.dataset
    if record["dataset"] != spec.dataset:  # e.g. a CIFAR-100 model where only the CIFAR-10 test set is at hand
        print(f"{args.model} classifies {spec.dataset} images and sees {record['dataset']} ones: its accuracies are "
              "meaningless; 'agree %' compares each quantized model with fp32")
    if args.random_weights:
        print("random weights: the accuracies are meaningless; 'agree %' says how close each quantized model stays "
              "to fp32")
    runs = [(bits, method, settings) for bits in checked["bits"] for method in checked["methods"]
            for settings in method_settings(method, args, spec)]
    criterion = "top1" if labelled else "agreement"
    results, cold, keep = _measure(args, model, data, device, runs, criterion)
    print(format_table(results))
    print(f"quantize s: after one untimed warm-up quantization ({runs[0][1]} {runs[0][0]} took {cold:.3f} s cold, with "
          "PyTorch's first-call set-up)\nsize MB: codes at their bit width, 32-bit scales (16-bit zero points on an "
          "asymmetric grid), compensation and other parameters (MB of 2^20 bytes); --save adds BatchNorm running "
          "statistics and a header")
    from .experiments.provenance import code_version

    # the commit and whether the checkout had changes: a stale result can be told from a fresh one
    out = {"model": args.model, "weights": weights, "dataset": record["dataset"], "data_dir": record["path"],
           "images": len(data), "data": record, "device": str(device), "seed": args.seed, "version": __version__,
           **code_version(), "torch": torch.__version__, "cold_quantize_seconds": cold,
           "warmup": {"method": runs[0][1], "bits": runs[0][0], "seconds": cold}, "results": results}
    if args.save:
        out["saved"] = _save(args, results, keep, criterion, weights, record)
    if args.export:
        out["exported"] = export_kept(args, keep, results[keep[0]], data, spec)
    if args.json:
        write_json(args.json, out, "--json")
    return 0


def _model_and_data(args, images):
    """The model (pretrained, or random with BN statistics calibrated on real images), the evaluation images,
    their record, and where the weights came from."""
    from .calibration import random_calibrated
    from .models import load_model

    model, spec = load_model(args.model, weights=args.weights, pretrained=not args.random_weights)
    dataset_name = args.dataset or spec.dataset
    if dataset_name != spec.dataset and not {dataset_name, spec.dataset} <= {"cifar10", "cifar100"}:
        raise DfmpcError(f"model {args.model} classifies {spec.dataset} images, not {dataset_name}; "
                         f"use --dataset {spec.dataset} or another model")
    data, record, load = _data(args, spec, dataset_name, images)
    weights = spec.weights
    if args.random_weights:  # BN statistics from real images (another seeded subset; it may overlap the evaluated)
        calibration = _calibration_images(load, CALIBRATION_IMAGES, args.seed + 1)
        random_calibrated(model, calibration, args.seed)
        weights = f"random, BatchNorm statistics calibrated on {len(calibration)} {dataset_name} images"
    return model, spec, data, record, weights


def _measure(args, model, data, device, runs, criterion):
    """fp32 and every run on the same images: the rows of the table, the cold seconds of the warm-up quantization,
    and (row index, model, report) of the model ``--save`` writes (the best by ``criterion``)."""
    from .api import quantize
    from .evaluate import predict
    from .pipeline import quantize_and_predict
    from .size import fp32_size_mb

    def run(net, desc):
        return predict(net, data, batch_size=args.batch_size, device=device, progress=not args.no_progress, desc=desc)

    # PyTorch's first calls (tracing, kernels, allocations) take longer: one untimed warm-up quantization first
    cold = quantize(model, bits=runs[0][0], method=runs[0][1], **runs[0][2])[1].seconds
    fp = run(model, "fp32")
    results = [{"method": "fp32", "bits": "32", "lambda1": None, "lambda2": None, "size_mb": fp32_size_mb(model),
                "top1": fp.top1_accuracy(), "top5": fp.top5_accuracy(), "agreement": 100.0, "quantize_seconds": None}]
    keep = None
    for bits, method, settings in runs:
        desc = f"{method} {bits}" + ("" if "lambda1" not in settings else
                                     f" l1={settings['lambda1']:g} l2={settings['lambda2']:g}")
        qmodel, report, pred = quantize_and_predict(model, data, method, bits, settings, device=device,
                                                    batch_size=args.batch_size, progress=not args.no_progress, desc=desc)
        results.append({"method": method, "bits": bits, "lambda1": settings.get("lambda1"),
                        "lambda2": settings.get("lambda2"), "size_mb": report.size_mb,
                        "top1": pred.top1_accuracy(), "top5": pred.top5_accuracy(),
                        "agreement": pred.agreement(fp), "quantize_seconds": report.seconds})
        if (args.save or args.export) and best_row(results, criterion, args.save_method) == len(results) - 1:
            keep = (len(results) - 1, qmodel, report)  # only the best so far stays in memory
    return results, cold, keep


def _save(args, results, keep, criterion, weights, record) -> dict:
    """Write the kept model packed, say which one it is and why; return what the JSON records about it."""
    from .packed import save_quantized

    index, qmodel, report = keep
    row = results[index]
    pool = sum(r["method"] != "fp32" and args.save_method in (None, r["method"]) for r in results)
    kind = f"{args.save_method} model" if args.save_method else "quantized model"
    why = (f"the only {kind} measured" if pool == 1 else
           f"the most {'accurate' if criterion == 'top1' else 'faithful to fp32'} of the {pool} {kind}s measured")
    score = f"{'top-1' if criterion == 'top1' else 'agreement with fp32'} {row[criterion]:.2f} %"
    # what a receiver of the file can use: the weights file's name (it carries the checksum prefix), not a path
    # on this machine; the data set and whether it was the offline copy; the scores measured
    local = weights and Path(weights).is_file()
    provenance = {"weights": Path(weights).name if local else weights,
                  "data": record["dataset"] + (" (offline copy)" if record["offline_copy"] else ""),
                  "images": record["images"], "top1": round(row["top1"], 2), "agreement": round(row["agreement"], 2)}
    # with --act-bits the file keeps the weights; `dfmpc export --act-bits N` quantizes the activations again
    weights_model = qmodel if report.weights_model is None else report.weights_model
    nbytes = save_quantized(weights_model, report, args.save, model_name=args.model, provenance=provenance)
    print(f"saved {row['method']} {row['bits']} to {args.save}: {nbytes / 2**20:.3f} MB on disk (report "
          f"{report.size_mb:.3f} MB), {why} ({score}); dfmpc.load_quantized({args.save!r}) loads it")
    return {"path": str(args.save), "method": row["method"], "bits": row["bits"], "lambda1": row["lambda1"],
            "lambda2": row["lambda2"], "criterion": criterion, "bytes": nbytes}


def _calibration_images(load: dict, count: int, seed: int):
    """``count`` images of the data set described by ``load`` (a seeded subset), as one tensor."""
    from .data import load_dataset

    return load_dataset(limit=count, seed=seed, cache=True, **load).tensors[0]
