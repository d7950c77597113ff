"""dfmpc: Data-Free quantization via Mixed-Precision Compensation (Chen et al., Pattern Recognition 2023).

    import dfmpc
    qmodel, report = dfmpc.quantize(model, bits="2/6", lambda1=0.5, lambda2=0.0)
    print(report)
"""
from .api import quantize
from .compensation import compensation_objective, solve_compensation
from .errors import DfmpcError
from .graph import LayerPair, find_pairs, pairs_from_names
from .methods import METHODS
from .moments import BatchNormStats
from .plan import parse_bits, plan_layers
from .quantizers import QuantizedTensor, quantize_weight, ternary_quantize, uniform_quantize
from .size import fp32_size_mb, quantized_size_mb

__version__ = "0.1.0"

__all__ = [
    "quantize", "METHODS", "DfmpcError",
    "ternary_quantize", "uniform_quantize", "quantize_weight", "QuantizedTensor",
    "solve_compensation", "compensation_objective", "BatchNormStats",
    "find_pairs", "pairs_from_names", "LayerPair", "plan_layers", "parse_bits",
    "fp32_size_mb", "quantized_size_mb",
]
