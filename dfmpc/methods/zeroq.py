r"""ZeroQ: weights calibrated on synthetic data distilled from the BatchNorm statistics (Cai, Yao, Dong, Gholami,
Mahoney, Keutzer, "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020).

Not data-free in DF-MPC's strict sense: it synthesises images and runs the network on them.

1. **Distilled data** (their Section 3.1, Eq. 2): :func:`dfmpc.distill.distill_data`, images optimised from
   N(0, 1) noise until the statistics at every BatchNorm input match the BN's running statistics (Adam, lr 0.5).
2. **Clipping** (ours: ZeroQ itself quantizes weights min/max and calibrates only the activation ranges, which
   stay in full precision here): per output channel the uniform clipping scale (3..8 bits) or the ternary
   threshold and scale (2 bits) minimise the layer's output error |(W - Q) X|^2 on the distilled inputs X of that
   layer in the full-precision model. The error is the quadratic d^T H d of the weight error d with H the second
   moment of the input patches (collected exactly, whatever padding the layer applies), plus ``damping`` times
   the mean of diag(H) times |d|^2, so that a layer with fewer distilled rows than weights per channel (the
   classifier) is not fitted to the null space of H. Candidates: the paper's quantizer (scale max|w|, or the
   ternary threshold 0.7 E|w|), a grid of ``grid`` clip ratios in (0, 1] (ternary: fractions of the weights kept,
   the largest |w| first; plus the weight-MSE optimum of :mod:`.omse`), then ``fine`` times finer around the best
   of every channel; each with its clip scale and with the least-squares scale for its codes. The argmin over
   candidates that include the paper's quantizer: never worse than it on the distilled data.
3. **Bias correction** (the empirical variant of Nagel et al. 2019): in one pass of the quantized model over the
   distilled images, in execution order (each layer sees the quantized, corrected layers before it), the
   per-channel mean of each quantized layer's output is set to the full-precision model's on the same images by
   subtracting the difference from its bias (creating one). A layer directly followed by a BatchNorm is skipped
   when the BNs are re-estimated: the new running mean absorbs any per-channel constant exactly.
4. **BatchNorm re-estimation**, in the same pass. ``"relative"`` (default, ours): every BN's running mean moves by
   the change of its input's mean, and its running variance is multiplied by the ratio of its input's variances,
   quantized over full-precision model, both on the distilled images. ``"plain"``: the running mean and (unbiased)
   variance become those of its input in the quantized model, what ``momentum=None`` gives over one batch of all
   images. Plain re-estimation also replaces statistics learned on real data by those of the synthetic images where
   quantization changes nothing: at 8/8 ResNet-20 agrees with full precision on 86 % of 256 CIFAR-10 test images
   after it and on 99.6 % after the relative one, which leaves a model whose quantization changes nothing as it was.

Defaults and where they come from: lr 0.5, eps 1e-6, the N(0, 1) start and one seed-fixed batch: the authors' code.
``steps=100`` instead of their 500 (on a GPU), for the CPU: one thread takes 0.09 s a step for ResNet-20 on 32
images (loss 1120 -> 35.4 after 100 steps, 34.4 after 200) and 0.8 s for EfficientNet-Lite0 on 8 images of 224 x
224 (loss 3.8e5 -> 1.2e5); the whole method then takes 10 s and 90 s. ``images``: 32 (their batch size) for inputs
up to 64 x 64, 8 above (a step's cost grows with the pixels). ``grid=32, fine=8``: the search grid of :mod:`.omse`.
``damping=0.01``: GPTQ's dampening of H (Frantar et al., ICLR 2023). ``input_size=None``: 32 for a CIFAR-style
network (first convolution of stride 1, fewer than 1000 classes), else 224; pass the model's ``spec.input_size``.
Distilled images are kept in :data:`dfmpc.distill.DISTILLED_IMAGES`, keyed by what determines them; a reused batch
adds the seconds its distillation took to ``report.seconds``. ``progress`` shows the distillation's progress bar (stderr).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..clipping import mse_optimal_ternary
from ..distill import (
    DISTILLED_IMAGES,
    batch_norms,
    bn_statistics_loss,
    check_count,
    default_input_size,
    distill_data,
    hooked_pass,
    model_input_shape,
)
from ..errors import DfmpcError
from ..graph import BATCH_NORMS
from ..numerics import check_bit_width
from ..placement import correct_bias
from ..propagation import following_batch_norms
from ..quantizers import GRANULARITIES, QuantizedTensor, check_weight, quantize_weight
from .base import QuantizationMethod

__all__ = ["ZeroQ", "BN_MODES", "InputGram", "collect_statistics", "output_error", "output_error_quantize",
           "clear_distilled_cache", "distill_data", "bn_statistics_loss", "default_input_size"]

BN_MODES = ("relative", "plain", "off")
_CHUNK = 2**24  # patch values computed at once by collect_statistics


class InputGram:
    """The second moment of one layer's input patches, per group g: H_g = sum over rows of p p^T (float64), kept as
    the rows P_g themselves while there are fewer rows than weights per output channel (the classifier)."""

    def __init__(self, groups: int, width: int):
        self.groups, self.width = groups, width
        self.gram: torch.Tensor | None = None  # [G, K, K]
        self.rows: torch.Tensor | None = None  # [G, R, K]
        self.damping = 0.0

    def add(self, patches: torch.Tensor) -> None:
        """``patches``: [G, R, K]."""
        patches = patches.double()
        if self.gram is not None:
            self.gram += patches.transpose(1, 2) @ patches
            return
        self.rows = patches if self.rows is None else torch.cat([self.rows, patches], dim=1)
        if self.rows.shape[1] >= self.width:
            self.gram, self.rows = self.rows.transpose(1, 2) @ self.rows, None

    def diagonal_mean(self) -> torch.Tensor:
        """mean of diag(H_g) per group: [G]."""
        if self.gram is not None:
            return self.gram.diagonal(dim1=1, dim2=2).mean(dim=1)
        return (self.rows**2).sum(dim=(1, 2)) / self.width

    def times(self, m: torch.Tensor) -> torch.Tensor:
        """Every row of ``m`` [O, K] (output channel o in group o // (O / G)) times H_g + damping mean(diag H_g) I."""
        g = self.groups
        mg = m.reshape(g, m.shape[0] // g, m.shape[1])
        out = mg @ self.gram if self.gram is not None else (mg @ self.rows.transpose(1, 2)) @ self.rows
        out = out + (self.damping * self.diagonal_mean())[:, None, None] * mg
        return out.reshape(m.shape)


def _patches(layer: nn.Module, x: torch.Tensor, out_size) -> torch.Tensor:
    """The input rows that meet the layer's weight rows, [G, R, K] (R: images x output positions; K: weights per output
    channel, in the order of ``weight[o].flatten()``). ``out_size``: the spatial size of the layer's output."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, layer.in_features)
    groups, k = layer.groups, layer.weight[0].numel()
    if k == x.shape[1] and groups == 1 and tuple(layer.stride) == (1, 1) and tuple(out_size) == tuple(x.shape[2:]):
        return x.transpose(0, 1).reshape(1, k, -1).transpose(1, 2)  # a 1x1 convolution without padding or stride
    if type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # [N, G K, positions]
    else:  # a subclass may pad inside forward (TensorFlow's "same"): run the layer itself with one-hot kernels
        eye = torch.eye(k, dtype=layer.weight.dtype, device=layer.weight.device)
        params = {"weight": eye.reshape(k, *layer.weight.shape[1:]).repeat(groups, 1, 1, 1)}
        if layer.bias is not None:
            params["bias"] = torch.zeros(groups * k, dtype=layer.weight.dtype, device=layer.weight.device)
        cols = functional_call(layer, params, (x,))
    return cols.reshape(cols.shape[0], groups, k, -1).permute(1, 0, 3, 2).reshape(groups, -1, k)


def collect_statistics(model: nn.Module, names, x: torch.Tensor, grams: bool = True, means: bool = False,
                       bn_inputs: bool = False):
    """One pass of ``model`` over ``x`` (in eval mode, restored after): for every layer in ``names`` its
    :class:`InputGram` (with ``grams``) and the per-channel mean of its output (``means``; float64; only for the
    layers called once: one bias cannot correct two different shifts), and (``bn_inputs``) the per-channel mean and
    variance of every BatchNorm's input (first call)."""
    modules = dict(model.named_modules())
    found, calls, averages, moments, busy = {}, dict.fromkeys(names, 0), {}, {}, set()

    def hook(layer, inputs, output, name):
        if name in busy:  # the one-hot pass of _patches calls the layer again
            return
        busy.add(name)
        try:
            calls[name] += 1
            if means and calls[name] == 1:
                averages[name] = _output_mean(layer, output)
            if grams:
                inp = inputs[0]
                gram = found.setdefault(name, InputGram(getattr(layer, "groups", 1), layer.weight[0].numel()))
                step = max(1, _CHUNK // max(1, inp[:1].numel() * gram.width))
                for i in range(0, inp.shape[0], step):
                    gram.add(_patches(layer, inp[i:i + step], output.shape[2:]))
        finally:
            busy.discard(name)

    def record(bn, inputs, name):  # returns None: a pre-hook's result would replace the input
        if name not in moments:
            moments[name] = _bn_input_moments(inputs[0])

    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in names]
    if bn_inputs:
        handles += [bn.register_forward_pre_hook(lambda m, i, n=n: record(m, i, n))
                    for n, bn in model.named_modules() if isinstance(bn, BATCH_NORMS)]
    hooked_pass(model, x, handles)
    return found, {n: m for n, m in averages.items() if calls[n] == 1}, moments


def _bn_input_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance (float64) of a BatchNorm input [N, C, ...]."""
    dims = [d for d in range(x.dim()) if d != 1]
    return x.double().mean(dim=dims), x.double().var(dim=dims)


def _output_mean(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    channel = out.dim() - 1 if isinstance(layer, nn.Linear) else 1
    return out.double().mean(dim=[d for d in range(out.dim()) if d != channel])


def output_error(w: torch.Tensor, q: QuantizedTensor, gram: InputGram) -> torch.Tensor:
    """d^T H d (+ damping) per output channel, d = w - q.dequantize() (float64): the squared output error."""
    d = (w.double() - q.dequantize().double()).reshape(w.shape[0], -1)
    return (d * gram.times(d)).sum(dim=1)


def output_error_quantize(w: torch.Tensor, bits: int, granularity: str, gram: InputGram, grid: int = 32,
                          fine: int = 8) -> QuantizedTensor:
    """The candidate (module docstring, step 2) with the smallest :func:`output_error`, per output channel (or in
    sum, with granularity "tensor"). Ties keep the paper's quantizer, which is the first candidate."""
    check_weight(w)
    check_bit_width(bits)
    if granularity not in GRANULARITIES:
        raise DfmpcError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    out = w.shape[0]
    weight = w.detach().double().reshape(out, -1)
    rows = weight.reshape(1, -1) if granularity == "tensor" else weight  # where codes and scales are chosen
    total = (lambda v: v.sum(0, keepdim=True)) if granularity == "tensor" else (lambda v: v)
    w_h_w = total((weight * gram.times(weight)).sum(1))
    best = {"err": torch.full((rows.shape[0],), math.inf, dtype=torch.float64)}

    def consider(codes, levels, clip_scale, ratio):
        lh = gram.times(levels.reshape(out, -1))
        num, den = total((weight * lh).sum(1)), total((levels.reshape(out, -1) * lh).sum(1))
        err = w_h_w - 2 * clip_scale * num + clip_scale**2 * den
        fits = (num > 0) & (den > 0)
        ls_err = torch.where(fits, w_h_w - num**2 / torch.where(fits, den, 1.0), err)
        use_ls = ls_err < err
        err, scale = torch.where(use_ls, ls_err, err), torch.where(use_ls, num / torch.where(fits, den, 1.0), clip_scale)
        better = err < best["err"]
        if "codes" not in best:
            best.update(codes=codes.clone(), scale=scale, ratio=torch.broadcast_to(ratio, better.shape).clone())
        best["codes"][better] = codes[better]
        for key, value in (("err", err), ("scale", scale), ("ratio", torch.broadcast_to(ratio, better.shape))):
            best[key] = torch.where(better, value, best[key])

    if bits == 2:
        magnitude = rows.abs()
        ordered = magnitude.sort(dim=1, descending=True).values
        for q in (quantize_weight(w, 2, granularity), mse_optimal_ternary(w, granularity)):
            codes = q.codes.reshape(rows.shape).to(torch.float64)
            consider(codes, codes, q.scale.double().reshape(-1), (codes != 0).double().mean(1))

        def candidate(fraction):  # keep the largest |w| of every row, scale: their mean |w|
            count = (fraction * rows.shape[1]).round().clamp(1, rows.shape[1]).long()
            threshold = ordered.gather(1, (count - 1).reshape(-1, 1).expand(rows.shape[0], 1))
            keep = (magnitude >= threshold) & (magnitude > 0)
            codes = torch.sign(rows) * keep
            mean = (magnitude * keep).sum(1) / keep.sum(1).clamp(min=1)
            consider(codes, codes, mean, fraction)
    else:
        n = 2**bits - 1
        top = rows.abs().amax(dim=1)
        q = quantize_weight(w, bits, granularity)
        codes = q.codes.reshape(rows.shape).to(torch.float64)
        consider(codes, 2 * codes / n - 1, q.scale.double().reshape(-1), torch.tensor(1.0, dtype=torch.float64))

        def candidate(ratio):  # clip at ratio * max|w|: levels and clipping tied to one scale, as Eq. (6)
            scale = top * ratio
            safe = torch.where(scale > 0, scale, 1.0)
            codes = torch.round(n * (rows / (2 * safe[:, None]) + 0.5)).clamp(0, n)
            consider(codes, 2 * codes / n - 1, scale, ratio)

    for j in range(grid, 0, -1):
        candidate(torch.tensor(j / grid, dtype=torch.float64))
    centre = best["ratio"].clone()
    for t in torch.linspace(-1, 1, 2 * fine + 1, dtype=torch.float64):
        candidate((centre + t / grid).clamp(1 / (grid * fine), 1.0))
    scale = best["scale"].to(w.dtype)
    codes = best["codes"].reshape(w.shape).to(torch.int16 if bits > 7 else torch.int8)
    return QuantizedTensor(codes=codes, scale=scale[0] if granularity == "tensor" else scale, bits=bits,
                           granularity=granularity)


def clear_distilled_cache() -> None:
    """Forget the distilled images kept for reuse (:data:`dfmpc.distill.DISTILLED_IMAGES`)."""
    DISTILLED_IMAGES.clear()


class ZeroQ(QuantizationMethod):
    name = "zeroq"

    def __init__(self, bits="2/6", granularity: str = "channel", input_size: int | None = None, images: int | None = None,
                 steps: int = 100, lr: float = 0.5, seed: int = 0, clipping: bool = True, bias_correction: bool = True,
                 bn_reestimation: str = "relative", damping: float = 0.01, grid: int = 32, fine: int = 8,
                 progress: bool = False, **kwargs):
        super().__init__(bits, granularity=granularity, **kwargs)
        if input_size is not None:
            check_count(input_size, "input_size", 1)
        if images is not None:
            check_count(images, "images", 2)
        check_count(steps, "steps", 0)
        check_count(seed, "seed", 0)
        check_count(grid, "grid", 1)
        check_count(fine, "fine", 1)
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise DfmpcError(f"lr must be a positive number, got {lr!r}")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
            raise DfmpcError(f"damping must be a number >= 0, got {damping!r}")
        self.input_size, self.images, self.steps, self.lr, self.seed = input_size, images, steps, float(lr), seed
        if bn_reestimation not in BN_MODES:
            raise DfmpcError(f"unknown bn_reestimation {bn_reestimation!r}; use 'relative' (running statistics moved by "
                             "the change quantization makes on the distilled data), 'plain' (replaced by the quantized "
                             "model's statistics on the distilled data) or 'off'")
        self.clipping, self.bias_correction = bool(clipping), bool(bias_correction)
        self.bn_reestimation = bn_reestimation
        self.damping, self.grid, self.fine, self.progress = float(damping), grid, fine, bool(progress)

    def settings(self) -> dict:
        return {**super().settings(), "input_size": self.input_size, "images": self.images, "steps": self.steps,
                "lr": self.lr, "seed": self.seed, "clipping": self.clipping, "bias_correction": self.bias_correction,
                "bn_reestimation": self.bn_reestimation, "damping": self.damping, "grid": self.grid, "fine": self.fine}

    def distilled(self, model: nn.Module) -> tuple[torch.Tensor, float, bool]:
        """The distilled images for ``model`` with these settings, the seconds their distillation took, and whether
        they came from :data:`dfmpc.distill.DISTILLED_IMAGES`."""
        shape = model_input_shape(model, self.input_size)
        images = self.images or (32 if len(shape) == 1 or shape[1] * shape[2] <= 64 * 64 else 8)
        key = DISTILLED_IMAGES.key(model, shape, images, self.steps, self.lr, self.seed)
        found = DISTILLED_IMAGES.get(key)
        if found is not None:
            return found[0], found[1], True
        start = time.perf_counter()
        x = distill_data(model, shape, images, self.steps, self.lr, self.seed, self.progress)
        seconds = time.perf_counter() - start
        DISTILLED_IMAGES.put(key, x, seconds)
        return x, seconds, False

    def prepare(self, model, plan, run):
        batch_norms(model)
        run.x, seconds, cached = self.distilled(model)
        run.reused_seconds += seconds if cached else 0.0  # a reused distillation still counts
        names = [a.name for a in plan.layers if a.bits < 32]
        run.grams, run.means, run.moments = collect_statistics(
            model, names, run.x, grams=self.clipping, means=self.bias_correction,
            bn_inputs=self.bn_reestimation == "relative")

    def quantize_layer(self, name, weight, bits, run):
        gram = run.grams.pop(name, None)
        if gram is None:  # clipping off, or a layer the forward pass never reached
            return quantize_weight(weight, bits, self.granularity)
        gram.damping = self.damping
        return output_error_quantize(weight, bits, self.granularity, gram, self.grid, self.fine)

    def adjust(self, model, plan, fp_weights, quantized, run):
        """Bias correction and BN re-estimation in one pass over the distilled images (module docstring, 3-4)."""
        reestimate = self.bn_reestimation != "off"
        if not (self.bias_correction or reestimate):
            return {}
        modules = dict(model.named_modules())
        skip = set()
        if reestimate:  # the BN after such a layer absorbs its mean shift
            try:
                skip = set(following_batch_norms(model))
            except DfmpcError:  # an untraceable model: correct every layer (redundant where a BN follows, harmless)
                skip = set()
        means, moments = run.means if self.bias_correction else {}, run.moments
        done, handles = set(), []

        def correct(layer, inputs, output, name):
            if name in done:
                return None
            done.add(name)
            correct_bias(layer, _output_mean(layer, output) - means[name])
            run.folded_into(name, f"{name}.bias")
            return layer.forward(*inputs)  # the output with the corrected bias, for the layers after it

        def set_statistics(bn, inputs, name):
            if name in done:
                return
            done.add(name)
            mean, var = _bn_input_moments(inputs[0])
            if self.bn_reestimation == "relative":  # the change quantization made, on the running statistics
                fp_mean, fp_var = moments[name]
                mean = bn.running_mean.double() + mean - fp_mean
                var = torch.where(fp_var > 0, bn.running_var.double() * var / torch.where(fp_var > 0, fp_var, 1.0),
                                  bn.running_var.double())
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)

        for name in quantized:
            if name in means and name not in skip:
                handles.append(modules[name].register_forward_hook(lambda m, i, o, n=name: correct(m, i, o, n)))
        if reestimate:
            handles += [bn.register_forward_pre_hook(lambda m, i, n=n: set_statistics(m, i, n))
                        for n, bn in model.named_modules() if isinstance(bn, BATCH_NORMS) and
                        (self.bn_reestimation == "plain" or n in moments)]
        hooked_pass(model, run.x, handles)  # within apply's no_grad already
        return {}
