"""Direct quantization: the paper's "Original" rows of Tables 1-2.

Every layer is quantized with the bit width of the mixed-precision plan (low layers ternary or
k-bit, the rest high-bit), with the quantizers' own scales and nothing else: no compensation.
"""
from .base import QuantizationMethod

__all__ = ["DirectQuantization"]


class DirectQuantization(QuantizationMethod):
    name = "original"
