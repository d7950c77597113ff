"""Model size in MB as the paper's Tables 3-4 count it.

The paper's full-precision column is the parameter count times 32 bits in MiB (2^20 bytes):
ResNet-18's 11,689,512 parameters give 44.59 MB. We count the quantized model the same way:

* every quantized weight tensor: ``numel * bits`` (a ternary code takes 2 bits), plus its
  scale(s) at 32 bits (one per tensor, or one per output channel);
* every other parameter (biases, BatchNorm gamma / beta, layers kept in full precision): 32 bits;
* every compensation vector c (one float per input channel of a compensated layer, Eq. 7): 32 bits.

BatchNorm running statistics are buffers, not parameters; like the paper's FP32 column we do not
count them. Everything is computed from shapes, so sizes follow without any weights.
:func:`dfmpc.save_quantized` writes these bits (codes packed at their bit width), plus the running
statistics and a header: the file is a few per cent larger (see :mod:`dfmpc.packed`).
"""
from __future__ import annotations

from torch import nn

__all__ = ["MIB", "fp32_size_mb", "quantized_size_mb"]

MIB = 8 * 2**20  # bits in one MB as the paper counts it


def fp32_size_mb(model: nn.Module) -> float:
    """Parameters times 32 bits, in MB (the paper's "Full-precision" / "FP32" size)."""
    return sum(p.numel() for p in model.parameters()) * 32 / MIB


def quantized_size_mb(model: nn.Module, bits_by_layer: dict[str, int], granularity: str = "tensor",
                      compensated: dict[str, int] | None = None) -> float:
    """Size of ``model`` with the weight of each layer in ``bits_by_layer`` quantized to that many bits.

    ``bits_by_layer``: layer name -> bits (32 means kept in full precision).
    ``compensated``: layer name -> length of its compensation vector c (stored at 32 bits).
    """
    modules = dict(model.named_modules())
    quantized = {f"{name}.weight": (bits, modules[name].weight.shape[0])
                 for name, bits in bits_by_layer.items() if bits < 32}
    total = 0
    for pname, p in model.named_parameters():
        if pname in quantized:
            bits, out_channels = quantized[pname]
            total += p.numel() * bits + 32 * (out_channels if granularity == "channel" else 1)
        else:
            total += p.numel() * 32
    total += 32 * sum((compensated or {}).values())
    return total / MIB
