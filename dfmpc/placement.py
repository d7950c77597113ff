"""Where a method puts what it computed: a vector multiplied into a layer's input channels (DF-MPC's c, Eq. 7),
folded into the BatchNorm before them, or an expected output shift taken off a layer's bias (bias correction).
Shared by the methods and by the file format, which rebuilds the same weights."""
from __future__ import annotations

import torch
from torch import nn

from .errors import DfmpcError

__all__ = ["FOLDS", "input_channel_multiplier", "apply_compensation", "correct_bias"]

FOLDS = ("next", "bn")


def input_channel_multiplier(layer: nn.Module, c: torch.Tensor) -> torch.Tensor:
    """The tensor that multiplies ``layer.weight`` so that its input channel j is scaled by c_j.

    For a grouped convolution (groups g, weight [O, C/g, k, k]) input channel j is slot j mod C/g of
    the outputs of group j div (C/g); a depthwise layer therefore scales its filter j as a whole.
    """
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return c.reshape(1, -1).to(w.dtype)
    groups = layer.groups
    out_per_group, in_per_group = w.shape[0] // groups, w.shape[1]
    group_of_output = torch.arange(w.shape[0], device=c.device) // out_per_group
    index = group_of_output[:, None] * in_per_group + torch.arange(in_per_group, device=c.device)[None, :]
    return c.to(w.dtype)[index].reshape(w.shape[0], in_per_group, *([1] * (w.dim() - 2)))


def apply_compensation(model: nn.Module, pair, c: torch.Tensor, fold: str = "next") -> None:
    """Multiply c into the model in place: into layer l+1's input channels, or into the BN after layer l."""
    modules = dict(model.named_modules())
    if fold == "next":
        high = modules[pair.high]
        high.weight.mul_(input_channel_multiplier(high, c.to(high.weight.device)))
    elif fold == "bn":
        if pair.bn is None or not pair.exact:
            raise DfmpcError(f"cannot fold c into a batch norm for pair {pair.low} -> {pair.high}: it needs a BN and only "
                             "positively homogeneous ops (ReLU, pooling) between the layers; use fold='next'")
        bn = modules[pair.bn]
        if bn.weight is None:
            raise DfmpcError(f"batch norm {pair.bn} has no affine parameters to fold c into; use fold='next'")
        bn.weight.mul_(c.to(bn.weight.device))
        bn.bias.mul_(c.to(bn.bias.device))
    else:
        raise DfmpcError(f"unknown fold {fold!r}; use one of {', '.join(FOLDS)}")


def correct_bias(layer: nn.Module, shift: torch.Tensor) -> None:
    """Subtract the expected output shift from the layer's bias (creating a bias if it has none)."""
    shift = shift.to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(-shift.clone())
    else:
        layer.bias.sub_(shift)
