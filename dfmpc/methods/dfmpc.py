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

from ..compensation import BatchNormStats, check_lambdas, solve_compensation
from ..errors import DfmpcError
from ..placement import FOLDS, apply_compensation, input_channel_multiplier
from .base import QuantizationMethod

__all__ = ["FOLDS", "input_channel_multiplier", "apply_compensation", "MixedPrecisionCompensation"]

class MixedPrecisionCompensation(QuantizationMethod):
    name = "dfmpc"
    needs_pairs = True

    def __init__(self, bits="2/6", lambda1: float = 0.5, lambda2: float = 0.0, fold: str = "next", **kwargs):
        super().__init__(bits, **kwargs)
        check_lambdas(lambda1, lambda2)
        if fold not in FOLDS:
            raise DfmpcError(f"unknown fold {fold!r}; use one of {', '.join(FOLDS)}")
        self.lambda1, self.lambda2, self.fold = lambda1, lambda2, fold

    def settings(self) -> dict:
        return {**super().settings(), "lambda1": self.lambda1, "lambda2": self.lambda2, "fold": self.fold}

    def compensation_storage(self, compensation, run):
        # folded into the BN's gamma and beta, c costs no extra storage
        return {} if self.fold == "bn" else super().compensation_storage(compensation, run)

    def adjust(self, model, plan, fp_weights, quantized, run):
        modules = dict(model.named_modules())
        compensation = {}
        for pair in plan.pairs:
            bn = BatchNormStats.from_module(modules[pair.bn]) if pair.bn is not None else None
            c = solve_compensation(fp_weights[pair.low], quantized[pair.low].dequantize(), bn, self.lambda1, self.lambda2)
            apply_compensation(model, pair, c, self.fold)
            if self.fold == "next":
                run.multiplied_into(pair.high, "in")  # Eq. (7): c scales layer l+1's input channels
            else:
                run.folded_into(pair.high, pair.bn)
            compensation[pair.high] = c
        return compensation
