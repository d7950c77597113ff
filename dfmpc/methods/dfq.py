r"""DFQ: data-free quantization through weight equalization and bias correction (Nagel et al. 2019).

Four steps, in the paper's order, on a copy of the model:

1. **Cross-layer equalization** (CLE, their Section 4.1). For two layers joined by a positively
   homogeneous activation (ReLU: f(x / s) = f(x) / s for s > 0) the network output does not change
   when output channel j of the first is divided by s_j and input channel j of the second multiplied
   by s_j. CLE picks s_j = sqrt(r1_j / r2_j), where r1_j is the range (max |.|) of output channel j of
   the first layer with its BatchNorm folded in, and r2_j the range of input channel j of the second;
   both ranges become sqrt(r1_j r2_j), which suits one scale per tensor. Here the pairs are the
   (low, high) pairs of the mixed-precision plan. ReLU6 is not homogeneous. ``relu6="keep"`` (default)
   leaves it alone and skips the pairs through it; ``relu6="relu"`` first replaces every ReLU6 of the
   model by a ReLU, as Nagel et al. do for MobileNetV2, which makes those pairs exact but changes the
   full-precision network: on EfficientNet-Lite0 it drops the full-precision top-1 from 82.3 % to
   62.3 % (300 images of the offline ImageNet subset), so it is not the default. The pairs do not overlap, so one
   pass is the fixed point of their iterative scheme. The first layer's 1/s_j goes into its
   BatchNorm's gamma and beta.
2. **BatchNorm folding**: every BN that directly follows a weight layer is folded into it
   (W <- W gamma / sigma, b <- beta + (b - mu) gamma / sigma) and replaced by an identity, as DFQ
   quantizes the folded weights.
3. **Quantization** of every layer with the bit width of the plan (one scale per tensor by default,
   as in the paper; ``granularity="channel"`` is accepted).
4. **Bias correction** (their Section 4.2, the analytic, data-free variant): the quantized layer
   computes (W + D) (*) x, whose expected output differs from the full-precision one by D E[x].
   E[x] comes from the BatchNorm statistics (:mod:`dfmpc.moments`: the preceding BN's beta and
   gamma through a Gaussian ReLU), and D E[x] is subtracted from the layer's bias. Layers whose input
   comes through a residual sum get E[x] from the same propagation (means of the branches add).

High-bias absorption (their Section 4.1.1) is skipped: it helps activation quantization, and here
only weights are quantized.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import DfmpcError
from ..graph import trace
from ..moments import expected_output_shift, following_batch_norms, input_moments
from .base import QuantizationMethod
from .dfmpc import input_channel_multiplier

__all__ = ["DataFreeQuantization", "equalize_pair", "replace_relu6", "fold_batch_norm", "correct_bias", "input_channel_absmax"]


def input_channel_absmax(layer: nn.Module) -> torch.Tensor:
    """max |W| over the weights that read input channel j, for every input channel j (grouped convs too)."""
    w = layer.weight.detach().abs()
    n_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    out = torch.zeros(n_in, dtype=w.dtype)
    for j in range(n_in):  # small loops: a few hundred channels at most
        onehot = torch.zeros(n_in, dtype=w.dtype)
        onehot[j] = 1
        mask = input_channel_multiplier(layer, onehot) > 0
        out[j] = torch.where(mask, w, torch.zeros_like(w)).amax()
    return out


def _bn_scale(bn: nn.Module) -> torch.Tensor:
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


def equalize_pair(low: nn.Module, bn: nn.Module | None, high: nn.Module) -> torch.Tensor:
    """Cross-layer equalization of one pair in place (exact for a homogeneous activation); returns s."""
    w1 = low.weight.detach()
    folded = w1 * (_bn_scale(bn) if bn is not None else torch.ones(w1.shape[0], dtype=w1.dtype)).reshape(
        -1, *([1] * (w1.dim() - 1)))
    r1 = folded.abs().reshape(w1.shape[0], -1).amax(dim=1)
    r2 = input_channel_absmax(high)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
    if bn is not None:
        if bn.weight is None:
            raise ValueError("a BatchNorm without affine parameters cannot take the equalization scale")
        bn.weight.div_(s)
        bn.bias.div_(s)
    else:
        low.weight.div_(s.reshape(-1, *([1] * (w1.dim() - 1))))
        if low.bias is not None:
            low.bias.div_(s)
    high.weight.mul_(input_channel_multiplier(high, s))
    return s


def replace_relu6(model: nn.Module) -> set[str]:
    """Replace every ReLU6 module (Hardtanh(0, 6)) of ``model`` by a ReLU, in place; return their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Hardtanh) and m.min_val == 0 and m.max_val == 6]
    for n in names:
        _set_module(model, n, nn.ReLU())
    return set(names)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def fold_batch_norm(model: nn.Module, layer_name: str, bn_name: str) -> None:
    """Fold the BN ``bn_name`` that follows ``layer_name`` into that layer's weight and bias; replace it by Identity."""
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    s = _bn_scale(bn)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(s)
    b = layer.bias.detach() if layer.bias is not None else torch.zeros_like(s)
    layer.weight.mul_(s.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    new_bias = beta + (b - bn.running_mean) * s
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.clone())
    else:
        layer.bias.copy_(new_bias)
    _set_module(model, bn_name, nn.Identity())


def correct_bias(layer: nn.Module, shift: torch.Tensor) -> None:
    """Subtract the expected output shift from the layer's bias (creating a bias if it has none)."""
    shift = shift.to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(-shift.clone())
    else:
        layer.bias.sub_(shift)


class DataFreeQuantization(QuantizationMethod):
    name = "dfq"
    description = "DFQ (Nagel et al. 2019): cross-layer equalization, BN folding, bias correction from BN statistics"

    def __init__(self, bits="2/6", equalize: bool = True, bias_correction: bool = True, relu6: str = "keep", **kwargs):
        super().__init__(bits, **kwargs)
        if relu6 not in ("relu", "keep"):
            raise DfmpcError(f"unknown relu6 {relu6!r}; use 'relu' (replace ReLU6 by ReLU, as Nagel et al.) or 'keep'")
        self.equalize, self.bias_correction, self.relu6 = bool(equalize), bool(bias_correction), relu6
        self._moments = {}

    def settings(self) -> dict:
        return {**super().settings(), "equalize": self.equalize, "bias_correction": self.bias_correction,
                "relu6": self.relu6}

    def prepare(self, model, plan):
        replaced = set()
        if self.equalize and self.relu6 == "relu":
            replaced = replace_relu6(model)
        modules = dict(model.named_modules())
        if self.equalize:
            for pair in plan.pairs:
                exact = pair.exact or (replaced and all(isinstance(modules.get(b), (nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU))
                                                         for b in pair.between if b in modules)
                                       and all(b in modules for b in pair.between))
                if exact:
                    equalize_pair(modules[pair.low], modules[pair.bn] if pair.bn else None, modules[pair.high])
        self._moments = input_moments(model) if self.bias_correction else {}
        for layer_name, bn_name in following_batch_norms(model, trace(model)).items():
            fold_batch_norm(model, layer_name, bn_name)

    def adjust(self, model, plan, fp_weights, quantized):
        if not self.bias_correction:
            return {}
        modules = dict(model.named_modules())
        for name, q in quantized.items():
            layer = modules[name]
            shift = expected_output_shift(layer, q.dequantize() - fp_weights[name], self._moments[name])
            correct_bias(layer, shift)
        return {}
