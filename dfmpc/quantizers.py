"""Weight quantizers of the paper, as small pure functions on tensors.

* :func:`ternary_quantize` -- Ternary Weight Networks, paper Eq. (3)-(4).
* :func:`uniform_quantize` -- DoReFa-style uniform k-bit quantizer, paper Eq. (6).
* :func:`quantize_weight` -- picks one of the two from a bit width (2 means ternary, as in the paper).

Each returns a :class:`QuantizedTensor` holding the integer codes and the scale(s), so that the
dequantized weight, the exact number of stored bits and the model size all follow from it.

``granularity`` is ``"tensor"`` (one scale per tensor, the paper's choice: "layer-wise") or
``"channel"`` (one scale per output channel, i.e. per slice along dimension 0).

The paper drops the scales ("absorbed into a batch normalization", text after Eq. 4 and Eq. 6).
Without fine-tuning nothing re-estimates the batch normalization, so we keep the scales: a
dequantized weight is ``scale * level(code)``, which makes ``c = 1`` mean "no compensation".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bits import MAX_BITS, MIN_BITS
from .errors import DfmpcError
from .numerics import check_bit_width, per_row, positive_or_one

__all__ = ["GRANULARITIES", "MIN_BITS", "MAX_BITS", "QuantizedTensor", "check_weight", "uniform_grid_position",
           "uniform_quantize", "quantize_weight"]

GRANULARITIES = ("tensor", "channel")


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes plus scale(s) of one quantized weight tensor.

    ``codes``: int8 tensor, the shape of the weight. Ternary codes are in {-1, 0, +1}; uniform
    k-bit codes are in {0, ..., 2^k - 1}.
    ``scale``: float tensor, shape ``()`` for ``granularity="tensor"``, ``(C_out,)`` for ``"channel"``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    granularity: str

    @property
    def is_ternary(self) -> bool:
        return self.bits == 2

    def levels(self) -> torch.Tensor:
        """The code values mapped to [-1, 1] (before the scale), same shape as ``codes``."""
        if self.is_ternary:
            return self.codes.to(self.scale.dtype)
        n = 2**self.bits - 1
        return 2.0 * self.codes.to(self.scale.dtype) / n - 1.0

    def dequantize(self) -> torch.Tensor:
        return per_row(self.scale, self.codes.dim()) * self.levels()

    @property
    def weight_bits(self) -> int:
        """Bits needed for the codes (2 bits per ternary code: 3 levels do not fit in 1 bit)."""
        return self.codes.numel() * self.bits

    @property
    def scale_bits(self) -> int:
        """Scales are stored in full precision (32 bits each)."""
        return self.scale.numel() * 32


def check_weight(w: torch.Tensor) -> None:
    if not torch.is_tensor(w) or not w.is_floating_point():
        raise DfmpcError(f"expected a floating-point weight tensor, got {type(w).__name__}; pass a float tensor")
    if w.numel() == 0:
        raise DfmpcError("cannot quantize an empty weight tensor; skip that layer")
    if not torch.isfinite(w).all():
        raise DfmpcError("weight tensor contains NaN or inf values; check the model's weights before quantizing")


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise DfmpcError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")


def _reduce_abs(w: torch.Tensor, granularity: str, op: str) -> torch.Tensor:
    """mean or max of |w| over the whole tensor or over every output channel."""
    a = w.abs()
    if granularity == "tensor":
        return a.mean() if op == "mean" else a.max()
    a = a.reshape(a.shape[0], -1)
    return a.mean(dim=1) if op == "mean" else a.amax(dim=1)


def ternary_quantize(w: torch.Tensor, granularity: str = "tensor", threshold_factor: float = 0.7) -> QuantizedTensor:
    """Ternary weights, paper Eq. (3)-(4) (Ternary Weight Networks, Li et al. 2016).

    Codes: +1 where ``w > Delta``, -1 where ``w < -Delta``, 0 otherwise, with ``Delta = 0.7 * E|w|`` (Eq. 4).
    Scale: ``alpha`` = mean of ``|w|`` over the entries with ``|w| > Delta`` (Eq. 4). A tensor (or channel)
    where no entry exceeds Delta, e.g. an all-zero channel, gets alpha = 0 and all-zero codes.
    """
    check_weight(w)
    _check_granularity(granularity)
    if not threshold_factor >= 0:
        raise DfmpcError(f"threshold_factor must be >= 0, got {threshold_factor}")
    delta = threshold_factor * _reduce_abs(w, granularity, "mean")
    delta_b = per_row(delta, w.dim())
    codes = (w > delta_b).to(torch.int8) - (w < -delta_b).to(torch.int8)
    mask = codes != 0
    if granularity == "tensor":
        count = mask.sum()
        alpha = (w.abs() * mask).sum() / count.clamp(min=1)
    else:
        count = mask.reshape(w.shape[0], -1).sum(dim=1)
        alpha = (w.abs() * mask).reshape(w.shape[0], -1).sum(dim=1) / count.clamp(min=1)
    return QuantizedTensor(codes=codes, scale=alpha.to(w.dtype), bits=2, granularity=granularity)


def uniform_grid_position(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Eq. (6) inside the round: ``(2^k - 1) (w / (2 scale) + 1/2)``, the weight in units of the k-bit grid of
    ``scale`` (a scalar, or one per output channel); rounding it and clamping to 0 .. 2^k - 1 gives the codes.
    A zero scale (an all-zero channel) divides by one instead."""
    n = 2**bits - 1
    return n * (w / (2 * per_row(positive_or_one(scale), w.dim())) + 0.5)


def uniform_quantize(w: torch.Tensor, bits: int, granularity: str = "tensor") -> QuantizedTensor:
    """Uniform k-bit weights, paper Eq. (6) (DoReFa-Net, Zhou et al. 2016).

    ``Q_k(w) = 2 / (2^k - 1) * round[(2^k - 1) * (w / (2 max|w|) + 1/2)] - 1``, i.e. 2^k evenly spaced
    levels in [-1, 1] (there is no exact zero level), scaled back by ``max|w|``. The code is the
    integer inside the round, in {0, ..., 2^k - 1}. An all-zero tensor or channel has scale 0.
    """
    check_weight(w)
    _check_granularity(granularity)
    check_bit_width(bits)
    n = 2**bits - 1
    m = _reduce_abs(w, granularity, "max")
    codes = torch.round(uniform_grid_position(w, m, bits)).clamp(0, n)  # a zero max|w| keeps scale 0
    return QuantizedTensor(codes=codes.to(torch.int16 if bits > 7 else torch.int8), scale=m.to(w.dtype),
                           bits=bits, granularity=granularity)


def quantize_weight(w: torch.Tensor, bits: int, granularity: str = "tensor") -> QuantizedTensor:
    """Quantize a weight as the paper does: 2 bits -> ternary (Eq. 3-4), 3..8 bits -> uniform (Eq. 6).

    "For 2-bit, our DF-MPC uses the ternary representation based on Eq. (3). For 3-bit and 6-bit,
    our DF-MPC uses the quantized representation based on Eq. (6)." (paper, Section 5.2)
    """
    check_bit_width(bits)
    if bits == 2:
        return ternary_quantize(w, granularity)
    return uniform_quantize(w, bits, granularity)
