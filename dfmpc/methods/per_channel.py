"""Per-channel direct quantization: the paper's quantizers with one scale per output channel.

The same ternary (Eq. 3-4, threshold 0.7 E|w| and scale E|w| over the kept entries) and uniform
(Eq. 6, scale max|w|) quantizers as ``original``, but every output channel gets its own threshold
and scale instead of one per tensor. Nothing else changes: no compensation, no correction. The
scales cost 32 bits per output channel (counted in the model size).
"""
from ..errors import DfmpcError
from .base import QuantizationMethod

__all__ = ["PerChannelQuantization"]


class PerChannelQuantization(QuantizationMethod):
    name = "per-channel"

    def __init__(self, bits="2/6", granularity: str = "channel", **kwargs):
        if granularity != "channel":
            raise DfmpcError(f"per-channel quantizes with granularity 'channel', not {granularity!r}; "
                             "use method 'original' for one scale per tensor")
        super().__init__(bits, granularity="channel", **kwargs)
