r"""Which layer of a pair takes the low bit width: the paper's order, or a data-free choice by the error of the codes.

DF-MPC quantizes the first layer l of every pair to the low bit width and the second, l+1, to the high one, because
its closed form moves the error of layer l into the input channels of layer l+1 (paper Figure 2). ``dfmpc+`` corrects
every quantized layer in the BatchNorm after it (its gain and its mean), so either order works for it, and the two
layers of a pair do not lose the same at the low bit width: the one whose low-bit codes keep more of its filters
should take it.

The measure (P11 in the book's dfmpc+ chapter) is what is left of a layer's filters once every output channel's gain
is corrected, relative to them: with W_o the filter of output channel o and Q_o its dequantized codes,

    e = sum_o (|W_o|^2 - <Q_o, W_o>^2 / |Q_o|^2) / sum_o |W_o|^2 = sum_o |W_o|^2 (1 - cos^2(Q_o, W_o)) / sum_o |W_o|^2

(a channel without a non-zero code loses all of |W_o|^2). It needs the weights only. The rules (:data:`LOW_LAYERS`):

* ``"first"``: layer l low, the paper's order;
* ``"least-error"``: the layer of the smaller e, where that does not make the model larger: the second layer takes
  the low bit width only if it has at least as many weights as the first;
* ``"least-error-budget"``: the model no larger than in the paper's order in total: every swap of ``"least-error"``,
  then, while the bits those saved last, the swaps that make the model larger, the largest drop of e per bit added
  first;
* ``"least-error-any-size"``: the layer of the smaller e, whatever the size.

A tie keeps the paper's order.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import DfmpcError
from .graph import LayerPair
from .numerics import divide_where_positive
from .plan import MixedPrecisionPlan, plan_layers

__all__ = ["LOW_LAYERS", "relative_error", "choose_low_layers"]

LOW_LAYERS = ("first", "least-error", "least-error-budget", "least-error-any-size")


def relative_error(w: torch.Tensor, w_q: torch.Tensor) -> float:
    """e of the module docstring: the share of the filters' energy that the codes ``w_q`` lose once every output
    channel's gain is corrected (0: the codes are the filters up to a gain per channel; 1: nothing is kept)."""
    w, q = w.detach().double().reshape(len(w), -1), w_q.detach().double().reshape(len(w), -1)
    energy = (w * w).sum(dim=1)
    total = float(energy.sum())
    if total == 0:
        return 0.0
    q_energy = (q * q).sum(dim=1)
    kept = divide_where_positive((q * w).sum(dim=1) ** 2, q_energy, torch.zeros_like(q_energy))
    return float((energy - kept).sum()) / total


def choose_low_layers(model: nn.Module, plan: MixedPrecisionPlan, rule: str, low_error: Callable[[str], float],
                      unpaired: str = "high", keep_fp32=()) -> tuple[MixedPrecisionPlan, list[dict]]:
    """The plan with the roles of every pair's layers set by ``rule``, and what was decided for every pair.

    ``low_error(name)``: e of layer ``name`` quantized to the plan's low bit width. ``unpaired`` and ``keep_fp32``:
    the plan's policies (the layers outside the pairs keep their bits). Each record: the pair in execution order
    (``first``, ``second``), the layer that takes the low bit width (``low``), e of both layers at the low bit width
    and their numbers of weights.
    """
    if rule not in LOW_LAYERS:
        raise DfmpcError(f"unknown low_layer {rule!r}; use one of {', '.join(LOW_LAYERS)}")
    if rule == "first":
        return plan, []
    modules = dict(model.named_modules())
    candidates = []
    for pair in plan.pairs:
        error = {name: low_error(name) for name in (pair.low, pair.high)}
        weights = {name: modules[name].weight.numel() for name in (pair.low, pair.high)}
        candidates.append({"pair": pair, "error": error, "weights": weights,
                           "drop": error[pair.low] - error[pair.high],  # how much e falls if the pair swaps
                           "added": (weights[pair.low] - weights[pair.high]) * (plan.high_bits - plan.low_bits)})
    better = [c for c in candidates if c["drop"] > 0]
    swapped = {id(c["pair"]) for c in better if c["added"] <= 0 or rule == "least-error-any-size"}
    if rule == "least-error-budget":  # the bits the free swaps saved buy the best of the others
        budget = -sum(c["added"] for c in better if c["added"] <= 0)
        for c in sorted((c for c in better if c["added"] > 0), key=lambda c: -c["drop"] / c["added"]):
            if c["added"] <= budget:
                swapped.add(id(c["pair"]))
                budget -= c["added"]
    pairs, record = [], []
    for c in candidates:
        pair, swap = c["pair"], id(c["pair"]) in swapped
        pairs.append(LayerPair(low=pair.high, high=pair.low, bn=None, between=(), exact=False) if swap else pair)
        record.append({"first": pair.low, "second": pair.high, "low": pair.high if swap else pair.low,
                       "relative_error": c["error"], "weights": c["weights"]})
    revised = plan_layers(model, f"{plan.low_bits}/{plan.high_bits}", unpaired, keep_fp32, pairs,
                          require_pairs=False)
    return revised, record
