"""SQuant (Guo et al. 2022): data-free flip rounding, as a method: the project's grids and plan, every weight's
codes by :func:`dfmpc.rounding.squant_quantize` (the algorithm, and where it differs from the reference, are
described there). ``grid="asymmetric"`` runs it on its authors' grid (min/max per output channel, with a
zero point) at 3 bits and more."""
from __future__ import annotations

from ..errors import DfmpcError
from ..rounding import CHUNK, GRIDS, grid_position, squant_quantize, squant_round
from .base import QuantizationMethod

__all__ = ["SQuant", "squant_round", "squant_quantize", "grid_position", "CHUNK"]


class SQuant(QuantizationMethod):
    name = "squant"

    def __init__(self, bits="2/6", granularity: str = "channel", squant_k: bool = True, squant_c: bool = True,
                 grid: str = "symmetric", **kwargs):
        for label, value in (("squant_k", squant_k), ("squant_c", squant_c)):
            if not isinstance(value, bool):
                raise DfmpcError(f"{label} must be True or False, got {value!r}")
        if grid not in GRIDS:
            raise DfmpcError(f"unknown grid {grid!r}; use one of {', '.join(GRIDS)}")
        if grid == "asymmetric" and granularity != "channel":
            raise DfmpcError("grid='asymmetric' has one step and zero point per output channel; use it with "
                             "granularity='channel'")
        super().__init__(bits, granularity=granularity, **kwargs)
        self.squant_k = squant_k
        self.squant_c = squant_c
        self.grid = grid

    def settings(self) -> dict:
        return {**super().settings(), "squant_k": self.squant_k, "squant_c": self.squant_c, "grid": self.grid}

    def quantize_layer(self, name, weight, bits, run):
        return squant_quantize(weight, bits, self.granularity, self.squant_k, self.squant_c, self.grid)
