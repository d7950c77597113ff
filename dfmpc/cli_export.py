"""``dfmpc export`` and the activation / export options of ``dfmpc quantize`` (``--act-bits``, ``--act-rule``,
``--export``): a quantized model as a QDQ ONNX file, run by onnxruntime beside dfmpc's own simulation.

    dfmpc quantize --model resnet56_cifar10_a --bits 2/6 --act-bits 8 --method dfmpc+ --split test --export r56.onnx
    dfmpc export q.dfmpc q.onnx --act-bits 8 --images 1000

Arguments and output paths are checked, and ``onnx`` / ``onnxruntime`` looked for, before anything is loaded.
"""
from __future__ import annotations

from .errors import DfmpcError
from .options import check_output_file, check_positive, parse_data_dirs, parse_images

__all__ = ["ACT_RULE_CHOICES", "add_quantize_options", "check_quantize_options", "act_settings", "export_kept",
           "add_export_parser", "cmd_export"]

ACT_RULE_CHOICES = ("dfq", "mse")


def add_quantize_options(q) -> None:
    """``--act-bits``, ``--act-rule`` and ``--export`` of ``dfmpc quantize``."""
    q.add_argument("--act-bits", type=int, metavar="N",
                   help="also quantize the activations to N bits (2..8; per tensor, asymmetric, ranges from the "
                        "BatchNorm statistics); default: fp32 activations, as in the paper")
    q.add_argument("--act-rule", choices=ACT_RULE_CHOICES, default="dfq",
                   help="activation ranges: dfq (beta +- 6 gamma, clipped by the activation) or mse (the n that "
                        "minimises the expected error over the BN Gaussians); default dfq")
    q.add_argument("--export", metavar="FILE.onnx",
                   help="write the model --save would write as a QDQ ONNX model, run it in onnxruntime on the same "
                        "images and print its top-1 beside dfmpc's simulation (needs dfmpc[deploy])")


def _check_act_bits(value) -> None:
    if value is not None and not 2 <= value <= 8:
        raise DfmpcError(f"--act-bits must be from 2 to 8 (e.g. 8 or 4), got {value}")


def check_quantize_options(args) -> None:
    """Fail at once on a bad --act-bits, an unwritable --export, or onnx / onnxruntime missing for --export."""
    _check_act_bits(args.act_bits)
    if args.act_bits is None and args.act_rule != "dfq":
        raise DfmpcError("--act-rule chooses the activation ranges of --act-bits; add --act-bits N")
    if args.export:
        from .export_onnx import require

        check_output_file(args.export, "--export")
        require("onnx"), require("onnxruntime")


def act_settings(args, spec) -> dict:
    """The ``dfmpc.quantize`` settings of the activations: none, or act_bits, act_rule and the input range."""
    if getattr(args, "act_bits", None) is None:
        return {}
    from .activations import input_range_of

    return {"act_bits": args.act_bits, "act_rule": args.act_rule, "act_input_range": input_range_of(spec.mean, spec.std)}


def _input_shape(spec) -> tuple[int, int, int]:
    return (3, spec.input_size, spec.input_size)


def export_kept(args, keep, row: dict, data, spec) -> dict:
    """Export the kept (row index, model, report) to ``args.export``, run it in onnxruntime on ``data``, print the
    top-1 of both and their agreement; return what the JSON records."""
    from .evaluate import predict
    from .export_onnx import export_onnx, onnx_predict
    from .folding import integer_codes

    _, qmodel, report = keep
    info = export_onnx(qmodel, integer_codes(report), args.export, _input_shape(spec))
    sim = predict(qmodel, data, batch_size=args.batch_size, device="cpu")
    engine = onnx_predict(args.export, data, batch_size=args.batch_size, threads=args.threads or 1)
    out = {**info, "method": row["method"], "bits": row["bits"], "act_bits": args.act_bits,
           "images": len(data), "top1_dfmpc": sim.top1_accuracy(), "top1_onnxruntime": engine.top1_accuracy(),
           "agreement": engine.agreement(sim)}
    print(f"exported {row['method']} {row['bits']}" + (f" A{args.act_bits}" if args.act_bits else " (fp32 activations)")
          + f" to {args.export}: {info['bytes'] / 2**20:.3f} MB, {len(info['int8_weights'])} int8 weights, "
          f"{len(info['float_weights'])} float32 weights, {info['activation_qdq']} activation QDQ pairs")
    print(f"onnxruntime (CPU) top-1 {out['top1_onnxruntime']:.2f} %, dfmpc simulation top-1 {out['top1_dfmpc']:.2f} %, "
          f"same top-1 class on {out['agreement']:.2f} % of the {len(data):,} images")
    return out


def add_export_parser(sub, common) -> None:
    e = sub.add_parser("export", help="write a .dfmpc file as a QDQ ONNX model (needs dfmpc[deploy])")
    e.add_argument("input", metavar="IN.dfmpc", help="a file dfmpc quantize --save wrote")
    e.add_argument("output", metavar="OUT.onnx", help="the ONNX model to write")
    e.add_argument("--act-bits", type=int, metavar="N",
                   help="quantize the activations to N bits (2..8), ranges from the file's BatchNorm statistics")
    e.add_argument("--act-rule", choices=ACT_RULE_CHOICES, default="dfq", help="activation ranges (default dfq)")
    e.add_argument("--split", choices=("all", "dev", "test"), default="test",
                   help="which half of the evaluation set --images draws from (default test)")
    common(e, batch_size=128, images_help="also run the ONNX model and dfmpc's simulation on N images (or 'all') "
                                          "and compare them (default: none)")
    e.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from pathlib import Path

    from .export_onnx import require

    _check_act_bits(args.act_bits)
    if args.act_bits is None and args.act_rule != "dfq":
        raise DfmpcError("--act-rule chooses the activation ranges of --act-bits; add --act-bits N")
    images = parse_images(args.images) if args.images is not None else None
    check_positive("--batch-size", args.batch_size, unset_ok=False)
    check_positive("--threads", args.threads)
    if not Path(args.input).expanduser().is_file():
        raise DfmpcError(f"quantized model file {args.input!r} does not exist; pass the file dfmpc quantize --save wrote")
    check_output_file(args.output, "OUT.onnx")
    require("onnx"), require("onnxruntime")
    import torch

    from .activations import input_range_of, quantize_activations
    from .export_onnx import codes_from_file, export_onnx, onnx_predict
    from .models import load_model
    from .packed import load_quantized, read_info

    torch.manual_seed(args.seed)
    meta = read_info(args.input)
    if not meta.get("model"):
        raise DfmpcError(f"{args.input!r} was saved from a model of your own (no model name); export it in Python: "
                         "dfmpc.export_onnx.export_onnx(dfmpc.load_quantized(path, model=MyNet()), codes, out, shape)")
    qmodel = load_quantized(args.input)
    codes = codes_from_file(args.input, qmodel)
    _, spec = load_model(meta["model"], pretrained=False)
    if args.act_bits is not None:
        qmodel, _ = quantize_activations(qmodel, args.act_bits, input_range_of(spec.mean, spec.std), args.act_rule,
                                         codes=codes)
    info = export_onnx(qmodel, codes, args.output, _input_shape(spec))
    print(f"wrote {args.output}: {meta['model']} {meta['method']} {meta['bits']}"
          + (f" A{args.act_bits}" if args.act_bits else " (fp32 activations)")
          + f", {info['bytes'] / 2**20:.3f} MB, {len(info['int8_weights'])} int8 weights, "
          f"{len(info['float_weights'])} float32 weights, {info['activation_qdq']} activation QDQ pairs")
    if images is not None:
        from .data import load_dataset
        from .evaluate import predict

        data_dir = parse_data_dirs(args.data_dir, spec.dataset).get(spec.dataset)
        data = load_dataset(spec.dataset, data_dir, transform=spec.eval_transform(),
                            limit=None if images == "all" else images, seed=args.seed, cache=True,
                            split=None if args.split == "all" else args.split, progress=not args.no_progress)
        sim = predict(qmodel, data, batch_size=args.batch_size, device="cpu")
        engine = onnx_predict(args.output, data, batch_size=args.batch_size, threads=args.threads or 1)
        print(f"onnxruntime (CPU) top-1 {engine.top1_accuracy():.2f} %, dfmpc simulation top-1 "
              f"{sim.top1_accuracy():.2f} %, same top-1 class on {engine.agreement(sim):.2f} % of {len(data):,} images")
    return 0
