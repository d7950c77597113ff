r"""OMSE: per-channel MSE-optimal weight clipping (Choukroun et al. 2019, "Low-bit quantization of
neural networks for efficient inference", the weight part: kernel-wise scales that minimise the
L2 quantization error of each output channel).

For every output channel o with weights w (n entries) and the quantizer family of the paper, the
scale is the one that minimises the (optionally weighted) squared error

    e(scale) = sum_k v_k (w_k - Q_scale(w_k))^2 .

* 2 bits (ternary, Eq. 3-4): Q(w) = alpha q, q in {-1, 0, +1}. For a fixed alpha the best code of each
  entry is sign(w) where |w| > alpha / 2 and 0 elsewhere, whatever its weight v_k; so the optimal
  non-zero set is always the k largest |w| for some k. For that set the best alpha is
  S_k / V_k (S_k = sum of v |w| over the set, V_k = sum of v over it) and the error is
  sum v w^2 - S_k^2 / V_k. Trying every k (after one sort) gives the exact optimum: the MSE-optimal
  threshold replaces the rule of thumb Delta = 0.7 E|w| of Eq. (4).
* 3..8 bits (uniform, Eq. 6): levels scale * (2c / (2^k - 1) - 1), c = 0 .. 2^k - 1; weights beyond
  the scale are clipped to the outer level. e(scale) is piecewise quadratic with many local minima,
  so the scale is searched on a grid of ``grid`` clip ratios scale / max|w| in (0, 1], then on a grid
  ``fine`` times finer around the best ratio of every channel, then refined by alternating "codes for
  this scale" and "least-squares scale for these codes" (each step cannot increase e).

``v_k = 1`` is plain OMSE (:mod:`dfmpc.methods.omse`); :mod:`dfmpc.methods.dfmpc_plus` passes the data-free variance of each
entry's input channel instead.
"""
from __future__ import annotations

import torch

from .errors import DfmpcError
from .numerics import by_row_chunks, check_bit_width, divide_where_positive, positive_or_one
from .quantizers import QuantizedTensor, check_weight
from .rounding import squant_round

__all__ = ["SEARCH_LIMIT", "mse_optimal_ternary", "mse_optimal_uniform", "mse_optimal_quantize",
           "weighted_quantization_error", "cosine_optimal_asymmetric_grid", "asymmetric_codes"]


SEARCH_LIMIT = 2**22  # weights searched for the clipping scales of one tensor (see mse_optimal_uniform)


def _rows(w: torch.Tensor, granularity: str) -> torch.Tensor:
    return w.reshape(1, -1) if granularity == "tensor" else w.reshape(w.shape[0], -1)


def _weights_like(w: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return torch.ones_like(w, dtype=torch.float64)
    weights = torch.broadcast_to(weights.double(), w.shape)
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise DfmpcError("quantization error weights must be finite and non-negative")
    return weights


def _scale_out(scale: torch.Tensor, granularity: str, dtype) -> torch.Tensor:
    return (scale[0] if granularity == "tensor" else scale).to(dtype)


def mse_optimal_ternary(w: torch.Tensor, granularity: str = "channel", weights: torch.Tensor | None = None) -> QuantizedTensor:
    """Ternary codes and scale that minimise sum v (w - alpha q)^2 exactly, per channel or per tensor.

    Sorting |w| per row gives the optimum: the best codes keep the k largest |w| for some k. A tensor of more
    than SEARCH_LIMIT weights (only VGG's first classifier layer among the listed models) finds k on a
    strided subsample of every row and keeps the weights above that row's threshold.
    """
    check_weight(w)
    x = _rows(w.detach().double(), granularity)
    v = None if weights is None else _rows(_weights_like(w, weights), granularity)  # None: all ones
    a = x.abs()
    stride = -(-x.numel() // SEARCH_LIMIT)
    searched_a = a[:, ::stride]
    # every row is its own problem: chunks of rows keep the sort in the cache (numerics.ROW_CHUNK_ELEMENTS)
    keep, alpha = by_row_chunks(_ternary_choice, searched_a, None if v is None else v[:, ::stride])
    if stride > 1:  # the subsample's threshold for the whole row, then the least-squares scale for those codes
        threshold = torch.where(keep.any(dim=1), torch.where(keep, searched_a, torch.inf).amin(dim=1), torch.inf)
        keep = (a >= threshold[:, None]) & (a > 0)
        s, vv = (_weighted(v, a) * keep).sum(dim=1), _weighted(v, keep.double()).sum(dim=1)
        alpha = divide_where_positive(s, vv, torch.zeros_like(vv))
        keep = keep & (alpha[:, None] > 0)
    codes = (torch.sign(x) * keep).to(torch.int8).reshape(w.shape)
    return QuantizedTensor(codes=codes, scale=_scale_out(alpha, granularity, w.dtype), bits=2, granularity=granularity)


def _ternary_choice(a: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-row optimum: which |w| keep a non-zero code, and the scale alpha (``v=None``: all weights 1)."""
    a_sorted, order = torch.sort(a, dim=1, descending=True, stable=True)
    if v is None:
        s = torch.cumsum(a_sorted, dim=1)
        vv = torch.arange(1, a.shape[1] + 1, dtype=a.dtype).expand_as(a)  # the cumulative sum of ones, exactly
    else:
        v_sorted = v.gather(1, order)
        s = torch.cumsum(v_sorted * a_sorted, dim=1)
        vv = torch.cumsum(v_sorted, dim=1)
    gain = divide_where_positive(s * s, vv, torch.zeros_like(vv))
    k = gain.argmax(dim=1)  # number of non-zero codes minus one
    best_s = s.gather(1, k[:, None])[:, 0]
    best_v = vv.gather(1, k[:, None])[:, 0]
    alpha = divide_where_positive(best_s, best_v, torch.zeros_like(best_v))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(a.shape[1]).expand_as(order).contiguous())
    return (rank <= k[:, None]) & (a > 0) & (alpha[:, None] > 0), alpha


def _uniform_codes(x: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    # in place on one temporary: the operations of round(n (x / (2 scale) + 1/2)).clamp(0, n), in that order
    codes = x / (2 * positive_or_one(scale)[:, None])
    return codes.add_(0.5).mul_(n).round_().clamp_(0, n)


def _levels(codes: torch.Tensor, n: int) -> torch.Tensor:
    """The level 2 c / n - 1 of every code c, in units of the scale (overwrites ``codes``)."""
    return codes.mul_(2).div_(n).sub_(1)


def _weighted(v: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """v x; ``v=None`` stands for all-ones weights (x itself: multiplying by 1 is exact, so the sums are the same)."""
    return x if v is None else v * x


def _uniform_error(x, v, scale, n):
    codes = _uniform_codes(x, scale, n)
    q = scale[:, None] * (2 * codes / n - 1)
    return (_weighted(v, (x - q) ** 2)).sum(dim=1), codes


def _uniform_fit(x, v, scale, n):
    """Codes for clipping scale ``scale``, the least-squares reconstruction scale for them, and sum v w q / sum v q^2 parts."""
    codes = _uniform_codes(x, scale, n)
    lv = _levels(codes.clone(), n)
    return codes, (_weighted(v, x) * lv).sum(dim=1), (_weighted(v, lv) * lv).sum(dim=1)


def _cosine_score(x, v, scale, n):
    """(sum v x l)^2 / sum v l^2 over every row for the levels l of the codes of ``scale`` (0 where no level is
    non-zero): the squared cosine of the codes with the row times |x|_v^2. The values of :func:`_uniform_fit`'s
    parts, with one temporary instead of six (the search's inner loop)."""
    lv = _levels(_uniform_codes(x, scale, n), n)
    num = (_weighted(v, x) * lv).sum(dim=1)
    den = (lv.mul_(lv) if v is None else v * lv * lv).sum(dim=1)
    return divide_where_positive(num * num, den, torch.zeros_like(den))


def _clip_ratio_search(x32: torch.Tensor, v32: torch.Tensor | None, top: torch.Tensor, n: int, grid: int, fine: int,
                       criterion: str) -> torch.Tensor:
    """The clipping ratio of every row: a coarse grid of ratios in (0, 1], then a fine grid around each row's best."""
    def score(scale):  # lower is better
        scale = scale.float()
        if criterion == "mse":
            return _uniform_error(x32, v32, scale, n)[0].double()
        return -_cosine_score(x32, v32, scale, n).double()

    best_ratio, best = torch.ones_like(top), score(top)
    for r in torch.arange(1, grid, dtype=torch.float64) / grid:
        value = score(top * r)
        better = value < best
        best, best_ratio = torch.where(better, value, best), torch.where(better, r, best_ratio)
    for t in torch.linspace(-1, 1, 2 * fine + 1, dtype=torch.float64):
        r = (best_ratio + t / grid).clamp(1 / (grid * fine), 1.0)
        value = score(top * r)
        better = value < best
        best, best_ratio = torch.where(better, value, best), torch.where(better, r, best_ratio)
    return best_ratio


def mse_optimal_uniform(w: torch.Tensor, bits: int, granularity: str = "channel", weights: torch.Tensor | None = None,
                        grid: int = 32, fine: int = 8, refine: int = 5, criterion: str = "mse") -> QuantizedTensor:
    """Uniform k-bit codes (Eq. 6 levels) with the clipping scale chosen by ``criterion``.

    ``"mse"`` (OMSE): the scale minimises sum v (w - Q(w))^2, levels and clipping tied to one scale.
    ``"cosine"``: the clipping scale maximises the weighted cosine <q, w>_v / (|q|_v |w|_v) between the
    level pattern and the weights, and the stored scale is the least-squares one for those codes;
    that is the smallest error any rescaling of the codes can reach (used by ``dfmpc+``, which
    rescales every channel afterwards anyway).
    """
    check_weight(w)
    check_bit_width(bits, 3, "uniform bits")
    if criterion not in ("mse", "cosine"):
        raise DfmpcError(f"unknown criterion {criterion!r}; use 'mse' or 'cosine'")
    n = 2**bits - 1
    full_x = _rows(w.detach().double(), granularity)
    # no weights: all ones, left out of the products (the same values, a third fewer passes)
    full_v = None if weights is None else _rows(_weights_like(w, weights), granularity)
    top = full_x.abs().amax(dim=1)
    # The search runs on at most SEARCH_LIMIT weights of the tensor, every row subsampled with the same stride:
    # every layer of the listed models but VGG's first classifier layer has fewer and is searched exactly; that
    # one has 103 million weights, and searching all of them 60 times took a minute. The codes and the result
    # use all weights.
    stride = -(-full_x.numel() // SEARCH_LIMIT)
    x, v = full_x[:, ::stride], None if full_v is None else full_v[:, ::stride]

    x32, v32 = x.float(), None if v is None else v.float()  # the search in single precision (twice as fast)
    # every row searches on its own: chunks of rows keep the passes in the cache (numerics.ROW_CHUNK_ELEMENTS)
    best_ratio = by_row_chunks(lambda x_rows, v_rows, top_rows: _clip_ratio_search(x_rows, v_rows, top_rows, n, grid,
                                                                                   fine, criterion), x32, v32, top)
    best_scale = top * best_ratio
    if criterion == "cosine":
        codes, num, den = _uniform_fit(full_x, full_v, best_scale, n)
        ls = divide_where_positive(num, den, torch.zeros_like(den))
        return QuantizedTensor(codes=codes.reshape(w.shape).to(torch.int16 if bits > 7 else torch.int8),
                               scale=_scale_out(ls, granularity, w.dtype), bits=bits, granularity=granularity)
    best_err = _uniform_error(x, v, best_scale, n)[0]
    for _ in range(refine):  # Lloyd-style: least-squares scale for the current codes
        _, num, den = _uniform_fit(x, v, best_scale, n)
        ls = divide_where_positive(num, den, best_scale)
        new_err = _uniform_error(x, v, ls, n)[0]
        better = (new_err < best_err) & (ls > 0)
        best_err = torch.where(better, new_err, best_err)
        best_scale = torch.where(better, ls, best_scale)
    codes = _uniform_codes(full_x, best_scale, n).reshape(w.shape)
    return QuantizedTensor(codes=codes.to(torch.int16 if bits > 7 else torch.int8),
                           scale=_scale_out(best_scale, granularity, w.dtype), bits=bits, granularity=granularity)


def mse_optimal_quantize(w: torch.Tensor, bits: int, granularity: str = "channel",
                         weights: torch.Tensor | None = None, criterion: str = "mse") -> QuantizedTensor:
    """2 bits -> :func:`mse_optimal_ternary` (exact; MSE- and cosine-optimal coincide), 3..8 bits ->
    :func:`mse_optimal_uniform` with ``criterion``."""
    check_bit_width(bits)
    if bits == 2:
        return mse_optimal_ternary(w, granularity, weights)
    return mse_optimal_uniform(w, bits, granularity, weights, criterion=criterion)


def weighted_quantization_error(w: torch.Tensor, q: QuantizedTensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum v (w - dequantized)^2 per output channel (float64)."""
    v = _weights_like(w, weights)
    d = (w.double() - q.dequantize().double()) ** 2 * v
    return d.reshape(w.shape[0], -1).sum(dim=1)


def _asymmetric_grid(low: torch.Tensor, high: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and integer zero point per row of the k-bit grid from ``low`` to ``high`` (both hold zero)."""
    step = ((high - low) / n).clamp(min=1e-12)
    return step, torch.round(-low / step)


def _asymmetric_ratio_search(x, v, low, high, n: int, grid: int, fine: int) -> torch.Tensor:
    """The ratio r of every row whose grid from r low to r high has the largest weighted cosine with the row: a coarse
    grid of ratios in (0, 1], then a fine grid around each row's best (as :func:`_clip_ratio_search`)."""
    def score(ratio):  # lower is better: minus the squared cosine times |x|_v^2
        step, zero_point = _asymmetric_grid(low * ratio, high * ratio, n)
        # round-to-nearest codes minus the zero point (levels, in steps), in place on one temporary: the inner loop
        levels = (x / step[:, None]).add_(zero_point[:, None]).round_().clamp_(0, n).sub_(zero_point[:, None])
        num = (_weighted(v, x) * levels).sum(dim=1)
        den = (levels.mul_(levels) if v is None else v * levels * levels).sum(dim=1)
        return -divide_where_positive(num * num, den, torch.zeros_like(den))

    best_ratio = torch.ones_like(low)
    best = score(best_ratio)
    for r in torch.arange(1, grid, dtype=torch.float64) / grid:
        value = score(torch.full_like(best_ratio, r))
        better = value < best
        best, best_ratio = torch.where(better, value, best), torch.where(better, r, best_ratio)
    for t in torch.linspace(-1, 1, 2 * fine + 1, dtype=torch.float64):
        r = (best_ratio + t / grid).clamp(1 / (grid * fine), 1.0)
        value = score(r)
        better = value < best
        best, best_ratio = torch.where(better, value, best), torch.where(better, r, best_ratio)
    return best_ratio


def cosine_optimal_asymmetric_grid(w: torch.Tensor, bits: int, weights: torch.Tensor | None = None, grid: int = 32,
                                   fine: int = 8, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The asymmetric k-bit grid of every output channel (``(step, zero_point)``, float64, one each per channel)
    whose round-to-nearest codes have the largest weighted cosine ``<q, w>_v / (|q|_v |w|_v)`` with the channel:
    the grid from ``r min(w, 0)`` to ``r max(w, 0)`` (so that zero is a level, and the zero point lies in
    0 .. 2^k - 1), the clipping ratio ``r`` in (0, 1] searched as the symmetric one of :func:`mse_optimal_uniform`
    (coarse, then fine; on at most :data:`SEARCH_LIMIT` weights). ``search=False``: ``r = 1``, the channel's range.
    The cosine is what is left of the error once the channel's gain is corrected, as for the symmetric grid."""
    check_weight(w)
    check_bit_width(bits, 3, "uniform bits")
    if w.dim() < 2:
        raise DfmpcError(f"the asymmetric grid needs a weight of at least 2 dims [out, in, ...], got shape {tuple(w.shape)}")
    n = 2**bits - 1
    x = _rows(w.detach().double(), "channel")
    v = None if weights is None else _rows(_weights_like(w, weights), "channel")  # None: all ones, left out
    low, high = x.amin(dim=1).clamp(max=0), x.amax(dim=1).clamp(min=0)
    if search:
        stride = -(-x.numel() // SEARCH_LIMIT)
        ratio = by_row_chunks(lambda x_rows, v_rows, low_rows, high_rows: _asymmetric_ratio_search(
            x_rows, v_rows, low_rows, high_rows, n, grid, fine), x[:, ::stride], None if v is None else v[:, ::stride],
            low, high)
    else:
        ratio = torch.ones_like(low)
    return _asymmetric_grid(low * ratio, high * ratio, n)


def asymmetric_codes(w: torch.Tensor, bits: int, weights: torch.Tensor | None = None, search: bool = True,
                     flip: bool = True) -> QuantizedTensor:
    """k-bit codes of ``w`` on the asymmetric grid of every output channel with the largest cosine
    (:func:`cosine_optimal_asymmetric_grid`; ``search=False``: the channel's range), rounded by
    SQuant's flip rule on it (``flip=False``: to nearest), stored with the least-squares step for those codes and
    the grid's zero point."""
    step, zero_point = cosine_optimal_asymmetric_grid(w, bits, weights, search=search)
    shape = (-1,) + (1,) * (w.dim() - 1)
    position = w.double() / step.reshape(shape) + zero_point.reshape(shape)
    n = 2**bits - 1
    codes = squant_round(position, 0, n) if flip else torch.round(position).clamp(0, n)
    x = w.detach().double().reshape(len(w), -1)
    v = torch.ones_like(x) if weights is None else torch.broadcast_to(weights.double(), w.shape).reshape(len(w), -1)
    levels = codes.double().reshape(len(w), -1) - zero_point[:, None]
    least_squares = divide_where_positive((v * x * levels).sum(dim=1), (v * levels * levels).sum(dim=1), step)
    return QuantizedTensor(codes=codes.to(torch.int16 if bits > 7 else torch.int8),
                           scale=torch.where(least_squares > 0, least_squares, step).to(w.dtype), bits=bits,
                           granularity="channel", zero_point=zero_point.to(torch.int16))
