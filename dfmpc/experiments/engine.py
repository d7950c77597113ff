"""The quantized model in a real inference engine: onnxruntime (CPU execution provider) against the fp32 model.

Per model: the fp32 model exported to ONNX (BatchNorms folded) and the quantized one (``method`` at ``bits``, its
activations at ``act_bits``, :func:`dfmpc.export_onnx.export_onnx`: int8 weight codes, QDQ activations). For
each: the file size; top-1 in onnxruntime on the test half beside dfmpc's own simulation (PyTorch) of the same
model and their per-image agreement; latency at batch 1 and batch 32, one intra-op thread, the median of
``repeats`` runs, both models timed in alternation in one process (so that both see the same machine load); and
which kernels the engine actually ran, read from the graph onnxruntime optimized (``optimized_model_filepath``):
``QLinearConv`` / ``QGemm`` / ``QLinearAdd`` are integer kernels, a ``Conv`` / ``Gemm`` left over is float.

No GPU is lent to this project's sessions: every figure is from the CPU named in the result's provenance.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import DfmpcError

__all__ = ["NAME", "TITLE", "BOOK_PRESET", "SETTINGS", "PAPER", "INTEGER_OPS", "FLOAT_OPS", "run", "kernel_counts"]

NAME = "engine"
TITLE = "The quantized model in onnxruntime: size, latency, integer kernels, agreement with dfmpc"
BOOK_PRESET = "full"
SETTINGS = {
    "quick": {"models": ["resnet20_cifar10_a"], "method": "dfmpc+", "bits": "2/6", "act_bits": 8, "images": 100,
              "split": "test", "batch_sizes": [1, 32], "repeats": 3},
    "full": {"models": ["resnet20_cifar10_a", "resnet56_cifar10_a"], "method": "dfmpc+", "bits": "2/6", "act_bits": 8,
             "images": None, "split": "test", "batch_sizes": [1, 32], "repeats": 30},
}
PAPER = None
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
               "QLinearAdd", "QLinearGlobalAveragePool", "QLinearAveragePool")
FLOAT_OPS = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "NchwcConv")


def _session(path: Path, optimized: Path | None = None):
    from ..export_onnx import require

    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernel_counts(path: Path, optimized: Path) -> dict:
    """Op types of the graph onnxruntime runs for ``path`` (written to ``optimized``): integer and float kernels."""
    import onnx

    _session(path, optimized)
    ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    return {"integer": {k: v for k, v in ops.items() if k in INTEGER_OPS},
            "float": {k: v for k, v in ops.items() if k in FLOAT_OPS}, "all": dict(ops)}


def _latency(sessions: dict, batch_sizes, repeats: int, shape) -> dict:
    """Median milliseconds per run of every session at every batch size, the sessions run in alternation."""
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, *shape)).astype(np.float32) for b in batch_sizes}
    times = {(k, b): [] for k in sessions for b in batch_sizes}
    for b in batch_sizes:
        for session in sessions.values():  # warm-up
            session.run(None, {"input": inputs[b]})
        for _ in range(repeats):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"input": inputs[b]})
                times[(key, b)].append(1000 * (time.perf_counter() - start))
    return {f"{k}_b{b}": {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "runs": len(v)}
            for (k, b), v in times.items()}


def run(session, cfg: dict) -> dict:
    from ..activations import input_range_of
    from ..export_onnx import export_onnx, onnx_predict, require
    from ..folding import integer_codes
    from ..methods import METHODS, settings_for_model

    require("onnx"), require("onnxruntime")
    if cfg["method"] not in METHODS:
        raise DfmpcError(f"unknown method {cfg['method']!r}; choose from {', '.join(METHODS)}")
    ort = require("onnxruntime")
    out = {"method": cfg["method"], "bits": cfg["bits"], "act_bits": cfg["act_bits"], "onnxruntime": ort.__version__,
           "provider": "CPUExecutionProvider", "threads": 1, "gpu": "none lent to this session", "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in cfg["models"]:
            model, spec = session.model(name)
            shape = (3, spec.input_size, spec.input_size)
            settings = {**settings_for_model(cfg["method"], spec), "act_bits": cfg["act_bits"],
                        "act_input_range": tuple(input_range_of(spec.mean, spec.std))}
            qmodel, report = session.quantized(name, cfg["method"], cfg["bits"], **settings)
            paths = {"fp32": Path(tmp) / f"{name}_fp32.onnx", "quantized": Path(tmp) / f"{name}_q.onnx"}
            export_onnx(model, {}, paths["fp32"], shape)
            info = export_onnx(qmodel, integer_codes(report), paths["quantized"], shape)
            sim, record = session.predict(name, spec.dataset, cfg["images"], cfg["method"], cfg["bits"], cfg["split"],
                                          settings)
            fp, _ = session.predict(name, spec.dataset, cfg["images"], split=cfg["split"])
            data, _ = session.data(spec.dataset, spec, cfg["images"], cfg["split"])
            engine = {k: onnx_predict(p, data) for k, p in paths.items()}
            sessions = {k: _session(p) for k, p in paths.items()}
            entry = {"model": name, "data": record, "images": len(data), "int8_weights": len(info["int8_weights"]),
                     "float_weights": info["float_weights"], "activation_qdq": info["activation_qdq"],
                     "size_bytes": {k: p.stat().st_size for k, p in paths.items()},
                     "top1": {"fp32_pytorch": fp.top1_accuracy(), "fp32_onnxruntime": engine["fp32"].top1_accuracy(),
                              "quantized_dfmpc": sim.top1_accuracy(),
                              "quantized_onnxruntime": engine["quantized"].top1_accuracy()},
                     "agreement": {"fp32": engine["fp32"].agreement(fp), "quantized": engine["quantized"].agreement(sim)},
                     "latency": _latency(sessions, cfg["batch_sizes"], cfg["repeats"], shape),
                     "kernels": {k: kernel_counts(p, Path(tmp) / f"{name}_{k}_optimized.onnx") for k, p in paths.items()}}
            out["models"].append(entry)
    return out
