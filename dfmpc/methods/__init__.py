"""Quantization methods, one file each; ``METHODS`` maps the names used by the API and the CLI."""
from .base import QuantizationMethod
from .dfmpc import MixedPrecisionCompensation
from .original import DirectQuantization

METHODS: dict[str, type[QuantizationMethod]] = {
    DirectQuantization.name: DirectQuantization,
    MixedPrecisionCompensation.name: MixedPrecisionCompensation,
}

__all__ = ["METHODS", "QuantizationMethod", "DirectQuantization", "MixedPrecisionCompensation"]
