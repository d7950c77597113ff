"""DF-MPC: data-free mixed-precision compensation (Chen et al. 2023), with our closed form.

For every (low-bit layer l, high-bit layer l+1) pair the coefficients c of Eq. (7) come from
:func:`dfmpc.compensation.solve_compensation` and are multiplied into the input channels of the
quantized layer l+1: W~_{:,j} = c_j * Q_k(W_{:,j}) (Eq. 7). ``fold="bn"`` instead multiplies them
into the gamma and beta of the BatchNorm after layer l, which gives the same network output when
everything between the layers is positively homogeneous (ReLU, pooling; paper Figure 1: "multiplying
the compensation coefficient with respect to the input channel of the high-bitwidth filter ... is
equivalent to multiplying [it] with respect to the output channel of the low-bitwidth filter").
"""
from __future__ import annotations

import torch
from torch import nn

from ..compensation import BatchNormStats, check_lambdas, solve_compensation
from ..errors import DfmpcError
from .base import QuantizationMethod

__all__ = ["FOLDS", "input_channel_multiplier", "apply_compensation", "MixedPrecisionCompensation"]

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


class MixedPrecisionCompensation(QuantizationMethod):
    name = "dfmpc"
    description = "DF-MPC: closed-form per-channel compensation of each low-bit layer by the next high-bit layer (Eq. 7-11)"
    needs_pairs = True

    def __init__(self, bits="2/6", lambda1: float = 0.5, lambda2: float = 0.0, fold: str = "next", **kwargs):
        super().__init__(bits, **kwargs)
        check_lambdas(lambda1, lambda2)
        if fold not in FOLDS:
            raise DfmpcError(f"unknown fold {fold!r}; use one of {', '.join(FOLDS)}")
        self.lambda1, self.lambda2, self.fold = lambda1, lambda2, fold

    def settings(self) -> dict:
        return {**super().settings(), "lambda1": self.lambda1, "lambda2": self.lambda2, "fold": self.fold}

    def compensation_storage(self, compensation):
        # folded into the BN's gamma and beta, c costs no extra storage
        return {} if self.fold == "bn" else super().compensation_storage(compensation)

    def adjust(self, model, plan, fp_weights, quantized):
        modules = dict(model.named_modules())
        compensation = {}
        for pair in plan.pairs:
            bn = BatchNormStats.from_module(modules[pair.bn]) if pair.bn is not None else None
            c = solve_compensation(fp_weights[pair.low], quantized[pair.low].dequantize(), bn, self.lambda1, self.lambda2)
            apply_compensation(model, pair, c, self.fold)
            compensation[pair.high] = c
        return compensation
