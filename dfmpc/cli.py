"""The ``dfmpc`` command line.

    dfmpc models                      # the model names
    dfmpc methods                     # the quantization methods
    dfmpc quantize --model resnet56_cifar10_a --bits 2/6 --images 1000 --json out.json
    dfmpc benchmark                   # seconds to quantize + compensate
    dfmpc experiments --quick         # every experiment of the book, one JSON each (--list lists them)

One vocabulary across subcommands: ``--images N|all`` (how many evaluation images: a fixed random subset),
``--data-dir [DATASET=]DIR``, ``--device``, ``--seed``, ``--threads``, ``--batch-size``, ``--no-progress``;
``--json FILE`` writes one JSON file, ``--out DIR`` a folder of them.
Bad input ends with one line on stderr naming the problem and the fix, and exit status 2.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from . import __version__
from .errors import DfmpcError
from .methods import METHODS
from .plan import parse_bits

__all__ = ["main", "build_parser", "method_settings", "format_table", "CALIBRATION_IMAGES"]

CALIBRATION_IMAGES = 64  # images of the one train-mode pass that calibrates BN statistics (--random-weights)


def _methods(value: str) -> list[str]:
    names = list(METHODS) if value.strip() == "all" else [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise DfmpcError("--method names no method; give names from `dfmpc methods`, comma-separated, or 'all'")
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


def _images(value: str | None):
    """``--images``: None (not given), "all", or a positive count."""
    if value is None or value.strip().lower() == "all":
        return None if value is None else "all"
    try:
        n = int(value)
    except ValueError:
        raise DfmpcError(f"--images takes a positive number or 'all', got {value!r}") from None
    if n < 1:
        raise DfmpcError(f"--images takes a positive number or 'all', got {value!r}")
    return n


def _data_dirs(values, default_dataset: str | None = None) -> dict:
    """``--data-dir [DATASET=]DIR`` (repeatable) as {dataset: folder}; a bare DIR needs ``default_dataset``."""
    from .data import DATASETS

    out = {}
    for item in values or ():
        name, sep, path = item.partition("=")
        if not sep:
            if default_dataset is None:
                raise DfmpcError(f"--data-dir {item!r} does not say which data set; write DATASET=DIR, "
                                 f"e.g. cifar10={item}")
            name, path = default_dataset, item
        name = name.strip().lower()
        if name not in DATASETS:
            raise DfmpcError(f"--data-dir names unknown data set {name!r}; use one of {', '.join(DATASETS)}")
        if not Path(path).expanduser().is_dir():
            raise DfmpcError(f"--data-dir {path!r} is not a folder; pass the folder that holds the {name} images")
        out[name] = path
    return out


def _writable_file(path: str | None, flag: str) -> None:
    """Fail before any work if ``path`` cannot be written as a file."""
    if path and Path(path).is_dir():
        raise DfmpcError(f"{flag} {path!r} is a folder; give a file name, e.g. {Path(path) / 'result.json'}")


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


def cmd_quantize(args) -> int:
    import torch

    from .api import quantize
    from .calibration import random_calibrated
    from .data import DATASETS, load_dataset
    from .evaluate import predict, resolve_device
    from .models import load_model
    from .size import fp32_size_mb

    bit_list = ["{}/{}".format(*parse_bits(b)) for b in args.bits.split(",")]
    _floats("lambda1", args.lambda1), _floats("lambda2", args.lambda2)
    methods = _methods(args.method)
    images = _images(args.images)
    device = resolve_device(args.device)
    if args.batch_size < 1:
        raise DfmpcError(f"--batch-size must be at least 1, got {args.batch_size}")
    _writable_file(args.json, "--json")
    _writable_file(args.save, "--save")
    if args.weights is not None and args.random_weights:
        raise DfmpcError("give either --weights or --random-weights, not both")
    if args.weights is not None and not Path(args.weights).is_file():
        raise DfmpcError(f"weights file {args.weights!r} does not exist; check the --weights path")
    if args.dataset is not None and args.dataset not in DATASETS:
        raise DfmpcError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, spec = load_model(args.model, weights=args.weights, pretrained=not args.random_weights)
    dataset_name = args.dataset or spec.dataset
    cifar = {"cifar10", "cifar100"}
    if dataset_name != spec.dataset and not {dataset_name, spec.dataset} <= cifar:
        raise DfmpcError(f"model {args.model} classifies {spec.dataset} images, not {dataset_name}; "
                         f"use --dataset {spec.dataset} or another model")
    if dataset_name != spec.dataset:  # e.g. a CIFAR-100 model where only the CIFAR-10 test set is at hand
        print(f"{args.model} classifies {spec.dataset} images and sees {dataset_name} ones: its accuracies are "
              "meaningless; 'agree %' compares each quantized model with fp32")
    data_dir = _data_dirs(args.data_dir, dataset_name).get(dataset_name)
    load = dict(name=dataset_name, data_dir=data_dir, transform=spec.eval_transform(), cache=True,
                progress=not args.no_progress)
    data = load_dataset(limit=None if images == "all" else images, seed=args.seed, **load)
    if args.random_weights:  # BN statistics from real images (another seeded subset; it may overlap the evaluated)
        calibration = load_dataset(limit=CALIBRATION_IMAGES, seed=args.seed + 1, **load).tensors[0]
        random_calibrated(model, calibration, args.seed)
        print(f"random weights, BatchNorm statistics calibrated on {len(calibration)} {dataset_name} images: the "
              "accuracies are meaningless; 'agree %' says how close each quantized model stays to fp32")

    def run(net, desc):
        return predict(net, data, batch_size=args.batch_size, device=device, progress=not args.no_progress, desc=desc)

    fp = run(model, "fp32")
    results = [{"method": "fp32", "bits": "32", "lambda1": None, "lambda2": None, "size_mb": fp32_size_mb(model),
                "top1": fp.top1_accuracy(), "top5": fp.top5_accuracy(), "agreement": 100.0, "quantize_seconds": None}]
    saved = None
    for bits in bit_list:
        for method in methods:
            for settings in method_settings(method, args):
                qmodel, report = quantize(model, bits=bits, method=method, **settings)
                desc = f"{method} {bits}" + ("" if "lambda1" not in settings else
                                             f" l1={settings['lambda1']:g} l2={settings['lambda2']:g}")
                pred = run(qmodel, desc)
                results.append({"method": method, "bits": bits, "lambda1": settings.get("lambda1"),
                                "lambda2": settings.get("lambda2"), "size_mb": report.size_mb,
                                "top1": pred.top1_accuracy(), "top5": pred.top5_accuracy(),
                                "agreement": pred.agreement(fp), "quantize_seconds": report.seconds})
                if saved is None or (method == "dfmpc" and saved[0] != "dfmpc"):
                    saved = (method, qmodel, report, bits)

    n = len(data)
    print(f"{args.model} on {dataset_name} ({n} images{'' if data_dir is None else ' from ' + str(data_dir)})")
    print(format_table(results))
    if args.json:
        out = {"model": args.model, "weights": "random, BN calibrated" if args.random_weights else spec.weights,
               "dataset": dataset_name, "data_dir": data_dir, "images": n, "device": str(device),
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
    import torch

    from .evaluate import resolve_device
    from .experiments.timing import benchmark

    _writable_file(args.json, "--json")
    device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = benchmark([m.strip() for m in args.models.split(",") if m.strip()], args.bits, args.repeat, device)
    print(f"{'model':<22} {'params':>10} {'pairs':>5} {'cold s':>8} {'median s':>9} {'min s':>7}  device  weights")
    for r in rows:
        print(f"{r['model']:<22} {r['parameters']:>10,} {r['pairs']:>5} {r['cold_s']:>8.3f} {r['median_s']:>9.3f} "
              f"{r['min_s']:>7.3f}  {r['device']:<6}  {r['weights']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


def cmd_experiments(args) -> int:
    from .experiments import BOOK_PRESETS, EXPERIMENTS, book_data_dir, run_experiments

    if args.list:
        for name, module in EXPERIMENTS.items():
            print(f"{name:<10} {module.TITLE}  (book: --{BOOK_PRESETS[name]})")
        return 0
    names = args.names or list(EXPERIMENTS)
    for name in names:
        if name not in EXPERIMENTS:
            raise DfmpcError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} (--list lists them)")
    if args.book:
        preset, out = {n: BOOK_PRESETS[n] for n in names}, args.out or book_data_dir()
    else:
        preset = "full" if args.full else "quick"
        out = args.out or f"results/{preset}"
    overrides = {}
    for item in args.set or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DfmpcError(f"--set takes KEY=VALUE, e.g. models=resnet20_cifar10_a; got {item!r}")
        overrides[key.strip()] = value.strip()
    if args.jobs is not None and args.jobs < 1:
        raise DfmpcError(f"--jobs must be at least 1, got {args.jobs}")
    command = "dfmpc " + " ".join(args.argv)
    run_experiments(names, preset, out, images=_images(args.images), overrides={n: overrides for n in names},
                    jobs=args.jobs, command=command, device=args.device, seed=args.seed,
                    threads=args.threads, progress=not args.no_progress, data_dirs=_data_dirs(args.data_dir),
                    batch_size=args.batch_size)
    return 0


def _common(p, batch_size=256, images_help="evaluate on a fixed random subset of N images, or 'all'"):
    """The options every evaluating subcommand spells the same way."""
    p.add_argument("--images", metavar="N|all", help=images_help)
    p.add_argument("--data-dir", action="append", metavar="[DATASET=]DIR",
                   help="data folder (default: the offline copy in $DFMPC_SHARED or ../shared, else a download); "
                        "repeatable as DATASET=DIR")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=0, help="seed of the image subsets and of everything random")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


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
    b.add_argument("--threads", type=int, help="CPU threads for torch")
    b.add_argument("--json", help="write the timings to this file")
    b.set_defaults(func=cmd_benchmark)

    q = sub.add_parser("quantize", help="quantize a model and evaluate fp32, direct quantization and DF-MPC")
    q.add_argument("--model", required=True, help="a name from `dfmpc models`")
    q.add_argument("--weights", help="local weights file for the model (default: offline copy or download)")
    q.add_argument("--random-weights", action="store_true",
                   help=f"random weights with BatchNorm statistics calibrated on {CALIBRATION_IMAGES} real images: runs any "
                        "model offline (fidelity, not accuracy)")
    q.add_argument("--dataset", help="cifar10 | cifar100 | imagenet (default: the model's; a CIFAR-100 model may "
                   "take cifar10 images, compared by agreement with fp32)")
    q.add_argument("--bits", default="2/6", help="LOW/HIGH with 2 <= LOW <= HIGH <= 8; 2 means ternary (default 2/6); "
                   "a comma-separated list sweeps, e.g. 2/6,3/6")
    q.add_argument("--method", default="original,dfmpc",
                   help="method name(s), comma-separated, or 'all' (default original,dfmpc)")
    q.add_argument("--lambda1", default="0.5", help="weight of ||Theta||^2 (default 0.5); a comma-separated list sweeps")
    q.add_argument("--lambda2", default="0", help="weight of ||c||^2 (default 0); a comma-separated list sweeps")
    q.add_argument("--granularity", choices=("tensor", "channel"), default=None,
                   help="scale per tensor (paper) or per output channel (default: the method's own, see dfmpc methods)")
    q.add_argument("--unpaired", choices=("high", "low", "fp32"), default="high", help="bits of layers outside any pair")
    q.add_argument("--keep-fp32", nargs="*", default=[], help="layers kept in full precision ('first', 'last' or names)")
    q.add_argument("--fold", choices=("next", "bn"), default="next",
                   help="put c into layer l+1 (Eq. 7) or into the BN of layer l")
    _common(q, images_help="evaluate on a fixed random subset of N images, or 'all' (default all)")
    q.add_argument("--save", help="write the quantized model's state_dict to this file")
    q.add_argument("--json", help="write the results to this file")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("experiments", help="run the book's experiments; one JSON file per experiment")
    e.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (default: all; --list lists them)")
    preset = e.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="offline copies, image subsets, a CPU, minutes (default)")
    preset.add_argument("--full", action="store_true", help="all images, fine grids, real data sets; for a GPU")
    preset.add_argument("--book", action="store_true",
                        help="each experiment with the preset the book shows, written into book/data")
    e.add_argument("--list", action="store_true", help="list the experiments and stop")
    e.add_argument("--out", help="folder for the JSON files (default results/<preset>; book/data with --book)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change one setting of the preset, e.g. --set models=resnet20_cifar10_a (repeatable)")
    e.add_argument("--jobs", type=int, help="processes side by side (default: 2 on a multi-core CPU, else 1)")
    _common(e, batch_size=None, images_help="give every image count of the preset N images, or 'all'")
    e.set_defaults(func=cmd_experiments)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in the results as the command that made them
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
