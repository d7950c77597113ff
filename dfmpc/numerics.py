"""The small numerical helpers every quantizer and method shares (one definition each, below all of them).

* :func:`per_row`: a scalar or a per-output-channel vector shaped to broadcast over a weight;
* :func:`positive_or_one` and :func:`divide_where_positive`: division guarded where the divisor is zero (an
  all-zero channel, a zero scale), with the fallback said at the call;
* :func:`check_bit_width`: one integer bit width within the library's range, or one line saying what is allowed;
* :func:`row_chunks` and :func:`by_row_chunks`: a row-wise search run on cache-sized chunks of rows.
"""
from __future__ import annotations

import torch

from .bits import MAX_BITS, MIN_BITS
from .errors import DfmpcError

__all__ = ["per_row", "positive_or_one", "divide_where_positive", "check_bit_width", "ROW_CHUNK_ELEMENTS", "row_chunks",
           "by_row_chunks"]

#: A row-wise search runs on chunks of rows of about this many weights, so that the temporaries of its many passes
#: stay in the CPU's cache. Measured by ``dfmpc experiments speed`` when chunking was introduced (both runs under the same
#: load, see the history of book/data/speed.json): dfmpc+ on ResNet-18 took 8.89 s on whole layers and 3.89 s on
#: chunks. Every row is computed by the same operations either way, so the results are the same to the bit
#: (tests/test_quantizers.py checks).
ROW_CHUNK_ELEMENTS = 1 << 17


def per_row(values: torch.Tensor, dim: int) -> torch.Tensor:
    """A scalar or a (C,) vector shaped to broadcast over a weight of ``dim`` dims (C = output channels)."""
    return values if values.dim() == 0 else values.reshape(-1, *([1] * (dim - 1)))


def positive_or_one(x: torch.Tensor) -> torch.Tensor:
    """``x`` where it is positive, 1 elsewhere: a divisor that never divides by zero."""
    return torch.where(x > 0, x, torch.ones_like(x))


def divide_where_positive(num: torch.Tensor, den: torch.Tensor, otherwise) -> torch.Tensor:
    """``num / den`` where ``den > 0``, ``otherwise`` (a tensor or a number) where it is not."""
    return torch.where(den > 0, num / positive_or_one(den), otherwise)


def check_bit_width(bits, low: int = MIN_BITS, what: str = "bits") -> None:
    """``bits`` is an integer from ``low`` to :data:`~dfmpc.bits.MAX_BITS`; else a :class:`DfmpcError`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (low <= bits <= MAX_BITS):
        raise DfmpcError(f"{what} must be an integer in [{low}, {MAX_BITS}], got {bits!r}")


def row_chunks(rows: int, columns: int, elements: int | None = None) -> list[slice]:
    """Slices of consecutive rows, each of at most ``elements`` values (default :data:`ROW_CHUNK_ELEMENTS`) but at
    least one row, covering ``rows`` rows of ``columns`` values in order."""
    step = max(1, (elements or ROW_CHUNK_ELEMENTS) // max(1, columns))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def by_row_chunks(solve, *tensors: torch.Tensor | None, columns: int | None = None):
    """``solve`` on the same chunk of rows (:func:`row_chunks`) of every tensor, its results concatenated along the
    rows: a tensor, or a tuple of tensors where ``solve`` returns a tuple. For searches in which every row is its own
    problem, so that the result is the one of ``solve(*tensors)``. A tensor after the first may be None (an
    optional argument, e.g. weights of one), passed on as None. ``columns`` sizes the chunks (default: the values
    in one row of the first tensor)."""
    first = tensors[0]
    width = first[0].numel() if columns is None else columns
    parts = [solve(*(None if t is None else t[rows] for t in tensors)) for rows in row_chunks(first.shape[0], width)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(part) for part in zip(*parts))
    return torch.cat(parts)
