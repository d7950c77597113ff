r"""dfmpc+: DF-MPC with the output statistics that BatchNorm expects (our data-free improvement).

Uses nothing but the pretrained model: its weights and the BatchNorm running statistics. The book
chapter "dfmpc+: the statistics that BatchNorm expects" derives every step and checks it numerically; in short, for
every quantized layer with full-precision weight W (output channel o: filter W_o) and input x:

0. **Input moments from BN** (:mod:`dfmpc.moments`): the mean mu_i and variance v_i of every input
   channel i of the layer, from the BN statistics upstream through Gaussian ReLU moments.
1. **Codes** that maximise the cosine between the quantized and the full-precision filter, which is
   what is left of the error once the channel's gain is corrected (step 2). Ternary layers with
   kernels: in the metric <a, b>_M = sum_i [(1 - rho) sum_k a_ik b_ik + rho (sum_k a_ik)(sum_k b_ik)]
   that gives the error of a kernel's sum its weight on smooth inputs, with rho fitted per layer from
   the variances recorded by the BN after it (:func:`fit_kernel_correlation`) and the codes found by
   :func:`correlated_ternary`; rho = 0 is the exact per-channel optimum (optimal threshold instead of
   0.7 E|w|). k-bit layers: the clipping scale with the largest cosine (:mod:`dfmpc.methods.omse`), then
   SQuant's flip rounding on that grid (:func:`flip_rounded`; ``rounding="nearest"`` rounds to the nearest
   level instead). Flip rounding was kept by the development half (ResNet-20 and EfficientNet-Lite0, even
   positions of each evaluation set): Lite0 3/6 52.00 -> 70.77 %, 4/6 76.15 -> 80.92 %; ResNet-20 within
   0.4 points at every bit width (3/6 +1.00); the comparison's ablation (``book/data/compare.json``) keeps
   these measurements.
   ``weighting="variance"`` weights every input channel by v_i in these metrics and in step 2.
2. **Unbiased per-channel compensation** c_o. With X_o = W_o (*) x and X^_o = W^_o (*) x, the
   regression of X^_o on X_o has slope a_o = <W^_o, W_o> / |W_o|^2 (inputs independent with equal
   variances, or variances v_i with ``weighting="variance"``): X^_o = a_o X_o + N_o, N_o uncorrelated
   with X_o. DF-MPC's least-squares c = a/(a^2 + r) (r: noise-to-signal ratio) shrinks every channel;
   the layers after it average the noise over pixels but not the shrinkage (:func:`coupled_gain`),
   so we use c_o = 1 / a_o: the compensated channel is the full-precision one plus noise.
   ``gain="least-squares"``, ``"variance"`` (c = |W| / |W^|) and ``"none"`` are kept for comparison.
3. **Mean correction**: E[c_o X^_o - X_o] = sum_{i,k} (c_o W^_o - W_o)_{i,k} mu_i is what the BN after the
   layer would otherwise add to its fixed running mean (the inputs are post-ReLU, mu_i > 0).

Where a BatchNorm directly follows the layer, steps 2 and 3 are folded into it at no storage cost:
gamma_o <- gamma_o c_o and running_mean_o <- (running_mean_o + E[c_o X^_o - X_o]) / c_o (c scales only the centred
output; the BN shift beta_o, which the paper's Theta term protects, is untouched). Elsewhere (a
classifier) the row of the weight is multiplied by c_o (a per-channel scale) and the bias corrected.

Because every correction lives in the BN after its own layer, either layer of a pair can take the low bit width:
``low_layer="least-error"`` gives it to the one whose codes lose less (:mod:`dfmpc.low_layer`); "first" (default)
keeps the paper's order.

With ``granularity="channel"`` (default) every channel has its own scale; ``"tensor"`` keeps one
scale per tensor for the codes, and c still lives in the BN (or, without a BN, is stored as a
32-bit compensation vector like DF-MPC's).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..clipping import asymmetric_codes, mse_optimal_quantize, mse_optimal_ternary
from ..coupling import coupled_gain, coupled_objective  # re-exported: the book's derivation imports them from here
from ..errors import DfmpcError
from ..graph import trace
from ..low_layer import LOW_LAYERS, choose_low_layers, relative_error
from ..moments import expected_output_shift, per_input_channel
from ..numerics import by_row_chunks, divide_where_positive, positive_or_one
from ..placement import correct_bias
from ..propagation import following_batch_norms, input_moments
from ..quantizers import QuantizedTensor, quantize_weight
from ..rounding import flip_rounded  # re-exported: its home is dfmpc.rounding
from .base import QuantizationMethod

__all__ = ["DFMPCPlus", "GAINS", "ROUNDINGS", "GRIDS", "flip_rounded",
           "channel_gain", "compensation_from_gain", "coupled_objective", "coupled_gain",
           "fit_kernel_correlation", "correlated_cosine", "correlated_ternary"]

GAINS = ("unbiased", "least-squares", "variance", "none")
ROUNDINGS = ("nearest", "flip")
GRIDS = ("symmetric", "asymmetric")


def channel_gain(w: torch.Tensor, w_q: torch.Tensor, variances: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per output channel: regression slope a = <W^, W>_v / |W|_v^2 and energies |W|_v^2, |W^|_v^2 (float64).

    ``variances``: the input variance v_i broadcast to the weight's shape; None: all ones (no weighting).
    """
    w, w_q = w.double().reshape(w.shape[0], -1), w_q.double().reshape(w.shape[0], -1)
    if variances is None:  # v = 1 left out of the products: the same sums
        e_fp, e_q, cross = (w * w).sum(dim=1), (w_q * w_q).sum(dim=1), (w * w_q).sum(dim=1)
    else:
        v = torch.broadcast_to(variances.double(), (w.shape[0],) + tuple(variances.shape[1:])).reshape(w.shape[0], -1)
        e_fp, e_q, cross = (v * w * w).sum(dim=1), (v * w_q * w_q).sum(dim=1), (v * w * w_q).sum(dim=1)
    safe = positive_or_one(e_fp)
    slope = torch.where(e_fp > 0, cross / safe, torch.ones_like(e_fp))
    return {"slope": slope, "energy_fp": e_fp, "energy_q": e_q, "cross": cross}


def compensation_from_gain(stats: dict[str, torch.Tensor], gain: str = "unbiased") -> torch.Tensor:
    """The per-channel compensation c for ``gain`` (module docstring, step 2); 1 where it is undefined."""
    if gain not in GAINS:
        raise DfmpcError(f"unknown gain {gain!r}; use one of {', '.join(GAINS)}")
    a, e_fp, e_q, cross = stats["slope"], stats["energy_fp"], stats["energy_q"], stats["cross"]
    one = torch.ones_like(a)
    if gain == "unbiased":
        c = torch.where(a > 1e-6, 1 / torch.where(a > 1e-6, a, one), one)
    elif gain == "least-squares":
        c = torch.where((e_q > 0) & (cross > 0), cross / torch.where(e_q > 0, e_q, one), one)
    elif gain == "variance":
        c = torch.where((e_q > 0) & (cross > 0), torch.sqrt(e_fp / torch.where(e_q > 0, e_q, one)), one)
    else:
        c = one
    return c


def _block_variances(layer: nn.Module, var_in: torch.Tensor) -> torch.Tensor:
    """v of the input channel read by slot i of output channel o, shape (O, I/groups) (float64)."""
    w = layer.weight
    return per_input_channel(layer, var_in.double()).reshape(w.shape[0], -1)


def fit_kernel_correlation(layer: nn.Module, var_in: torch.Tensor, bn_var: torch.Tensor, max_rho: float = 0.9) -> float:
    r"""Data-free estimate of the correlation rho between the taps of one input channel under a kernel.

    Model: the input pixels of one channel seen by a kernel have variance v_i and a common correlation rho,
    different channels are uncorrelated up to a common factor. Then the output variance is

        Var[X_o] = a D_o + b S_o,   D_o = sum_i v_i |W_{o,i}|^2,   S_o = sum_i v_i (sum_k W_{o,i,k})^2,

    with a = 1 - rho and b = rho for uncorrelated channels. The BN after the layer records Var[X_o] for every
    channel o; a least-squares fit of (a, b) over the channels gives rho = b / (a + b) (a absorbs what the
    channels' correlations add), clipped to [0, max_rho].
    """
    w = layer.weight.detach().double()
    if w.dim() < 3 or w[0, 0].numel() == 1:
        return 0.0
    v = _block_variances(layer, var_in)
    d = (w.pow(2).reshape(w.shape[0], w.shape[1], -1).sum(dim=2) * v).sum(dim=1)
    s = (w.reshape(w.shape[0], w.shape[1], -1).sum(dim=2).pow(2) * v).sum(dim=1)
    design = torch.stack([d, s], dim=1)
    if torch.linalg.matrix_rank(design) < 2:
        return 0.0
    a, b = torch.linalg.lstsq(design, bn_var.double()[:, None]).solution[:, 0].tolist()
    if b <= 0:
        return 0.0
    if a <= 0:
        return max_rho
    return float(min(b / (a + b), max_rho))


def correlated_cosine(w: torch.Tensor, w_q: torch.Tensor, rho: float, variances: torch.Tensor | None = None) -> torch.Tensor:
    """Per output channel: <w_q, w>_M / (|w_q|_M |w|_M) in the metric
    <a, b>_M = sum_i v_i [(1 - rho) sum_k a_ik b_ik + rho (sum_k a_ik)(sum_k b_ik)]."""
    o, i = w.shape[0], w.shape[1]
    a, b = w.double().reshape(o, i, -1), w_q.double().reshape(o, i, -1)
    v = torch.ones(o, i, dtype=torch.float64) if variances is None else variances.double().reshape(o, i)

    def inner(x, y):
        return (v * ((1 - rho) * (x * y).sum(dim=2) + rho * x.sum(dim=2) * y.sum(dim=2))).sum(dim=1)

    den = torch.sqrt(inner(a, a) * inner(b, b))
    return divide_where_positive(inner(a, b), den, torch.zeros_like(den))


def _best_block_codes(w: torch.Tensor, alpha: torch.Tensor, rho: float) -> torch.Tensor:
    """For every (o, i) block of K weights: codes q in {-1, 0, 1}^K minimising
    (1 - rho) sum_k (w_k - alpha q_k)^2 + rho (sum_k w_k - alpha sum_k q_k)^2, exactly.

    For a fixed code sum the first term is separable and convex in every q_k, so the best codes for the
    sum -K + j take the j cheapest of the 2K unit steps (-1 -> 0 and 0 -> +1 of every entry; convexity puts
    an entry's first step before its second). All sums are tried at once after one sort. The blocks are
    independent, so they are solved a chunk of output channels at a time (:func:`dfmpc.numerics.by_row_chunks`).
    """
    # a row's search holds its 2K unit steps per block: twice its weights
    return by_row_chunks(lambda w_rows, alpha_rows: _best_block_codes_of(w_rows, alpha_rows, rho), w, alpha,
                         columns=2 * w[0].numel())


def _best_block_codes_of(w: torch.Tensor, alpha: torch.Tensor, rho: float) -> torch.Tensor:
    o, i, k = w.shape
    a = alpha[:, None, None]
    cost = [(1 - rho) * (w - a * q) ** 2 for q in (-1.0, 0.0, 1.0)]
    steps = torch.cat([cost[1] - cost[0], cost[2] - cost[1]], dim=2)  # (O, I, 2K)
    ordered, order = torch.sort(steps, dim=2, stable=True)
    cum = torch.cat([torch.zeros(o, i, 1, dtype=w.dtype), torch.cumsum(ordered, dim=2)], dim=2)
    sums = torch.arange(2 * k + 1, dtype=w.dtype) - k  # code sum for j = 0 .. 2K steps taken
    total = cost[0].sum(dim=2, keepdim=True) + cum + rho * (w.sum(dim=2, keepdim=True) - a * sums) ** 2
    j = total.argmin(dim=2, keepdim=True)
    taken = torch.arange(2 * k)[None, None, :] < j  # the first j steps in sorted order are taken
    count = torch.zeros(o, i, 2 * k, dtype=w.dtype).scatter(2, order, taken.to(w.dtype))
    return -1 + count[:, :, :k] + count[:, :, k:]


def correlated_ternary(w: torch.Tensor, rho: float, variances: torch.Tensor | None = None, iterations: int = 30,
                       restarts=(1.0, 0.7, 1.4)):
    r"""Ternary codes (one scale per output channel) that maximise :func:`correlated_cosine`.

    rho = 0 is the exact per-channel optimum of :func:`dfmpc.methods.omse.mse_optimal_ternary`, the start.
    For rho > 0 the error of the kernel sums counts too (smooth inputs see mostly the sum of a kernel).
    Maximising the cosine is minimising E(alpha, q) = |w - alpha q|_M^2 over alpha and q, which we do by
    alternating two exact steps, each of which cannot increase E: the best codes of every (channel, input
    channel) block for the current alpha (:func:`_best_block_codes`; the blocks are independent because
    the metric has no terms across input channels), and the least-squares alpha = <q, w>_M / |q|_M^2 for
    the codes; until the codes stop changing (``iterations`` at most). The alternation ends in a local
    optimum, so it is started from the rho = 0 scale times each of ``restarts`` and the channel keeps the
    codes with the largest cosine (never below that of the start).
    """
    if not 0 <= rho < 1:
        raise DfmpcError(f"rho must be in [0, 1), got {rho}")
    o, i = w.shape[0], w.shape[1]
    wd = w.detach().double().reshape(o, i, -1)
    k = wd.shape[2]
    v = torch.ones(o, i, dtype=torch.float64) if variances is None else variances.double().reshape(o, i)
    start = mse_optimal_ternary(w, "channel", None if variances is None else
                                v[:, :, None].expand(o, i, k).reshape(w.shape))
    q = start.codes.double().reshape(o, i, k)

    def inner(x, y, v=v):
        return (v * ((1 - rho) * (x * y).sum(dim=2) + rho * x.sum(dim=2) * y.sum(dim=2))).sum(dim=1)

    def ls_scale(codes, target=wd, v=v):
        n = inner(codes, codes, v)
        return torch.where(n > 0, inner(codes, target, v) / torch.where(n > 0, n, torch.ones_like(n)),
                           torch.zeros_like(n))

    alpha = ls_scale(q)
    if rho > 0 and k > 1:
        best_q, best_cos = q, inner(q, wd) ** 2 / inner(q, q).clamp(min=1e-300)
        for restart in restarts:  # the alternation finds a local optimum; a few starting scales, keep the best
            q_r, alpha_r = q.clone(), alpha * restart
            # Channels are independent (one alpha each, blocks within a channel), so a channel at a fixed point
            # (its alpha unchanged, or its codes unchanged once alpha is their least-squares scale) leaves the
            # alternation; the others go on. Same result as iterating every channel until all stop, at a fraction of the cost.
            active = torch.arange(o)
            for step in range(iterations):
                w_a, a_a, q_a = wd[active], alpha_r[active], q_r[active]
                new = torch.where((a_a > 0)[:, None, None], _best_block_codes(w_a, a_a, rho), q_a)  # zero stays zero
                codes_fixed = (new == q_a).flatten(1).all(dim=1)
                new_alpha = ls_scale(new, w_a, v[active])
                q_r[active], alpha_r[active] = new, new_alpha
                moving = ~((new_alpha == a_a) | (codes_fixed & (restart == 1.0 or step > 0)))
                active = active[moving]
                if active.numel() == 0:
                    break
            cos = torch.where(inner(q_r, wd) > 0, inner(q_r, wd) ** 2 / inner(q_r, q_r).clamp(min=1e-300),
                              torch.zeros_like(alpha))
            better = cos > best_cos * (1 + 1e-12)
            best_q, best_cos = torch.where(better[:, None, None], q_r, best_q), torch.where(better, cos, best_cos)
        q = best_q
        alpha = ls_scale(q)
    alpha = alpha.clamp(min=0)
    return QuantizedTensor(codes=q.reshape(w.shape).to(torch.int8), scale=alpha.to(w.dtype), bits=2, granularity="channel")


class DFMPCPlus(QuantizationMethod):
    name = "dfmpc+"

    def __init__(self, bits="2/6", granularity: str = "channel", gain: str = "unbiased", mean_correction: bool = True,
                 weighting: str = "none", correlation="fit", clipping: str = "optimal", rounding: str = "flip",
                 max_rho: float = 0.9, restarts=(1.0, 0.7, 1.4), grid: str = "symmetric", low_layer: str = "first",
                 **kwargs):
        super().__init__(bits, granularity=granularity, **kwargs)
        if grid not in GRIDS:
            raise DfmpcError(f"unknown grid {grid!r}; use one of {', '.join(GRIDS)}")
        if grid == "asymmetric" and granularity != "channel":
            raise DfmpcError("grid='asymmetric' has one step and zero point per output channel; use it with "
                             "granularity='channel'")
        if gain not in GAINS:
            raise DfmpcError(f"unknown gain {gain!r}; use one of {', '.join(GAINS)}")
        if low_layer not in LOW_LAYERS:
            raise DfmpcError(f"unknown low_layer {low_layer!r}; use one of {', '.join(LOW_LAYERS)}")
        if weighting not in ("variance", "none"):
            raise DfmpcError(f"unknown weighting {weighting!r}; use 'variance' or 'none'")
        if correlation != "fit" and not (isinstance(correlation, (int, float)) and not isinstance(correlation, bool)
                                         and 0 <= correlation < 1):
            raise DfmpcError(f"correlation must be 'fit' or a number in [0, 1), got {correlation!r}")
        if clipping not in ("optimal", "none"):
            raise DfmpcError(f"unknown clipping {clipping!r}; use 'optimal' or 'none'")
        if rounding not in ROUNDINGS:
            raise DfmpcError(f"unknown rounding {rounding!r}; use one of {', '.join(ROUNDINGS)}")
        if isinstance(max_rho, bool) or not isinstance(max_rho, (int, float)) or not 0 <= max_rho < 1:
            raise DfmpcError(f"max_rho must be a number in [0, 1), got {max_rho!r}")
        try:
            restarts = tuple(float(r) for r in restarts)
        except (TypeError, ValueError):
            raise DfmpcError(f"restarts must be a list of positive numbers, got {restarts!r}") from None
        if not restarts or not all(math.isfinite(r) and r > 0 for r in restarts):
            raise DfmpcError(f"restarts must be a non-empty list of positive numbers, got {list(restarts)}")
        self.gain, self.mean_correction, self.weighting, self.correlation = gain, bool(mean_correction), weighting, correlation
        self.clipping, self.rounding, self.max_rho, self.restarts = clipping, rounding, float(max_rho), restarts
        self.grid, self.low_layer = grid, low_layer

    def settings(self) -> dict:
        return {**super().settings(), "gain": self.gain, "mean_correction": self.mean_correction,
                "weighting": self.weighting, "correlation": self.correlation, "clipping": self.clipping,
                "rounding": self.rounding, "max_rho": self.max_rho, "restarts": list(self.restarts), "grid": self.grid,
                "low_layer": self.low_layer}

    def revise_plan(self, model, plan, run):
        """``low_layer`` other than "first": every pair's low layer chosen by :func:`dfmpc.low_layer.choose_low_layers`
        from the relative error of both layers' codes at the low bit width (the codes this method gives them)."""
        if self.low_layer == "first":
            return plan
        self._read_statistics(model, run)
        run.rho, codes = {}, {}

        def low_error(name):
            w = run.modules[name].weight.detach()
            run.rho[name] = self._kernel_correlation(name, plan.low_bits, run) or 0.0  # 0: no correlated codes
            codes[name] = self.quantize_layer(name, w, plan.low_bits, run)
            return relative_error(w, codes[name].dequantize())

        plan, record = choose_low_layers(model, plan, self.low_layer, low_error, self.unpaired, self.keep_fp32)
        run.low_codes = {r["low"]: codes[r["low"]] for r in record}  # quantize_layer's, for the same weights: reused
        for r in record:  # what was chosen and why, for the report (prepare adds the rho of the chosen low layers)
            for name in (r["first"], r["second"]):
                run.details[name] = {"relative_error_at_low_bits": r["relative_error"][name], "low": name == r["low"]}
        return plan

    def _kernel_correlation(self, name: str, bits: int, run) -> float | None:
        """rho of the correlated ternary codes of layer ``name`` at ``bits`` (None where they do not apply)."""
        layer = run.modules[name]
        if bits != 2 or self.granularity != "channel" or not isinstance(layer, nn.Conv2d) or layer.weight[0, 0].numel() == 1:
            return None
        if self.correlation != "fit":
            return float(self.correlation)
        bn = run.modules[run.bn[name]] if name in run.bn else None
        return 0.0 if bn is None else fit_kernel_correlation(layer, run.moments[name].var, bn.running_var, self.max_rho)

    def _read_statistics(self, model, run) -> None:
        """Once per call: every layer's input moments from the BN statistics, the BN after it, the modules by name."""
        if not hasattr(run, "moments"):
            run.moments = input_moments(model)
            run.bn = following_batch_norms(model, trace(model))
            run.modules = dict(model.named_modules())

    def prepare(self, model, plan, run):
        self._read_statistics(model, run)
        run.rho = {}  # ternary layer -> the kernel correlation of its correlated codes (revise_plan's are dropped)
        for a in plan.layers:
            rho = self._kernel_correlation(a.name, a.bits, run)
            if rho is not None:
                run.rho[a.name] = rho
                run.details.setdefault(a.name, {})["rho"] = rho

    def _variances(self, name: str, run) -> torch.Tensor | None:
        """Every weight's input variance, broadcast to the weight's shape; None (all ones) without weighting."""
        layer = run.modules[name]
        if self.weighting == "none":
            return None
        return torch.broadcast_to(per_input_channel(layer, run.moments[name].var.double()), layer.weight.shape)

    def quantize_layer(self, name, weight, bits, run):
        if name in getattr(run, "low_codes", {}) and run.low_codes[name].bits == bits:
            return run.low_codes.pop(name)  # computed by revise_plan: same weights, bits and rho, same codes
        rho = run.rho.get(name, 0.0)
        if rho > 0:
            v = None if self.weighting == "none" else _block_variances(run.modules[name], run.moments[name].var)
            return correlated_ternary(weight, rho, v, restarts=self.restarts)
        if bits > 2 and self.grid == "asymmetric":
            return asymmetric_codes(weight, bits, self._variances(name, run), search=self.clipping != "none",
                                    flip=self.rounding == "flip")
        if bits > 2 and self.clipping == "none":
            q = quantize_weight(weight, bits, self.granularity)
        else:
            q = mse_optimal_quantize(weight, bits, self.granularity, self._variances(name, run), criterion="cosine")
        return flip_rounded(weight, q) if bits > 2 and self.rounding == "flip" else q

    def compensation_storage(self, compensation, run):
        return dict(run.stored)

    def adjust(self, model, plan, fp_weights, quantized, run):
        modules = dict(model.named_modules())
        compensation = {}
        for name, q in quantized.items():
            layer, w = modules[name], fp_weights[name]
            w_q = q.dequantize()
            c = compensation_from_gain(channel_gain(w, w_q, self._variances(name, run)), self.gain)
            shape = (-1,) + (1,) * (w.dim() - 1)
            shift = (expected_output_shift(layer, c.reshape(shape) * w_q.double() - w.double(), run.moments[name])
                     if self.mean_correction else torch.zeros_like(c))
            bn_name = run.bn.get(name)
            if bn_name is not None:
                bn = modules[bn_name]
                run.folded_into(name, bn_name)
                # We want BN_fp(c X^ - shift) = gamma c (X^ - (mu + shift) / c) / sqrt(var + eps) + beta.
                bn.running_mean.copy_(((bn.running_mean.double() + shift) / c).to(bn.running_mean.dtype))
                if bn.weight is not None:
                    bn.weight.mul_(c.to(bn.weight.dtype))
                else:
                    bn.running_var.copy_(((bn.running_var.double() + bn.eps) / c**2 - bn.eps).clamp(min=0)
                                         .to(bn.running_var.dtype))
            else:
                layer.weight.mul_(c.reshape(shape).to(layer.weight.dtype))
                run.multiplied_into(name, "out")
                if self.mean_correction:
                    correct_bias(layer, shift)
                    run.folded_into(name, f"{name}.bias")
                if self.granularity == "tensor" and self.gain != "none":
                    run.stored[name] = c.numel()
            compensation[name] = c.to(w.dtype)
        return compensation
