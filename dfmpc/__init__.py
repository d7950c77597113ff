"""dfmpc: Data-Free quantization via Mixed-Precision Compensation (Chen et al., Pattern Recognition 2023).

    import dfmpc
    qmodel, report = dfmpc.quantize(model, bits="2/6", lambda1=0.5, lambda2=0.0)
    print(report)
    dfmpc.save_quantized(qmodel, report, "model.dfmpc", model_name="resnet56_cifar10_a")
    qmodel = dfmpc.load_quantized("model.dfmpc")

The names below are imported on first use (PEP 562), so that ``import dfmpc`` and the ``dfmpc`` command's
listings do not import torch, which takes seconds.
"""
from __future__ import annotations

import importlib

from .errors import DfmpcError

__version__ = "0.1.0"

__all__ = [
    "quantize", "METHODS", "DfmpcError",
    "ternary_quantize", "uniform_quantize", "quantize_weight", "asymmetric_quantize", "QuantizedTensor",
    "solve_compensation", "compensation_objective", "BatchNormStats",
    "find_pairs", "pairs_from_names", "LayerPair", "plan_layers", "parse_bits",
    "fp32_size_mb", "quantized_size_mb", "save_quantized", "load_quantized",
]

# public name -> the module (in this package) that defines it
_EXPORTS = {
    "quantize": "api", "METHODS": "methods",
    "ternary_quantize": "quantizers", "uniform_quantize": "quantizers", "quantize_weight": "quantizers",
    "asymmetric_quantize": "quantizers", "QuantizedTensor": "quantizers", "solve_compensation": "compensation",
    "compensation_objective": "compensation",
    "BatchNormStats": "moments", "find_pairs": "graph", "pairs_from_names": "graph", "LayerPair": "graph",
    "plan_layers": "plan", "parse_bits": "bits", "fp32_size_mb": "size", "quantized_size_mb": "size",
    "save_quantized": "packed", "load_quantized": "packed",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("_"):  # a submodule, e.g. dfmpc.experiments after a plain `import dfmpc`
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
