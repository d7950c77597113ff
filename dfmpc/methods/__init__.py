"""Quantization methods, one file each; ``METHODS`` maps the names used by the API and the CLI."""
from .base import QuantizationMethod
from .dfmpc import MixedPrecisionCompensation
from .dfmpc_plus import DFMPCPlus
from .dfq import DataFreeQuantization
from .ocs import OutlierChannelSplitting
from .omse import OptimalClipping
from .original import DirectQuantization
from .per_channel import PerChannelQuantization
from .squant import SQuant
from .zeroq import ZeroQ

METHODS: dict[str, type[QuantizationMethod]] = {
    DirectQuantization.name: DirectQuantization,
    PerChannelQuantization.name: PerChannelQuantization,
    DataFreeQuantization.name: DataFreeQuantization,
    OptimalClipping.name: OptimalClipping,
    OutlierChannelSplitting.name: OutlierChannelSplitting,
    SQuant.name: SQuant,
    ZeroQ.name: ZeroQ,  # synthetic data: distilled from the BatchNorm statistics, not data-free in the paper's sense
    MixedPrecisionCompensation.name: MixedPrecisionCompensation,
    DFMPCPlus.name: DFMPCPlus,
}

__all__ = ["METHODS", "settings_for_model", "QuantizationMethod",
           "DirectQuantization", "PerChannelQuantization", "DataFreeQuantization",
           "OptimalClipping", "OutlierChannelSplitting", "SQuant", "ZeroQ", "MixedPrecisionCompensation", "DFMPCPlus"]


def settings_for_model(method: str, spec) -> dict:
    """What ``method`` needs to know about a listed model beyond its weights (``spec``: its ModelSpec): the input
    size for a method that synthesises images (zeroq); nothing for the others."""
    import inspect

    accepted = inspect.signature(METHODS[method].__init__).parameters
    return {"input_size": spec.input_size} if "input_size" in accepted and spec is not None else {}
