"""The ``dfmpc`` command line.

    dfmpc models                      # the model names
    dfmpc methods                     # the quantization methods
    dfmpc quantize --model resnet56_cifar10_a --weights resnet56.th --dataset cifar10 \\
                   --data-dir ../shared/data/cifar10/test_jpeg --bits 2/6 --json out.json
    dfmpc compare --quick --json results/quick/compare.json   # every method x bits x model

Bad input ends with one line on stderr naming the problem and the fix, and exit status 2.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

from . import __version__
from .errors import DfmpcError
from .methods import METHODS
from .plan import parse_bits


def _methods(value: str) -> list[str]:
    names = list(METHODS) if value.strip() == "all" else [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in METHODS:
            raise DfmpcError(f"unknown method {name!r}; choose from {', '.join(METHODS)} or 'all' (dfmpc methods lists them)")
    return names


def _floats(name: str, value: str) -> list[float]:
    """A comma-separated list of non-negative numbers (a sweep), e.g. "0,0.5"."""
    out = []
    for item in str(value).split(","):
        try:
            x = float(item)
        except ValueError:
            raise DfmpcError(f"--{name} takes numbers separated by commas, got {value!r}") from None
        if not x >= 0:  # also rejects NaN
            raise DfmpcError(f"--{name} must be a non-negative number, got {item.strip()}")
        out.append(x)
    return out


def method_settings(method: str, args) -> list[dict]:
    """The settings each run of ``method`` gets: one per (lambda1, lambda2) if it takes lambdas, else one."""
    accepted = inspect.signature(METHODS[method].__init__).parameters
    common = {"unpaired": args.unpaired, "keep_fp32": tuple(args.keep_fp32)}
    if args.granularity is not None:  # else each method's own default (per-channel, omse, dfmpc+: channel)
        common["granularity"] = args.granularity
    if "fold" in accepted:
        common["fold"] = args.fold
    if "lambda1" not in accepted:
        return [common]
    return [{**common, "lambda1": l1, "lambda2": l2}
            for l1 in _floats("lambda1", args.lambda1) for l2 in _floats("lambda2", args.lambda2)]


def format_table(rows: list[dict]) -> str:
    header = ("method", "bits", "lambda1", "lambda2", "size MB", "top-1 %", "top-5 %", "quantize s")
    lines = [header]
    for r in rows:
        seconds = "" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.3f}"
        lams = ["" if r[k] is None else f"{r[k]:g}" for k in ("lambda1", "lambda2")]
        lines.append((r["method"], r["bits"], *lams, f"{r['size_mb']:.2f}", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                      seconds))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths)))
                     for line in lines)


def cmd_quantize(args) -> int:
    from .api import quantize
    from .data import DATASETS, load_dataset
    from .evaluate import evaluate
    from .models import load_model
    from .size import fp32_size_mb

    bit_list = ["{}/{}".format(*parse_bits(b)) for b in args.bits.split(",")]
    _floats("lambda1", args.lambda1), _floats("lambda2", args.lambda2)
    methods = _methods(args.method)
    if args.weights is not None and not Path(args.weights).is_file():
        raise DfmpcError(f"weights file {args.weights!r} does not exist; check the --weights path")
    if args.limit is not None and args.limit < 1:
        raise DfmpcError(f"--limit must be a positive number of images, got {args.limit}")
    torch.manual_seed(args.seed)

    if args.dataset is not None and args.dataset not in DATASETS:
        raise DfmpcError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    model, spec = load_model(args.model, weights=args.weights)
    dataset_name = args.dataset or spec.dataset
    if dataset_name != spec.dataset:
        raise DfmpcError(f"model {args.model} classifies {spec.dataset} images, not {dataset_name}; "
                         f"use --dataset {spec.dataset} or another model")
    data = load_dataset(dataset_name, args.data_dir, transform=spec.eval_transform(), limit=args.limit,
                        seed=args.seed, cache=True, progress=not args.no_progress)
    progress = not args.no_progress
    device = args.device

    results = []
    fp = evaluate(model, data, batch_size=args.batch_size, device=device, progress=progress, desc="fp32")
    results.append({"method": "fp32", "bits": "32", "lambda1": None, "lambda2": None,
                    "size_mb": fp32_size_mb(model), "top1": fp["top1"], "top5": fp["top5"], "quantize_seconds": None})
    saved = None
    for bits in bit_list:
        for method in methods:
            for settings in method_settings(method, args):
                qmodel, report = quantize(model, bits=bits, method=method, **settings)
                desc = f"{method} {bits}" + ("" if "lambda1" not in settings else
                                             f" l1={settings['lambda1']:g} l2={settings['lambda2']:g}")
                acc = evaluate(qmodel, data, batch_size=args.batch_size, device=device, progress=progress, desc=desc)
                results.append({"method": method, "bits": bits, "lambda1": settings.get("lambda1"),
                                "lambda2": settings.get("lambda2"), "size_mb": report.size_mb, "top1": acc["top1"],
                                "top5": acc["top5"], "quantize_seconds": report.seconds})
                if saved is None or (method == "dfmpc" and saved[0] != "dfmpc"):
                    saved = (method, qmodel, report, bits)

    n = len(data)
    print(f"{args.model} on {dataset_name} ({n} images{'' if args.data_dir is None else ' from ' + str(args.data_dir)})")
    print(format_table(results))
    if args.json:
        out = {"model": args.model, "dataset": dataset_name, "data_dir": args.data_dir, "limit": args.limit,
               "images": n, "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
               "seed": args.seed, "version": __version__, "torch": torch.__version__, "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.save and saved is not None:
        method, qmodel, report, bits = saved
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": args.model, "method": method, "bits": bits, "settings": report.settings,
                    "state_dict": qmodel.state_dict()}, args.save)
        print(f"saved the {method} model's weights to {args.save} (load_model({args.model!r}) then load_state_dict)")
    return 0


def cmd_models(args) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


def cmd_methods(args) -> int:
    width = max(len(n) for n in METHODS)
    for name, cls in METHODS.items():
        print(f"{name.ljust(width)}  {cls.description}")
    return 0


def cmd_benchmark(args) -> int:
    from .benchmark import benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = benchmark([m.strip() for m in args.models.split(",") if m.strip()], args.bits, args.repeat, device)
    print(f"{'model':<22} {'params':>10} {'pairs':>5} {'cold s':>8} {'median s':>9} {'min s':>7}  device  weights")
    for r in rows:
        print(f"{r['model']:<22} {r['parameters']:>10,} {r['pairs']:>5} {r['cold_s']:>8.3f} {r['median_s']:>9.3f} "
              f"{r['min_s']:>7.3f}  {r['device']:<6}  {r['weights']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import EXPERIMENTS, run_all

    if args.limit is not None and args.images is not None:
        raise DfmpcError("give either --limit N or --images all, not both")
    if args.images is not None and args.images != "all":
        raise DfmpcError(f"--images takes 'all', got {args.images!r}; use --limit N for N images")
    if args.limit is not None and args.limit < 1:
        raise DfmpcError(f"--limit must be a positive number of images, got {args.limit}")
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    for name in only or []:
        if name not in EXPERIMENTS:
            raise DfmpcError(f"unknown experiment {name!r} in --only; choose from {', '.join(EXPERIMENTS)}")
    mode = "full" if args.full else "quick"
    out = args.out or f"results/{mode}"
    command = " ".join(a for a in ["dfmpc reproduce", f"--{mode}", f"--out {out}",
                                   f"--limit {args.limit}" if args.limit else "", "--images all" if args.images else "",
                                   f"--device {args.device}" if args.device else "",
                                   f"--only {args.only}" if args.only else ""] if a)
    run_all(mode, out, limit=args.limit or args.images, device=args.device, seed=args.seed, only=only,
            progress=not args.no_progress, command=command, threads=args.threads, cifar10_dir=args.cifar10_dir,
            cifar100_dir=args.cifar100_dir, imagenet_dir=args.imagenet_dir)
    return 0


def _images(value: str) -> int | None:
    if value.strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise DfmpcError(f"--images takes a positive number or 'all', got {value!r}") from None
    if n < 1:
        raise DfmpcError(f"--images takes a positive number or 'all', got {value!r}")
    return n


def _ablation_models(args, models) -> list[str]:
    """--ablation without a value (or --quick): every model; --ablation a,b: those models."""
    if args.ablation is None:
        return list(models) if args.quick else []
    if args.ablation == "all":
        return list(models)
    names = [m.strip() for m in args.ablation.split(",") if m.strip()]
    unknown = [m for m in names if m not in models]
    if unknown:
        raise DfmpcError(f"--ablation names {unknown[0]!r}, which is not among --models; use 'all' or names from --models")
    return names


def cmd_compare(args) -> int:
    from .compare import ABLATION_BITS, DEFAULT_BITS, DEFAULT_MODELS, QUICK, format_ablation, format_table, run_comparison

    models = QUICK["models"] if args.quick else DEFAULT_MODELS
    images = QUICK["images"] if args.quick else None
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.images is not None:
        images = _images(args.images)
    bits = [b.strip() for b in args.bits.split(",") if b.strip()] if args.bits else list(DEFAULT_BITS)
    data_dirs = {}
    for item in args.data or []:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise DfmpcError(f"--data takes DATASET=FOLDER (e.g. cifar10=../shared/data/cifar10/test_jpeg), got {item!r}")
        data_dirs[name.strip().lower()] = path
    if args.threads:
        torch.set_num_threads(args.threads)
    ablation_bits = QUICK["ablation_bits"] if args.quick else ABLATION_BITS
    data = run_comparison(models, _methods(args.method), bits, images, args.device, args.seed, args.batch_size,
                          not args.no_progress, data_dirs, args.json, command="dfmpc " + " ".join(sys.argv[1:]),
                          ablation=_ablation_models(args, models), ablation_bits=ablation_bits)
    print(format_table(data))
    if data["ablation"]:
        print("\nablation of dfmpc+ (top-1 %):")
        print(format_ablation(data))
    print("\nsize MB / seconds to quantize (CPU):")
    print(format_table(data, "size_mb", "{:.3f}"))
    print()
    print(format_table(data, "quantize_seconds", "{:.2f}"))
    print(f"\n{data['device']}; {data['seconds']:.0f} s in all" + (f"; written to {args.json}" if args.json else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfmpc", description="Data-free mixed-precision compensation (DF-MPC).")
    parser.add_argument("--version", action="version", version=f"dfmpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the model names").set_defaults(func=cmd_models)
    sub.add_parser("methods", help="list the quantization methods").set_defaults(func=cmd_methods)

    b = sub.add_parser("benchmark", help="time quantize + compensate (evaluation excluded)")
    b.add_argument("--models", default="resnet18,resnet56_cifar10_a", help="comma-separated model names")
    b.add_argument("--bits", default="2/6")
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    b.add_argument("--json", help="write the timings here as JSON")
    b.set_defaults(func=cmd_benchmark)

    q = sub.add_parser("quantize", help="quantize a model and evaluate fp32, direct quantization and DF-MPC")
    q.add_argument("--model", required=True, help="a name from `dfmpc models`")
    q.add_argument("--weights", help="local weights file for the model (default: offline copy or download)")
    q.add_argument("--dataset", help="cifar10 | cifar100 | imagenet (default: the model's)")
    q.add_argument("--data-dir", help="image folder or torchvision root (default: $DFMPC_SHARED copy or download)")
    q.add_argument("--bits", default="2/6", help="LOW/HIGH with 2 <= LOW <= HIGH <= 8; 2 means ternary (default 2/6); "
                   "a comma-separated list sweeps, e.g. 2/6,3/6")
    q.add_argument("--method", default="original,dfmpc", help="method name(s), comma-separated, or 'all' (default original,dfmpc)")
    q.add_argument("--lambda1", default="0.5", help="weight of ||Theta||^2 (default 0.5); a comma-separated list sweeps")
    q.add_argument("--lambda2", default="0", help="weight of ||c||^2 (default 0); a comma-separated list sweeps")
    q.add_argument("--granularity", choices=("tensor", "channel"), default=None,
                   help="scale per tensor (paper) or per output channel (default: the method's own, see dfmpc methods)")
    q.add_argument("--unpaired", choices=("high", "low", "fp32"), default="high", help="bits of layers outside any pair")
    q.add_argument("--keep-fp32", nargs="*", default=[], help="layers kept in full precision ('first', 'last' or names)")
    q.add_argument("--fold", choices=("next", "bn"), default="next", help="put c into layer l+1 (Eq. 7) or into the BN of layer l")
    q.add_argument("--limit", type=int, help="evaluate on a fixed random subset of N images")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    q.add_argument("--save", help="write the quantized model's state_dict here")
    q.add_argument("--json", help="write the results here as JSON")
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser("reproduce", help="run the paper's experiments; one JSON per table / figure")
    speed = r.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="CPU, offline data, image subsets, minutes (default)")
    speed.add_argument("--full", action="store_true", help="GPU, real data sets, all images, fine grids")
    r.add_argument("--out", help="folder for the JSON files (default results/quick or results/full)")
    r.add_argument("--limit", type=int, help="every image subset gets N images (recorded in the JSON)")
    r.add_argument("--images", help="'all': use every image of the data sets")
    r.add_argument("--device", help="cpu | cuda (default: cpu for --quick, cuda when available for --full)")
    r.add_argument("--only", help="comma-separated experiments: table1,table2,table34,fig3,fig4,fig5,timing,diagnosis")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, help="CPU threads (default: 1 for --quick, torch's default for --full)")
    r.add_argument("--cifar10-dir", help="CIFAR-10 test set (class folders or torchvision files)")
    r.add_argument("--cifar100-dir", help="CIFAR-100 test set (class folders or torchvision files)")
    r.add_argument("--imagenet-dir", help="ImageNet validation images in <wnid>/ folders (--full; or $DFMPC_IMAGENET_DIR)")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    r.set_defaults(func=cmd_reproduce)

    c = sub.add_parser("compare", help="every method x bit width x model in one run (table + JSON)")
    c.add_argument("--models", help="comma-separated model names (default: resnet20_cifar10_a, resnet56_cifar10_a, "
                                    "efficientnet_lite0)")
    c.add_argument("--method", default="all", help="method name(s), comma-separated, or 'all' (default all)")
    c.add_argument("--bits", help="comma-separated LOW/HIGH bit widths (default 2/6,3/6,4/6,6/6)")
    c.add_argument("--images", help="evaluate on a fixed random subset of N images per data set, or 'all' (default all)")
    c.add_argument("--quick", action="store_true",
                   help="what CI runs: resnet20_cifar10_a on 500 images, all methods and bits, and the ablation at 2/6")
    c.add_argument("--ablation", nargs="?", const="all", default=None, metavar="MODELS",
                   help="also run the dfmpc+ variants (one ingredient changed) at 2/6 and 3/6, for every model or "
                        "the comma-separated MODELS")
    c.add_argument("--data", action="append", metavar="DATASET=FOLDER",
                   help="data folder of a data set (default: the $DFMPC_SHARED copy or a download); repeatable")
    c.add_argument("--device", help="where to evaluate: cpu | cuda (default: cuda when available); quantization runs on the CPU")
    c.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    c.add_argument("--json", "--out", dest="json", help="write the results here as JSON (after every model)")
    c.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DfmpcError as exc:
        print(f"dfmpc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfmpc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
