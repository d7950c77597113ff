"""OMSE (Choukroun et al. 2019): per-channel MSE-optimal weight clipping, as a method: the paper's plan (low-bit
and high-bit layers), every weight quantized by :func:`dfmpc.clipping.mse_optimal_quantize` (its derivation is
there), nothing else changed."""
from __future__ import annotations

from ..clipping import mse_optimal_quantize, mse_optimal_ternary, mse_optimal_uniform, weighted_quantization_error
from .base import QuantizationMethod

__all__ = ["OptimalClipping", "mse_optimal_ternary", "mse_optimal_uniform", "mse_optimal_quantize",
           "weighted_quantization_error"]


class OptimalClipping(QuantizationMethod):
    name = "omse"

    def __init__(self, bits="2/6", granularity: str = "channel", **kwargs):
        super().__init__(bits, granularity=granularity, **kwargs)

    def quantize_layer(self, name, weight, bits, run):
        return mse_optimal_quantize(weight, bits, self.granularity)
