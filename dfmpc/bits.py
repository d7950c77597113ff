"""Bit widths: ``"LOW/HIGH"`` parsed without torch, so that the command line checks ``--bits`` at once."""
from __future__ import annotations

import re

from .errors import DfmpcError

__all__ = ["MIN_BITS", "MAX_BITS", "parse_bits"]

MIN_BITS, MAX_BITS = 2, 8


def parse_bits(bits) -> tuple[int, int]:
    """``"2/6"`` or ``(2, 6)`` -> (low, high), checking 2 <= low <= high <= 8. ``"6"`` means 6/6."""
    if isinstance(bits, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:/\s*(\d+)\s*)?", bits)
        if not m:
            raise DfmpcError(f"bits {bits!r} is not LOW/HIGH; write e.g. 2/6 (2 <= LOW <= HIGH <= 8)")
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
    elif isinstance(bits, (tuple, list)) and len(bits) == 2 and all(isinstance(b, int) for b in bits):
        low, high = bits
    elif isinstance(bits, int) and not isinstance(bits, bool):
        low = high = bits
    else:
        raise DfmpcError(f"bits {bits!r} is not LOW/HIGH; write e.g. '2/6' or (2, 6)")
    if not (MIN_BITS <= low <= high <= MAX_BITS):
        raise DfmpcError(f"bits {low}/{high} out of range; need {MIN_BITS} <= LOW <= HIGH <= {MAX_BITS}, e.g. 2/6")
    return low, high
