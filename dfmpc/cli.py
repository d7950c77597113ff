"""The ``dfmpc`` command line.

    dfmpc models                      # the models: data set, source, size, weights and data here or not
    dfmpc methods                     # the quantization methods
    dfmpc quantize --model resnet56_cifar10_a --bits 2/6 --images 1000 --json out.json --save q.dfmpc
    dfmpc benchmark                   # seconds to quantize + compensate (--startup: the command's start-up)
    dfmpc experiments --quick         # every experiment of the book, one JSON each (--list lists them)
    dfmpc export q.dfmpc q.onnx --act-bits 8   # a QDQ ONNX model that onnxruntime runs (dfmpc[deploy])

One vocabulary across subcommands: ``--images N|all`` (how many evaluation images: a fixed random subset),
``--data-dir [DATASET=]DIR``, ``--device``, ``--seed``, ``--threads``, ``--batch-size``, ``--no-progress``;
``--json FILE`` writes one JSON file, ``--out DIR`` a folder of them.
Bad input ends with one line on stderr naming the problem and the fix, and exit status 2; output paths are
tried before any evaluation starts. torch is imported only by the subcommands that compute, so that
``dfmpc --help``, ``dfmpc models`` and ``dfmpc methods`` answer at once.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .catalog import METHOD_DESCRIPTIONS, models_table
from .cli_export import add_export_parser, add_quantize_options
from .cli_quantize import CALIBRATION_IMAGES, DEFAULT_METHODS, cmd_quantize, format_table, method_settings
from .errors import DfmpcError
from .options import (
    check_model,
    check_output_dir,
    check_output_file,
    check_positive,
    check_seed,
    parse_data_dirs,
    parse_images,
    parse_set_flags,
    write_json,
)

__all__ = ["main", "build_parser", "method_settings", "format_table", "CALIBRATION_IMAGES"]


def cmd_models(args) -> int:
    rows = models_table()
    header = ("model", "data set", "source", "input", "parameters", "fp32 MB", "weights", "data")
    lines = [header] + [(r["model"], r["dataset"], r["source"], str(r["input"]), f"{r['parameters']:,}",
                         f"{r['fp32_mb']:.2f}", r["weights"], r["data"]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {3, 4, 5}
    for line in lines:
        print("  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths))).rstrip())
    print("\nweights, data: offline copy = in the offline data folder ($DFMPC_SHARED or ../shared); cached = downloaded "
          "before;\nneeds download = fetched on first use (without internet: --weights PATH, --data-dir DIR, or "
          "--random-weights).\nThese are the names dfmpc builds: load_model, --model and .dfmpc files take no other.")
    return 0


def cmd_methods(args) -> int:
    width = max(len(n) for n in METHOD_DESCRIPTIONS)
    for name, description in METHOD_DESCRIPTIONS.items():
        print(f"{name.ljust(width)}  {description}")
    return 0


def cmd_benchmark(args) -> int:
    check_output_file(args.json, "--json")
    check_positive("--repeat", args.repeat, unset_ok=False)
    check_positive("--threads", args.threads)
    if args.startup:
        from .experiments.timing import startup_seconds

        rows = startup_seconds(args.repeat)
        print(f"{'command':<16} {'median s':>9} {'min s':>7} {'max s':>7}  (a fresh process each, {args.repeat} runs)")
        for r in rows:
            print(f"{r['command']:<16} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f}")
        torch_version = None
    else:
        import torch

        from .bits import parse_bits
        from .evaluate import resolve_device
        from .experiments.timing import benchmark

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise DfmpcError("--models names no model; give names from `dfmpc models`, comma-separated")
        for name in models:
            check_model(name)
        bits = "{}/{}".format(*parse_bits(args.bits))
        device = str(resolve_device(args.device))
        if args.threads:
            torch.set_num_threads(args.threads)
        rows = benchmark(models, bits, args.repeat, device)
        print(f"{'model':<22} {'params':>10} {'pairs':>5} {'cold s':>8} {'median s':>9} {'min s':>7}  device  weights")
        for r in rows:
            print(f"{r['model']:<22} {r['parameters']:>10,} {r['pairs']:>5} {r['cold_s']:>8.3f} {r['median_s']:>9.3f} "
                  f"{r['min_s']:>7.3f}  {r['device']:<6}  {r['weights']}")
        torch_version = torch.__version__
    if args.json:
        from .experiments.provenance import code_version

        write_json(args.json, {"torch": torch_version, **code_version(), "rows": rows}, "--json")
    return 0


def cmd_experiments(args) -> int:
    from .experiments import BOOK_OVERRIDES, BOOK_PRESETS, EXPERIMENTS, book_data_dir, run_experiments
    from .experiments.runner import settings_for

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
    overrides = parse_set_flags(args.set)  # the same for every experiment named, after the book's own (--book)
    check_positive("--jobs", args.jobs)
    check_positive("--threads", args.threads)
    check_positive("--batch-size", args.batch_size)
    check_seed(args.seed)
    images, data_dirs = parse_images(args.images), parse_data_dirs(args.data_dir)
    for name in names:  # every --set value parsed now, not in a worker minutes later
        settings_for(name, preset[name] if isinstance(preset, dict) else preset, images,
                     {**(BOOK_OVERRIDES[name] if args.book else {}), **overrides})
    check_output_dir(out, "--out")
    command = "dfmpc " + " ".join(args.argv)
    per_experiment = {n: {**(BOOK_OVERRIDES[n] if args.book else {}), **overrides} for n in names}
    run_experiments(names, preset, out, images=images, overrides=per_experiment,
                    jobs=args.jobs, command=command, device=args.device, seed=args.seed,
                    threads=args.threads, progress=not args.no_progress, data_dirs=data_dirs,
                    batch_size=args.batch_size, rerun_method=args.rerun_method)
    return 0


def _common(p, batch_size=256, images_help="evaluate on a fixed random subset of N images, or 'all'"):
    """The options every evaluating subcommand spells the same way."""
    p.add_argument("--images", metavar="N|all", help=images_help)
    p.add_argument("--data-dir", action="append", metavar="[DATASET=]DIR",
                   help="data folder (default: the offline copy in $DFMPC_SHARED or ../shared, else a download); "
                        "repeatable as DATASET=DIR")
    _device_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the image subsets and of everything random")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _device_options(p):
    """Where torch computes: the same two options in every subcommand that runs torch."""
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")


class OneLineParser(argparse.ArgumentParser):
    """argparse with the command's error style: one line naming the problem and where help is, exit status 2
    (argparse's own prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; `{self.prog} --help` lists the options\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dfmpc", description="Data-free mixed-precision compensation (DF-MPC).")
    parser.add_argument("--version", action="version", version=f"dfmpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="the models: data set, source, size, and whether weights and data are here"
                   ).set_defaults(func=cmd_models)
    sub.add_parser("methods", help="list the quantization methods").set_defaults(func=cmd_methods)

    b = sub.add_parser("benchmark", help="time quantize + compensate (evaluation excluded), or with --startup the "
                       "start-up of the dfmpc command")
    b.add_argument("--startup", action="store_true",
                   help="time `dfmpc --help`, `dfmpc models` and `dfmpc methods`, each in a fresh process")
    b.add_argument("--models", default="resnet18,resnet56_cifar10_a", help="comma-separated model names")
    b.add_argument("--bits", default="2/6")
    b.add_argument("--repeat", type=int, default=5)
    _device_options(b)
    b.add_argument("--json", help="write the timings to this file")
    b.set_defaults(func=cmd_benchmark)

    q = sub.add_parser("quantize", help="quantize a model; evaluate fp32, direct quantization, DF-MPC and dfmpc+")
    q.add_argument("--model", required=True, help="a name from `dfmpc models`")
    q.add_argument("--weights", help="local weights file for the model (default: offline copy or download)")
    q.add_argument("--random-weights", action="store_true",
                   help=f"random weights with BatchNorm statistics calibrated on {CALIBRATION_IMAGES} real images: runs any "
                        "model offline (fidelity, not accuracy)")
    q.add_argument("--dataset", help="cifar10 | cifar100 | imagenet (default: the model's; a CIFAR-100 model may "
                   "take cifar10 images, compared by agreement with fp32)")
    q.add_argument("--bits", default="2/6", help="LOW/HIGH with 2 <= LOW <= HIGH <= 8; 2 means ternary (default 2/6); "
                   "a comma-separated list sweeps, e.g. 2/6,3/6")
    q.add_argument("--method", default=DEFAULT_METHODS,
                   help=f"a method name, a comma-separated list, or 'all' (default {DEFAULT_METHODS})")
    q.add_argument("--lambda1", default="0.5", help="weight of ||Theta||^2 (default 0.5); a comma-separated list sweeps")
    q.add_argument("--lambda2", default="0", help="weight of ||c||^2 (default 0); a comma-separated list sweeps")
    q.add_argument("--granularity", choices=("tensor", "channel"), default=None,
                   help="scale per tensor (paper) or per output channel (default: the method's own, see dfmpc methods)")
    q.add_argument("--unpaired", choices=("high", "low", "fp32"), default="high", help="bits of layers outside any pair")
    q.add_argument("--keep-fp32", nargs="*", default=[], help="layers kept in full precision ('first', 'last' or names)")
    q.add_argument("--fold", choices=("next", "bn"), default="next",
                   help="put c into layer l+1 (Eq. 7) or into the BN of layer l")
    _common(q, images_help="evaluate on a fixed random subset of N images, or 'all' (default all)")
    q.add_argument("--split", choices=("all", "dev", "test"), default="all",
                   help="evaluate on one fixed half of the set: 'dev' (even positions, for decisions) or 'test' "
                        "(odd positions, for reporting); default all images")
    q.add_argument("--skip-unreadable", action="store_true",
                   help="leave out images that cannot be decoded (counted in the output) instead of stopping")
    q.add_argument("--save", metavar="FILE",
                   help="write the quantized model packed (codes at their bit width, safetensors); "
                        "dfmpc.load_quantized(FILE) loads it")
    q.add_argument("--save-method", metavar="NAME",
                   help="which method's model --save writes (default: the most accurate measured: top-1, or "
                        "agreement with fp32 where the labels mean nothing)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a setting of the methods that take it, e.g. restarts=1 for dfmpc+ (repeatable; `dfmpc methods "
                        "--settings` lists each method's settings)")
    q.add_argument("--json", help="write the results to this file")
    add_quantize_options(q)  # --act-bits, --act-rule, --export
    q.set_defaults(func=cmd_quantize)
    add_export_parser(sub, _common)  # dfmpc export IN.dfmpc OUT.onnx

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
    e.add_argument("--rerun-method", metavar="METHOD",
                   help="rerun only METHOD's rows of each experiment's result already in the output folder and keep "
                        "the other methods' rows, recording which code measured which (method_versions)")
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
    except BrokenPipeError:  # e.g. `dfmpc models | head`: the reader stopped reading, nothing went wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
