r"""OCS: outlier channel splitting (Zhao, Hu, Dotzel, De Sa, Zhang, "Improving Neural Network Quantization without
Retraining using Outlier Channel Splitting", ICML 2019).

A layer computes y = sum_j W[:, j] (*) x_j over its input channels j. Duplicating input channel j and halving its
weight slice in both copies, W[:, j] / 2 (*) x_j + W[:, j] / 2 (*) x_j, leaves the function as it was (halving is
exact in floating point), but the largest |w| of that slice is halved. OCS repeats this greedily on each layer:
split the input channel holding the current largest |w| (a channel added earlier may be split again), until
``ceil(expand_ratio * in_channels)`` channels were added; then the layer is quantized with the plan's quantizer,
whose scale now comes from the smaller max|w|. The added weights are stored like any other, so the model grows by
about ``expand_ratio`` (the report's size counts them: :meth:`OutlierChannelSplitting.size_model`).

Two identical halves round identically, so a split slice alone sits on a grid twice as coarse as the layer's. The
paper's quantization-aware splitting, which the reference code applies to every weight it reports
(``grid_aware=True`` in ``distiller/quantization/ocs.py`` of github.com/cornell-zhang/dnn-quant-ocs), moves the
two halves a quarter grid step apart (v / 2 - step / 4 and v / 2 + step / 4, on the non-zero entries; their sum
is still v): they then round to neighbouring levels whenever v / 2 is not within a quarter step of a level, and
the split slice keeps the precision of the others (|error| <= step / 2). ``quantization_aware=True`` does that
for the uniform k-bit layers (the grid, Eq. 6, has the scale of the plainly split weight, as in the reference);
the ternary quantizer (2 bits) has no uniform grid, so ternary layers are split plainly.

What is implemented here: :func:`greedy_split_columns` (which input channels, in which order), :func:`split_columns`
(the plain or quantization-aware split), both pure functions on tensors; :class:`SplitConv2d` /
:class:`SplitLinear` (the layer with the expanded weight and a ``source`` buffer holding the input channel every
weight column reads: its forward is ``x.index_select(1, source)`` then the layer's own forward), and
:class:`OutlierChannelSplitting`, which splits every quantized (bits < 32) Conv2d / Linear layer of the plan in
``prepare`` and quantizes it in ``quantize_layer`` (ternary at 2 bits, uniform with scale max|w| above).

Defaults and their sources (none tuned on any test score):

* ``expand_ratio=0.05``: the largest expansion ratio of the paper's Table 1 (ImageNet, weight-only OCS at
  ratios 0.01, 0.02 and 0.05; the authors' script that reproduces Table 1, ``OCS-CNN/scripts/ocs_script.py``,
  runs exactly these; their README's example uses 0.02).
* ``quantization_aware=True``: the reference code (above).
* ``granularity="channel"``: the house default for baselines (the paper uses one grid per tensor; ``"tensor"``
  is accepted). The split still targets the largest |w| of the tensor, as the reference does, so with one scale
  per output channel only the channels whose max sits in a split slice get a finer grid.

Other differences from the reference code, and why:

* The quantization-aware split reuses the channels chosen on the plain split (the reference chooses again on the
  shifted weights, which differ by a quarter step): the layer shape and ``source`` do not depend on the bits.
* Linear layers are split too (the reference wraps only Conv2d); the reference also leaves the first layer (3 input
  channels) unquantized, here the plan decides (``keep_fp32=("first",)`` does the same).
* Grouped and depthwise convolutions (``groups > 1``, e.g. EfficientNet-Lite's depthwise layers) are not split: one
  more input channel in one group would make the groups unequal, which a single convolution cannot hold (the
  reference code does not handle them). They are quantized as they are, like ``per-channel`` does.
* Ties for the largest |w| go to the lowest channel index (the reference's unstable argsort picks any of them).

Channel splitting changes the weight shapes, so a model saved with :func:`dfmpc.save_quantized` is loaded through
:meth:`OutlierChannelSplitting.rebuild`, which makes the same split layers (their shapes depend only on the
architecture, the plan and ``expand_ratio``); the ``source`` buffers come from the file. The indices are not
counted in the report's size (like BatchNorm running statistics, they are buffers; a few integers per layer).
"""
from __future__ import annotations

import heapq
import math

import torch
from torch import nn

from ..errors import DfmpcError
from ..plan import plan_layers
from ..quantizers import QuantizedTensor, quantize_weight, uniform_grid_position
from .base import QuantizationMethod

__all__ = ["OutlierChannelSplitting", "SplitConv2d", "SplitLinear", "DEFAULT_EXPAND_RATIO", "added_channels",
           "greedy_split_columns", "split_columns", "split_input_channels", "grid_codes", "splittable", "split_layer"]

DEFAULT_EXPAND_RATIO = 0.05  # the paper's Table 1, largest ratio (module docstring)


def added_channels(in_channels: int, expand_ratio: float) -> int:
    """ceil(expand_ratio * in_channels), the reference's count; the product is rounded to 9 decimals first so that
    0.07 * 100 (7.000000000000001 in floating point) adds 7 channels, not 8."""
    return math.ceil(round(expand_ratio * in_channels, 9))


def greedy_split_columns(weight: torch.Tensor, count: int) -> list[int]:
    """The columns (input-channel slices, all output channels; dimension 1) that OCS splits, in order.

    Each step takes the column with the largest |w| (ties: the lowest index), halves it and appends a copy, which
    is column ``C + step``; a column made earlier may be chosen again. Halving leaves every column's max |w| an
    exact power-of-two fraction of its original one, so the choice is made on those numbers alone (a heap).
    """
    if weight.dim() < 2 or isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise DfmpcError(f"cannot split {count!r} input channels of a weight of shape {tuple(weight.shape)}")
    channels = weight.shape[1]
    top = weight.detach().abs().transpose(0, 1).reshape(channels, -1).amax(dim=1).tolist()  # max |w| per column
    heap = [(-t, k) for k, t in enumerate(top)]  # the largest |w| first, then the lowest index
    heapq.heapify(heap)
    columns = []
    for step in range(count):
        negative_top, column = heapq.heappop(heap)
        columns.append(column)
        heapq.heappush(heap, (negative_top / 2, column))
        heapq.heappush(heap, (negative_top / 2, channels + step))
    return columns


def split_columns(weight: torch.Tensor, columns: list[int], quarter_step: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` with ``columns`` split in that order; returns (expanded weight, source).

    Split column a with values v: plain (``quarter_step`` None), a and the new column both get v / 2, which is
    exact. Quantization-aware (the reference's ``grid_aware``): a gets v / 2 - q and the new column v / 2 + q, q a
    quarter of the grid step (a scalar, or one per output channel), on the non-zero entries; the two then round to
    neighbouring levels whenever v / 2 is more than q from a level, so their sum is within half a step of v.
    ``source[k]`` is the original input channel column k reads (``source[:C] = 0 .. C-1``).
    """
    channels = weight.shape[1]
    expanded = weight.new_zeros(weight.shape[0], channels + len(columns), *weight.shape[2:])
    expanded[:, :channels] = weight.detach()
    source = list(range(channels))
    q = None if quarter_step is None else quarter_step.to(weight.dtype).reshape(-1, *([1] * (weight.dim() - 2)))
    for step, column in enumerate(columns):
        half = expanded[:, column] / 2
        new = channels + step
        if q is None:
            expanded[:, column], expanded[:, new] = half, half
        else:
            nonzero = half != 0
            expanded[:, column] = torch.where(nonzero, half - q, half)
            expanded[:, new] = torch.where(nonzero, half + q, half)
        source.append(source[column])
    return expanded, torch.tensor(source, dtype=torch.long, device=weight.device)


def split_input_channels(weight: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OCS on one weight: ``count`` greedy plain splits; (expanded weight, source). The layer computes the same."""
    return split_columns(weight, greedy_split_columns(weight, count))


def grid_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform k-bit codes (Eq. 6) of ``weight`` on the grid of ``scale`` (one, or one per output channel) that
    another tensor set, clamped to 0 .. 2^k - 1: the same rounding as :func:`dfmpc.quantizers.uniform_quantize`."""
    n = 2**bits - 1
    codes = torch.round(uniform_grid_position(weight, scale, bits)).clamp(0, n)
    return codes.to(torch.int16 if bits > 7 else torch.int8)


class SplitConv2d(nn.Conv2d):
    """A Conv2d whose weight has extra input channels: input channel k of the weight reads ``x[:, source[k]]``."""

    source: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # super(): nn.Conv2d's forward, or that of the Conv2d subclass the layer was (its padding, say)
        return super().forward(x.index_select(1, self.source))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, split={self.source.numel() - len(set(self.source.tolist()))}"


class SplitLinear(nn.Linear):
    """A Linear whose weight has extra input features: input feature k of the weight reads ``x[..., source[k]]``."""

    source: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(-1, self.source))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, split={self.source.numel() - len(set(self.source.tolist()))}"


_SPLIT_CLASSES: dict[type, type] = {nn.Conv2d: SplitConv2d, nn.Linear: SplitLinear}


def _split_class(cls: type) -> type:
    """SplitConv2d / SplitLinear, or for a subclass of Conv2d / Linear (EfficientNet-Lite's "same"-padding conv) a
    subclass of both, made once, so that the layer keeps its own forward."""
    if cls not in _SPLIT_CLASSES:
        base = SplitConv2d if issubclass(cls, nn.Conv2d) else SplitLinear
        _SPLIT_CLASSES[cls] = type(f"Split{cls.__name__}", (base, cls), {"__module__": __name__})
    return _SPLIT_CLASSES[cls]


def splittable(layer: nn.Module) -> bool:
    """A Conv2d / Linear whose input channels can be split: not grouped (module docstring), not split already."""
    return (isinstance(layer, (nn.Conv2d, nn.Linear)) and not isinstance(layer, (SplitConv2d, SplitLinear))
            and getattr(layer, "groups", 1) == 1)


def split_layer(layer: nn.Module, columns: list[int]) -> nn.Module:
    """``layer`` (a Conv2d / Linear, changed in place) with ``columns`` split plainly: the same function.

    Its class becomes :class:`SplitConv2d` / :class:`SplitLinear` (or the split subclass of its own class), its
    weight the expanded one, ``in_channels`` / ``in_features`` the expanded count, and ``source`` a buffer.
    """
    weight, source = split_columns(layer.weight, columns)
    layer.__class__ = _split_class(type(layer))
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    if isinstance(layer, nn.Conv2d):
        layer.in_channels = weight.shape[1]
    else:
        layer.in_features = weight.shape[1]
    layer.register_buffer("source", source)
    return layer


class OutlierChannelSplitting(QuantizationMethod):
    """OCS (Zhao et al., ICML 2019): every quantized layer gets ``ceil(expand_ratio * in_channels)`` split input
    channels, then the paper's quantizers. ``expand_ratio``: the expansion ratio stated in the comparison table
    (default 0.05, the largest of OCS's Table 1). ``quantization_aware``: split the uniform-grid layers (3 bits and
    up) the reference's grid-aware way (default True, as the reference code); ternary layers are split plainly.
    Grouped convolutions are not split."""

    name = "ocs"

    def __init__(self, bits="2/6", expand_ratio: float = DEFAULT_EXPAND_RATIO, quantization_aware: bool = True,
                 granularity: str = "channel", **kwargs):
        super().__init__(bits, granularity=granularity, **kwargs)
        if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, (int, float)) or not 0 <= expand_ratio <= 1:
            raise DfmpcError(f"expand_ratio must be a number in [0, 1] (the fraction of input channels added per "
                             f"layer; the paper uses 0.01 to 0.05), got {expand_ratio!r}")
        if not isinstance(quantization_aware, bool):
            raise DfmpcError(f"quantization_aware must be True or False, got {quantization_aware!r}")
        self.expand_ratio, self.quantization_aware = float(expand_ratio), quantization_aware

    def settings(self) -> dict:
        out = {**super().settings(), "expand_ratio": self.expand_ratio, "quantization_aware": self.quantization_aware}
        if self.pairs is not None:  # the plan decides which layers are split; rebuild needs the same plan
            out["pairs"] = [[p.low, p.high, p.bn] if hasattr(p, "low") else list(p) for p in self.pairs]
        return out

    def prepare(self, model, plan, run):
        run.splits = self._split(model, plan)  # layer -> (its weight before splitting, the columns split)
        return model

    def rebuild(self, model):
        # the same split layers as prepare: their shapes follow from the architecture and expand_ratio only; the
        # loaded state dict then brings the saved weights and the saved source indices
        self._split(model, plan_layers(model, self.bits, self.unpaired, self.keep_fp32, self.pairs,
                                       require_pairs=self.needs_pairs))
        return model

    def quantize_layer(self, name, weight, bits, run):
        grid = quantize_weight(weight, bits, self.granularity)  # the scale: max |w| after the plain split
        if bits == 2 or not self.quantization_aware or name not in run.splits:
            return grid
        original, columns = run.splits[name]
        quarter_step = grid.scale / (2 * (2**bits - 1))  # levels are 2 scale / (2^k - 1) apart
        shifted, _ = split_columns(original, columns, quarter_step)
        return QuantizedTensor(codes=grid_codes(shifted, grid.scale, bits), scale=grid.scale, bits=bits,
                               granularity=self.granularity)

    def size_model(self, model, qmodel):
        return qmodel  # the added channels are stored: count the expanded weights

    def _split(self, model, plan) -> dict:
        modules, splits = dict(model.named_modules()), {}
        for a in plan.layers:
            layer = modules[a.name]
            count = added_channels(layer.weight.shape[1], self.expand_ratio) if splittable(layer) else 0
            if a.bits < 32 and count > 0:
                columns = greedy_split_columns(layer.weight, count)
                splits[a.name] = (layer.weight.detach().clone(), columns)
                split_layer(layer, columns)
        return splits
