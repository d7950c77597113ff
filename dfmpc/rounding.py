r"""SQuant: data-free "flip" rounding (Guo, Qiu, Leng, Gao, Zhang, Liu, Yang, Zhu and Guo, "SQuant: On-the-Fly
Data-Free Quantization via Diagonal Hessian Approximation", ICLR 2022; the authors' code is clevercool/SQuant).

SQuant keeps the grid and changes only the rounding. Write ``x`` for a weight in grid units (``w / step``) and
``e = code - x`` for its rounding error. Approximating the Hessian of the task loss by three diagonal blocks (one
weight, one kernel, one output channel) turns "round to minimise the loss change" into the Constrained Absolute
Sum of Error: keep every ``e`` small, and the sum of ``e`` over every kernel (one output x one input channel, its
k x k entries) and over every output channel within half a step. The algorithm, in the order of the reference:

1. **SQuant-E**: round to nearest (``|e| <= 0.5``).
2. **SQuant-K**, every kernel with error sum ``s``: flip ``round(|s|)`` entries of the kernel from one neighbour
   of ``x`` to the other, the direction that moves ``s`` towards zero (down where ``s > 0``: entries rounded up;
   up where ``s < 0``), those with the largest ``|e|`` first (a flip changes ``e`` to ``e -+ 1``, so those cost
   the least element error). Afterwards ``|s| <= 0.5``. The kernel keeps one candidate for step 3: where it
   flipped one entry more than ``|s|`` ("over"), its last flip, to be undone; otherwise the next entry in its
   order, to be flipped as well. Either changes the kernel sum by one step towards the other side of zero.
3. **SQuant-C**, every output channel with error sum ``S``: flip ``round(|S|)`` of the kernels' candidates in
   the direction that moves ``S`` towards zero, largest current ``|e|`` first. Afterwards ``|S| <= 0.5``; a
   kernel changes at most once in this step, so its sum stays within 1 (not 0.5: both bounds at 0.5 cannot be
   met in general, and the reference does not try to).

A kernel of one entry (linear layers, 1x1 convolutions) skips step 2, as in the reference, and all its entries
are candidates of step 3. ``squant_k=False`` or ``squant_c=False`` skip steps 2 or 3 (the reference's ablation
modes "squant-c" and "squant-k"). Every code is the floor or the ceiling of ``x``: a flip never leaves the grid.

The grid is this project's, not the reference's, and the bits come from the plan of dfmpc:

* k >= 3 bits: the DoReFa grid of :func:`dfmpc.quantizers.uniform_quantize` (levels ``scale (2c/n - 1)``,
  ``c = 0..n``, ``n = 2^k - 1``, scale ``max|w|`` per output channel, or per tensor with ``granularity="tensor"``),
  ``x = n (w / (2 scale) + 1/2)`` in ``[0, n]``. Step 1 gives exactly the codes of ``quantize_weight``.
* 2 bits (ternary): the grid ``{-alpha, 0, +alpha}`` of :func:`dfmpc.quantizers.ternary_quantize` (Ternary Weight
  Networks, DF-MPC paper Eq. 3-4: threshold ``0.7 E|w|``, ``alpha`` the mean ``|w|`` above it), ``x = w / alpha``
  clipped to ``[-1, 1]``; step 1 is that quantizer's codes (its threshold, not ``alpha / 2``). The clipping of
  ``|w| > alpha`` to ``alpha`` belongs to the scale, not to the rounding: ``e`` is measured from the clipped ``x``,
  so SQuant decides only between the two levels around every weight, as it does on a grid that holds all weights.
  This extension to ternary codes is ours; the paper quantizes to 4 bits and more.

With ``grid="asymmetric"``, k >= 3 bits use the reference's grid instead: ZeroQ's per-channel min/max quantizer
with an integer zero point (:func:`dfmpc.quantizers.asymmetric_quantize`, so zero is a level), ``x = w / step +
zero_point``; ternary layers keep the ternary grid (the reference has none).

What the reference does and this file does not: it quantizes activations too
(weights only here) and keeps the first layer's input in full precision and the last layer's input at 8 bits
(here every layer's weight bits come from dfmpc's plan, and activations are not quantized); a kernel whose error
sum is exactly zero takes its candidate from index -1 of its order (out of range in the CUDA kernel; here it
offers none); a candidate that cannot flip (its neighbour off the grid) is skipped here
(the reference can spend a flip on it). Errors are summed in double precision (the reference: single), so
near-ties can round differently. Ties in ``|e|`` go to the lower index (stable sort).

Settings and defaults: ``granularity="channel"`` (the reference's per-output-channel weight scales),
``squant_k=True`` and ``squant_c=True`` (the reference's full "squant" mode), ``grid="symmetric"`` (the project's
grids, those of every other method of the comparison). Nothing is tuned.
"""
from __future__ import annotations

import torch

from .errors import DfmpcError
from .numerics import ROW_CHUNK_ELEMENTS, check_bit_width, divide_where_positive, per_row, row_chunks
from .quantizers import QuantizedTensor, asymmetric_grid_position, ternary_quantize, uniform_grid_position, uniform_quantize

__all__ = ["CHUNK", "GRIDS", "squant_round", "squant_quantize", "grid_position", "squant_reference_grid", "flip_rounded"]

GRIDS = ("symmetric", "asymmetric")

# weights rounded at a time (whole output channels): a cache-sized chunk (numerics.ROW_CHUNK_ELEMENTS), twice as fast
# as 4 million at a time on a 2.4-million-weight layer, and bounded memory; the result is the same
CHUNK = ROW_CHUNK_ELEMENTS


def _first(priority: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The order of the last dim by ``priority`` (largest first, ties to the lower index) and the mask of the
    ``count`` first entries of every row, in the original positions."""
    order = torch.argsort(priority, dim=-1, descending=True, stable=True)
    first = torch.arange(priority.shape[-1]) < count[..., None]
    return order, torch.zeros_like(first).scatter_(-1, order, first)


def _largest(priority: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The mask of the ``count`` entries of largest ``priority`` in every row of [R, M] (ties to the lower index,
    as a stable sort), found from the count-th largest value (``topk``), not by sorting whole rows."""
    most = int(count.max()) if count.numel() else 0
    if most == 0:
        return torch.zeros_like(priority, dtype=torch.bool)
    threshold = torch.topk(priority, most, dim=1).values.gather(1, (count - 1).clamp(min=0)[:, None])
    above = priority > threshold
    tied = priority == threshold
    chosen = above | (tied & (tied.cumsum(dim=1) <= count[:, None] - above.sum(dim=1, keepdim=True)))
    return chosen & (count > 0)[:, None]


def _flip_count(total: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """round(|sum of e|) flips (half to even, as the reference), at most as many as there are entries to flip."""
    return torch.minimum(torch.round(total.abs()), available.to(total.dtype)).to(torch.int64)


def _kernel_step(codes, err, can_up, can_down):
    """SQuant-K on [O, I, K]. Returns the new codes and every kernel's candidate for SQuant-C as [O, I] tensors:
    its position in the kernel, its direction (+1 up, -1 down, 0 none) and its priority (current |e|)."""
    total = err.sum(dim=-1)  # [O, I]
    up = total < 0  # the kernel rounded too low: flip entries up
    step = torch.where(up, 1.0, -1.0).to(err.dtype)
    allowed = torch.where(up[..., None], can_up, can_down) & (total != 0)[..., None]
    available = allowed.sum(dim=-1)
    count = _flip_count(total, available)
    order, flipped = _first(err.abs().masked_fill_(~allowed, -1.0), count)
    codes = codes + flipped * step[..., None]
    # the candidate: undo the last flip where the kernel went past zero, else flip the next entry in line
    over = (count > 0) & (count.to(err.dtype) >= total.abs())
    slot = torch.where(over, count - 1, count).clamp(max=err.shape[-1] - 1)
    position = order.gather(-1, slot[..., None])[..., 0]
    cand_err = err.gather(-1, position[..., None])[..., 0] + over * step
    cand_dir = torch.where(over, -step, torch.where(count < available, step, torch.zeros_like(step)))
    return codes, position, cand_dir, cand_err.abs()


def _channel_step(total, cand_dir, cand_priority):
    """SQuant-C: which of the candidates [O, M] of every output channel to flip (round(|S|) of those in the
    direction that shrinks the channel's error sum S, largest |e| first), and that direction [O]."""
    direction = torch.where(total < 0, 1.0, -1.0).to(total.dtype)
    allowed = (cand_dir == direction[:, None]) & (total != 0)[:, None]
    count = _flip_count(total, allowed.sum(dim=1))
    return _largest(cand_priority.masked_fill(~allowed, -1.0), count), direction


def squant_round(x: torch.Tensor, lo: int, hi: int, start: torch.Tensor | None = None, squant_k: bool = True,
                 squant_c: bool = True) -> torch.Tensor:
    """SQuant's integer levels for ``x`` (grid units, shape [O, I, ...]: output channel, input channel, kernel).

    ``x`` is clipped to ``[lo, hi]`` first; ``start`` (default: round to nearest, half to even) are the codes
    SQuant starts from, each the floor or the ceiling of the clipped ``x``. Returns int64 codes in ``[lo, hi]``,
    each the floor or the ceiling of the clipped ``x``, of the shape of ``x``. See the module docstring.
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2 or x.numel() == 0:
        raise DfmpcError("squant_round needs a non-empty floating-point tensor of at least 2 dims [out, in, ...]")
    if not torch.isfinite(x).all():
        raise DfmpcError("squant_round got NaN or inf in x; check the weights and the scale")
    if not lo < hi:
        raise DfmpcError(f"squant_round needs lo < hi, got lo={lo}, hi={hi}")
    if start is not None and (not torch.is_tensor(start) or start.shape != x.shape):
        raise DfmpcError(f"squant_round: start must be a tensor shaped as x {tuple(x.shape)}")
    rows, cols = x.shape[0], x.shape[1]
    out = torch.empty(x.shape, dtype=torch.int64)
    # output channels are independent: a few at a time bounds the memory (VGG-16's first classifier layer)
    for chunk in row_chunks(rows, x[0].numel(), CHUNK):
        target = x[chunk].detach().double().clamp(lo, hi)
        codes = torch.round(target) if start is None else start[chunk].detach().to(torch.float64)
        if not torch.all((codes - target).abs() < 1) or codes.min() < lo or codes.max() > hi:
            raise DfmpcError("squant_round: start must be integer levels in [lo, hi] within one step of x")
        done = _squant_rows(target.reshape(len(target), cols, -1), codes.reshape(len(target), cols, -1), lo, hi,
                            squant_k, squant_c)
        out[chunk] = done.reshape(target.shape)
    return out


def _squant_rows(target, codes, lo, hi, squant_k, squant_c):
    """SQuant on [O, I, K] (clipped x and start codes, both double)."""
    rows = target.shape[0]
    err = codes - target
    can_up, can_down = (err < 0) & (codes + 1 <= hi), (err > 0) & (codes - 1 >= lo)
    if squant_k and target.shape[-1] > 1:
        codes, position, cand_dir, cand_priority = _kernel_step(codes, err, can_up, can_down)
        if squant_c:
            total = (codes - target).reshape(rows, -1).sum(dim=1)
            flipped, direction = _channel_step(total, cand_dir, cand_priority)  # [O, I]: one candidate per kernel
            at = torch.arange(target.shape[-1]) == position[..., None]
            codes = codes + (flipped[..., None] & at) * direction[:, None, None]
    elif squant_c:  # no kernel step: every entry is a candidate, in the direction that shrinks its own error
        cand_dir = (can_up.to(torch.int8) - can_down.to(torch.int8)).reshape(rows, -1)
        flipped, direction = _channel_step(err.reshape(rows, -1).sum(dim=1), cand_dir, err.abs().reshape(rows, -1))
        codes = codes + (flipped * direction[:, None]).reshape(codes.shape)
    return codes


def grid_position(w: torch.Tensor, bits: int, granularity: str = "channel") -> tuple[torch.Tensor, QuantizedTensor]:
    """``x``, the weight in grid units, and the round-to-nearest :class:`QuantizedTensor` of the project's quantizer
    (``quantize_weight``): ``x = w / alpha`` for ternary (0 where alpha = 0), ``x = n (w / (2 scale) + 1/2)``
    for k >= 3 bits (the expression of ``uniform_quantize``, so that rounding ``x`` gives its codes)."""
    check_bit_width(bits)
    if torch.is_tensor(w) and w.dim() < 2:  # the quantizers check the rest
        raise DfmpcError(f"SQuant needs a weight of at least 2 dims [out, in, ...], got shape {tuple(w.shape)}")
    if bits == 2:
        base = ternary_quantize(w, granularity)
        alpha = per_row(base.scale, w.dim())
        x = divide_where_positive(w, alpha, torch.zeros_like(w))
        return x, base
    base = uniform_quantize(w, bits, granularity)
    return uniform_grid_position(w, base.scale, bits), base


def squant_quantize(w: torch.Tensor, bits: int, granularity: str = "channel", squant_k: bool = True,
                    squant_c: bool = True, grid: str = "symmetric") -> QuantizedTensor:
    """SQuant's codes on the grid of ``quantize_weight(w, bits, granularity)`` (same scales): 2 bits ternary
    codes {-1, 0, 1} starting from TWN's, k >= 3 bits DoReFa codes 0..2^k - 1 starting from round to nearest.
    ``grid="asymmetric"``: k >= 3 bits on the reference's min/max grid with a zero point per output channel
    (``granularity`` must be "channel"), starting from its round to nearest; ternary as above."""
    if grid not in GRIDS:
        raise DfmpcError(f"unknown grid {grid!r}; use one of {', '.join(GRIDS)}")
    if grid == "asymmetric" and bits > 2:
        if granularity != "channel":
            raise DfmpcError("the asymmetric grid has one step and zero point per output channel; use "
                             "granularity='channel' with grid='asymmetric'")
        x, step, zero_point = asymmetric_grid_position(w, bits)
        codes = squant_round(x, 0, 2**bits - 1, squant_k=squant_k, squant_c=squant_c)
        return QuantizedTensor(codes=codes.to(torch.int16 if bits > 7 else torch.int8), scale=step, bits=bits,
                               granularity="channel", zero_point=zero_point.to(torch.int16))
    x, base = grid_position(w, bits, granularity)
    lo, hi = (-1, 1) if bits == 2 else (0, 2**bits - 1)
    codes = squant_round(x, lo, hi, start=base.codes, squant_k=squant_k, squant_c=squant_c)
    return QuantizedTensor(codes=codes.to(base.codes.dtype), scale=base.scale, bits=bits, granularity=granularity)


def squant_reference_grid(w: torch.Tensor, bits: int, squant_k: bool = True, squant_c: bool = True) -> torch.Tensor:
    """The weights SQuant gives on its reference code's grid, at k >= 3 bits, dequantized (float, shaped as ``w``).

    The grid is ZeroQ's asymmetric quantizer, per output channel: step ``(max - min) / n`` with ``n = 2^k - 1``
    (min and max of the channel's weights), levels ``step * (offset + c)`` for codes ``c = 0..n`` and the integer
    ``offset = round(min / step)`` (so zero is a level). SQuant's flips (:func:`squant_round`) act on the
    weight's position ``w / step - offset`` in that grid. With ``squant_k=squant_c=False`` this is their
    round to nearest. The reference's arithmetic, in float64, as ``dfmpc experiments deviations`` measured it;
    ``squant_quantize(w, bits, grid="asymmetric")`` gives the same codes as a :class:`QuantizedTensor` (a zero point
    and a float32 step: the weights agree to float32 rounding) that the file format and ONNX export store.
    """
    check_bit_width(bits)
    if bits < 3:
        raise DfmpcError(f"squant_reference_grid is for 3 to 8 bits (the reference has no ternary grid), got {bits}")
    if not torch.is_tensor(w) or w.dim() < 2:
        raise DfmpcError("squant_reference_grid needs a weight tensor of at least 2 dims [out, in, ...]")
    n = 2**bits - 1
    rows = w.detach().double().reshape(len(w), -1)
    low, high = rows.min(1).values, rows.max(1).values
    step = ((high - low) / n).clamp(min=1e-12)
    step, offset = per_row(step, w.dim()), per_row(torch.round(low / step), w.dim())
    x = w.detach().double() / step - offset
    codes = squant_round(x, 0, n, squant_k=squant_k, squant_c=squant_c)
    return ((codes.double() + offset) * step).to(w.dtype)


def flip_rounded(w: torch.Tensor, q: QuantizedTensor) -> QuantizedTensor:
    """The k-bit codes of ``w`` on the grid of ``q`` (its scales, Eq. 6 levels), rounded by SQuant's flip rule
    (:func:`squant_round`: every kernel's and every channel's rounding-error sum near zero) instead of to the nearest
    level: how dfmpc+ rounds its k-bit layers."""
    codes = squant_round(uniform_grid_position(w, q.scale, q.bits), 0, 2**q.bits - 1)
    return QuantizedTensor(codes=codes.to(q.codes.dtype), scale=q.scale, bits=q.bits, granularity=q.granularity)
