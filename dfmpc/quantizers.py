"""Weight quantizers of the paper, as small pure functions on tensors.

* :func:`ternary_quantize` -- Ternary Weight Networks, paper Eq. (3)-(4).
* :func:`uniform_quantize` -- DoReFa-style uniform k-bit quantizer, paper Eq. (6).
* :func:`quantize_weight` -- picks one of the two from a bit width (2 means ternary, as in the paper).
* :func:`asymmetric_quantize` -- the min/max grid with a zero point per output channel of ZeroQ's and SQuant's
  reference code (not the paper's; for running SQuant at its authors' setting).

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
           "uniform_quantize", "quantize_weight", "asymmetric_grid_position", "asymmetric_quantize"]

GRANULARITIES = ("tensor", "channel")
ZERO_POINT_LIMIT = 2**15 - 1  # zero points are stored as int16


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes plus scale(s) of one quantized weight tensor.

    ``codes``: int8 tensor, the shape of the weight. Ternary codes are in {-1, 0, +1}; uniform
    k-bit codes are in {0, ..., 2^k - 1}.
    ``scale``: float tensor, shape ``()`` for ``granularity="tensor"``, ``(C_out,)`` for ``"channel"``.
    ``zero_point``: None (the paper's symmetric grids), or, for a k-bit tensor on an asymmetric grid
    (:func:`asymmetric_quantize`), one integer per output channel (int16, shape ``(C_out,)``): the weight is then
    ``scale * (code - zero_point)``, ``scale`` being the step between two levels.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    granularity: str
    zero_point: torch.Tensor | None = None

    def __post_init__(self):
        if self.zero_point is not None and (self.is_ternary or self.granularity != "channel" or
                                            tuple(self.zero_point.shape) != tuple(self.scale.shape)):
            raise DfmpcError("a zero point belongs to a k-bit (3 to 8) tensor with one scale per output channel, "
                             "one zero point per scale; quantize with asymmetric_quantize")

    @property
    def is_ternary(self) -> bool:
        return self.bits == 2

    def levels(self) -> torch.Tensor:
        """The code values mapped to [-1, 1] (before the scale), same shape as ``codes``; on an asymmetric grid,
        ``code - zero_point`` (in steps)."""
        if self.is_ternary:
            return self.codes.to(self.scale.dtype)
        if self.zero_point is not None:
            return self.codes.to(self.scale.dtype) - per_row(self.zero_point.to(self.scale.dtype), self.codes.dim())
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

    @property
    def zero_point_bits(self) -> int:
        """Zero points are stored as int16 (16 bits each; none on a symmetric grid)."""
        return 0 if self.zero_point is None else self.zero_point.numel() * 16


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


def asymmetric_grid_position(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The min/max grid of ZeroQ's and SQuant's reference code, per output channel: ``(x, step, zero_point)`` with
    ``step = (max - min) / (2^k - 1)`` (min and max of the channel's weights), the integer
    ``zero_point = -round(min / step)`` (so that zero is a level) and ``x = w / step + zero_point``, the weight in
    units of the grid (rounding and clamping it to 0 .. 2^k - 1 gives the codes). ``step`` is in ``w``'s dtype,
    the rest in float64.

    Where that zero point would not fit the int16 it is stored in (a channel of one sign whose range is under
    about 1/4000 of its distance from zero, e.g. a constant one; the reference takes a step of 1e-12 there), the
    channel's range is widened to include zero, which puts the zero point in 0 .. 2^k - 1."""
    check_weight(w)
    check_bit_width(bits)
    if bits < 3 or w.dim() < 2:
        raise DfmpcError(f"the asymmetric grid is for 3- to 8-bit weights of at least 2 dims [out, in, ...], got "
                         f"{bits} bits and shape {tuple(w.shape)}; use quantize_weight for ternary weights")
    n = 2**bits - 1
    rows = w.detach().reshape(len(w), -1)
    low, high = rows.amin(1), rows.amax(1)
    step = ((high - low) / n).clamp(min=1e-12)
    zero_point = -torch.round(low.double() / step.double())
    narrow = zero_point.abs() > ZERO_POINT_LIMIT
    if narrow.any():
        low, high = torch.where(narrow, low.clamp(max=0), low), torch.where(narrow, high.clamp(min=0), high)
        step = torch.where(narrow, ((high - low) / n).clamp(min=1e-12), step)
        zero_point = -torch.round(low.double() / step.double())
    return w.double() / per_row(step.double(), w.dim()) + per_row(zero_point, w.dim()), step, zero_point


def asymmetric_quantize(w: torch.Tensor, bits: int) -> QuantizedTensor:
    """k-bit weights on the asymmetric min/max grid of :func:`asymmetric_grid_position`, rounded to nearest:
    ``w ~ step * (code - zero_point)`` with codes 0 .. 2^k - 1 and one step and zero point per output channel."""
    x, step, zero_point = asymmetric_grid_position(w, bits)
    codes = torch.round(x).clamp(0, 2**bits - 1)
    return QuantizedTensor(codes=codes.to(torch.int16 if bits > 7 else torch.int8), scale=step, bits=bits,
                           granularity="channel", zero_point=zero_point.to(torch.int16))


def quantize_weight(w: torch.Tensor, bits: int, granularity: str = "tensor") -> QuantizedTensor:
    """Quantize a weight as the paper does: 2 bits -> ternary (Eq. 3-4), 3..8 bits -> uniform (Eq. 6).

    "For 2-bit, our DF-MPC uses the ternary representation based on Eq. (3). For 3-bit and 6-bit,
    our DF-MPC uses the quantized representation based on Eq. (6)." (paper, Section 5.2)
    """
    check_bit_width(bits)
    if bits == 2:
        return ternary_quantize(w, granularity)
    return uniform_quantize(w, bits, granularity)
