"""Quantization methods, one file each; ``METHODS`` maps the names used by the API and the CLI."""
from .base import QuantizationMethod
from .dfmpc import MixedPrecisionCompensation
from .dfmpc_plus import DFMPCPlus
from .dfq import DataFreeQuantization
from .omse import OptimalClipping
from .original import DirectQuantization
from .per_channel import PerChannelQuantization

METHODS: dict[str, type[QuantizationMethod]] = {
    DirectQuantization.name: DirectQuantization,
    PerChannelQuantization.name: PerChannelQuantization,
    DataFreeQuantization.name: DataFreeQuantization,
    OptimalClipping.name: OptimalClipping,
    MixedPrecisionCompensation.name: MixedPrecisionCompensation,
    DFMPCPlus.name: DFMPCPlus,
}

__all__ = ["METHODS", "QuantizationMethod", "DirectQuantization", "PerChannelQuantization", "DataFreeQuantization",
           "OptimalClipping", "MixedPrecisionCompensation", "DFMPCPlus"]
