"""SQuant (Guo et al. 2022): data-free flip rounding, as a method: the project's grids and plan, every weight's
codes by :func:`dfmpc.rounding.squant_quantize` (the algorithm, and where it differs from the reference, are
described there)."""
from __future__ import annotations

from ..errors import DfmpcError
from ..rounding import CHUNK, grid_position, squant_quantize, squant_round
from .base import QuantizationMethod

__all__ = ["SQuant", "squant_round", "squant_quantize", "grid_position", "CHUNK"]


class SQuant(QuantizationMethod):
    name = "squant"

    def __init__(self, bits="2/6", granularity: str = "channel", squant_k: bool = True, squant_c: bool = True,
                 **kwargs):
        for label, value in (("squant_k", squant_k), ("squant_c", squant_c)):
            if not isinstance(value, bool):
                raise DfmpcError(f"{label} must be True or False, got {value!r}")
        super().__init__(bits, granularity=granularity, **kwargs)
        self.squant_k = squant_k
        self.squant_c = squant_c

    def settings(self) -> dict:
        return {**super().settings(), "squant_k": self.squant_k, "squant_c": self.squant_c}

    def quantize_layer(self, name, weight, bits, run):
        return squant_quantize(weight, bits, self.granularity, self.squant_k, self.squant_c)
