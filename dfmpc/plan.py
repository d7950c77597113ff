"""Which bit width every weight layer gets: the layer-wise mixed-precision plan.

Layers in a pair (see :mod:`dfmpc.graph`): layer l gets the low bit width, layer l+1 the high one
(paper Figure 2). Layers outside every pair -- the stem convolution, shortcut / downsample
convolutions, the classifier, a convolution whose output feeds a residual sum -- follow a
configurable policy:

* ``unpaired="high"`` (default): quantized to the high bit width. Nothing compensates their
  error, so they get the precision that is meant to be accurate on its own.
* ``unpaired="low"``: quantized to the low bit width (an aggressive, uncompensated setting).
* ``unpaired="fp32"``: kept in full precision.

``keep_fp32`` names layers that stay in full precision whatever their role; the tokens
``"first"`` and ``"last"`` stand for the first and last weight layer in execution order.
A pair whose low or high layer is kept in full precision is dropped (nothing to compensate).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .bits import parse_bits
from .errors import DfmpcError
from .graph import LayerPair, find_pairs, pairs_from_names, trace, weight_layer_names

__all__ = ["UNPAIRED_POLICIES", "FP32", "parse_bits", "LayerAssignment", "MixedPrecisionPlan", "plan_layers"]

UNPAIRED_POLICIES = ("high", "low", "fp32")
FP32 = 32


@dataclass(frozen=True)
class LayerAssignment:
    """The plan for one weight layer. ``bits`` is 32 for a layer kept in full precision."""

    name: str
    role: str  # "low" | "high" | "unpaired" | "fp32"
    bits: int
    partner: str | None = None


@dataclass(frozen=True)
class MixedPrecisionPlan:
    layers: tuple[LayerAssignment, ...]
    pairs: tuple[LayerPair, ...]
    low_bits: int
    high_bits: int

    def bits_by_layer(self) -> dict[str, int]:
        return {a.name: a.bits for a in self.layers}


def plan_layers(model: nn.Module, bits="2/6", unpaired: str = "high", keep_fp32=(), pairs=None,
                require_pairs: bool = True) -> MixedPrecisionPlan:
    """Assign a role and a bit width to every Conv2d / Linear layer of ``model``.

    ``pairs``: None to find them from the graph, or pairs given by hand: :class:`LayerPair` objects or
    ``(low, high)`` / ``(low, high, bn)`` module names.
    ``require_pairs``: raise when no pair exists (a compensation method needs one; direct
    quantization does not).
    """
    low_bits, high_bits = parse_bits(bits)
    if unpaired not in UNPAIRED_POLICIES:
        raise DfmpcError(f"unknown unpaired policy {unpaired!r}; use one of {', '.join(UNPAIRED_POLICIES)}")
    if pairs is None:
        gm = trace(model)
        names = weight_layer_names(model, gm)
        pairs = find_pairs(model, gm)
    else:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        by_name = [p for p in pairs if not isinstance(p, LayerPair)]
        pairs = [p for p in pairs if isinstance(p, LayerPair)] + pairs_from_names(model, by_name)
        seen: dict[str, tuple[str, str]] = {}
        for p in pairs:  # a layer in two pairs would be both low and high, or compensated twice
            for layer in (p.low, p.high):
                if layer in seen:
                    raise DfmpcError(f"layer {layer!r} is in two pairs, {seen[layer]} and {(p.low, p.high)}; pairs "
                                     "must not overlap (each layer is low in one pair or high in one pair)")
                seen[layer] = (p.low, p.high)
    if not names:
        raise DfmpcError(f"{type(model).__name__} has no Conv2d or Linear layer; nothing to quantize")
    if isinstance(keep_fp32, str):
        keep_fp32 = (keep_fp32,)
    fp32 = set()
    for name in keep_fp32:
        resolved = {"first": names[0], "last": names[-1]}.get(name, name)
        if resolved not in names:
            raise DfmpcError(f"keep_fp32 names {name!r}, which is not a Conv2d/Linear layer; use 'first', 'last' or a layer name")
        fp32.add(resolved)
    pairs = tuple(p for p in pairs if p.low not in fp32 and p.high not in fp32)
    if not pairs and require_pairs:
        raise DfmpcError(f"{type(model).__name__} has nothing to compensate: no layer -> [BN] -> activation -> layer "
                         "chain was found (residual sums and concatenations break chains); pass pairs=[(low, high)] "
                         "or use method='original'")
    role = {}
    for p in pairs:
        role[p.low] = LayerAssignment(p.low, "low", low_bits, p.high)
        role[p.high] = LayerAssignment(p.high, "high", high_bits, p.low)
    unpaired_bits = {"high": high_bits, "low": low_bits, "fp32": FP32}[unpaired]
    layers = []
    for name in names:
        if name in fp32:
            layers.append(LayerAssignment(name, "fp32", FP32))
        elif name in role:
            layers.append(role[name])
        else:
            layers.append(LayerAssignment(name, "unpaired" if unpaired_bits != FP32 else "fp32", unpaired_bits))
    return MixedPrecisionPlan(layers=tuple(layers), pairs=pairs, low_bits=low_bits, high_bits=high_bits)
