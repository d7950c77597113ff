"""Data-free activation quantization: per-tensor asymmetric ranges from the BatchNorm statistics.

DF-MPC quantizes weights only. :func:`quantize_activations` adds what an inference engine also quantizes: the
activations. It traces the (weight-quantized) model with ``torch.fx`` and inserts an
:class:`ActivationQuantizer` (per-tensor asymmetric, unsigned codes ``0 .. 2^bits - 1``, zero exactly
representable, as onnxruntime's and TensorRT's QDQ models expect) after

* the network's input (the first layer's input), with a fixed range: the normalization applied to pixels in
  [0, 1] (``input_range``);
* every tensor a Conv2d / Linear layer reads (a weight layer's input), and every BatchNorm or weight-layer output
  that enters a residual sum (the engines quantize the inputs of an ``Add``);

and nothing after the classifier: its logits stay in fp32, as the engines leave them.

Ranges, without data:

* ``rule="dfq"`` (Nagel et al. 2019, DFQ, Section 4.1): a BatchNorm's output channel c is taken as
  N(beta_c, gamma_c^2), its range ``beta_c +- n |gamma_c|`` (n = 6 as in DFQ), clipped by the activation that
  follows (ReLU: at 0, ReLU6 / Hardtanh: at its bounds); pooling, flatten and dropout keep the range. The tensor's
  range is the union over its channels. A tensor that does not come from a BatchNorm (a ReLU after a residual
  sum) takes the same rule on the per-channel moments that :func:`dfmpc.propagation.input_moments` carries through
  the graph: ``mean_c +- n std_c``, clipped. Where the propagation does not model the graph (OCS's split
  channels), interval arithmetic instead: a sum's range is the sum of its branches' ranges (wider).
* ``rule="mse"``: the same per-channel Gaussians, but the range is the one, among ``n`` in 1.5 .. 6, whose
  expected squared quantization error (clipping included) over those Gaussians is smallest, computed on 64
  fixed quantiles per channel; deterministic and data-free. It matters at 4 bits, where n = 6 wastes most
  levels on tails.

A method that calibrates on its own synthetic images (ZeroQ) may instead pass ``calibration=`` images: the
ranges are then the minimum and maximum each tensor takes on them, as in the ZeroQ paper.
"""
from __future__ import annotations

import copy
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import DfmpcError
from .graph import BATCH_NORMS, WEIGHT_LAYERS, trace

__all__ = ["ACT_RULES", "DFQ_N", "IMAGENET_INPUT_RANGE", "ActivationQuantizer", "check_act_bits", "input_range_of",
           "quantize_activations", "activation_table"]

ACT_RULES = ("dfq", "mse")
DFQ_N = 6.0  # DFQ's beta +- 6 gamma
# pixels in [0, 1] normalized by the ImageNet mean / std (the CIFAR models here use the same normalization)
IMAGENET_INPUT_RANGE = (min((0 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
                        max((1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))))
_ADD = {operator.add, operator.iadd, torch.add}
_KEEP_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout,
                 nn.Identity)
_KEEP_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.dropout, torch.max_pool2d}
_KEEP_METHODS = {"view", "reshape", "flatten", "contiguous"}


class ActivationQuantizer(nn.Module):
    """Fake quantization of one tensor: per-tensor asymmetric, ``bits`` bits, codes ``0 .. 2^bits - 1``.

    ``forward`` is what an engine's QuantizeLinear -> DequantizeLinear pair computes (round half to even,
    saturation). Below 8 bits the tensor is first clipped to the representable range, then quantized with uint8
    codes, which then lie in ``0 .. 2^bits - 1``: the same numbers, and an ONNX model any opset can carry.
    """

    def __init__(self, lo: float, hi: float, bits: int):
        super().__init__()
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)  # zero must be exactly representable
        levels = 2**bits - 1
        scale = max(hi - lo, 1e-8) / levels
        scale = float(torch.tensor(scale, dtype=torch.float32))  # the float32 an ONNX model stores
        self.bits, self.scale = bits, scale
        self.zero_point = int(min(max(round(-lo / scale), 0), levels))
        self.min_value, self.max_value = (0 - self.zero_point) * scale, (levels - self.zero_point) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits < 8:
            x = torch.clamp(x, self.min_value, self.max_value)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale:.6g}, zero_point={self.zero_point}"


def check_act_bits(act_bits) -> int:
    """``act_bits`` as an int from 2 to 8, or a one-line error."""
    if isinstance(act_bits, bool) or not isinstance(act_bits, int) or not 2 <= act_bits <= 8:
        raise DfmpcError(f"act_bits must be an integer from 2 to 8 (e.g. 8 or 4), got {act_bits!r}")
    return act_bits


def input_range_of(mean, std) -> tuple[float, float]:
    """The range of pixels in [0, 1] after ``Normalize(mean, std)``: the fixed range of the network's input."""
    return (min((0 - m) / s for m, s in zip(mean, std)), max((1 - m) / s for m, s in zip(mean, std)))


def _activation_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """(lo, hi) clip of an activation node (ReLU, ReLU6, Hardtanh), None if ``node`` is not one."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.ReLU6):
            return 0.0, 6.0
        if isinstance(mod, nn.Hardtanh) and isinstance(mod.min_val, float) and isinstance(mod.max_val, float):
            return mod.min_val, mod.max_val
        if isinstance(mod, nn.ReLU):
            return 0.0, math.inf
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu):
            return 0.0, math.inf
        if node.target is F.relu6:
            return 0.0, 6.0
        if node.target is F.hardtanh:
            return float(node.kwargs.get("min_val", -1.0)), float(node.kwargs.get("max_val", 1.0))
    if node.op == "call_method" and node.target == "relu":
        return 0.0, math.inf
    return None


def _keeps_range(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _KEEP_MODULES)
    if node.op == "call_function":
        return node.target in _KEEP_FUNCTIONS
    return node.op == "call_method" and node.target in _KEEP_METHODS


def _interval(gm: fx.GraphModule, node: fx.Node, placeholder_range, n: float = DFQ_N) -> tuple[float, float]:
    """Interval arithmetic over the graph: a BatchNorm's beta +- n gamma, a sum of branches the sum of their
    intervals, clipping activations and range-keeping ops as above, padding and slicing add 0."""
    if node.op == "placeholder":
        return placeholder_range
    bounds = _activation_bounds(gm, node)
    if bounds is not None or _keeps_range(gm, node):
        lo, hi = _interval(gm, node.args[0], placeholder_range, n)
        return (lo, hi) if bounds is None else (min(max(lo, bounds[0]), bounds[1]), max(min(hi, bounds[1]), bounds[0]))
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), BATCH_NORMS):
        bn = gm.get_submodule(node.target)
        return _range(bn.bias.detach().double(), bn.weight.detach().double().abs(), (-math.inf, math.inf), n)
    if node.op == "call_function" and node.target in _ADD:
        parts = [_interval(gm, a, placeholder_range, n) if isinstance(a, fx.Node) else (float(a), float(a))
                 for a in node.args]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActivationQuantizer):
        quantizer = gm.get_submodule(node.target)
        return quantizer.min_value, quantizer.max_value
    if node.op == "call_function" and node.target in (F.pad, operator.getitem):
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node):
            lo, hi = _interval(gm, source, placeholder_range, n)
            return min(lo, 0.0), max(hi, 0.0)
    raise DfmpcError(f"no data-free range for the tensor {node.name!r} (a {node.op} {node.target!r}); "
                     "pass calibration= images or keep activations in fp32")


def _gaussians(gm: fx.GraphModule, node: fx.Node, moments: dict, reader: str | None, placeholder_range):
    """Per-channel (mean, std) of the tensor behind ``node`` and its clip (lo, hi); the source ("bn" or "moments")."""
    lo, hi, cur = -math.inf, math.inf, node
    while True:
        bounds = _activation_bounds(gm, cur)
        if bounds is not None:
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        elif not _keeps_range(gm, cur):
            break
        cur = cur.args[0]
    if cur.op == "call_module" and isinstance(gm.get_submodule(cur.target), BATCH_NORMS):
        bn = gm.get_submodule(cur.target)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(bn.num_features, dtype=torch.float64)
        gamma = bn.weight.detach().double().abs() if bn.weight is not None else \
            (bn.running_var.double() + bn.eps).sqrt()
        return beta, gamma, (lo, hi), "bn"
    if reader is None or reader not in moments:  # no propagated moments (a graph propagation does not model)
        lo_sum, hi_sum = _interval(gm, cur, placeholder_range)
        return None, None, (max(lo, lo_sum), min(hi, hi_sum)), "interval"
    m = moments[reader]
    # moments of the tensor itself (already clipped): its own mean and std, clipped again
    return m.mean.double(), m.var.double().clamp_min(0).sqrt(), (lo, hi), "moments"


_QUANTILES = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(64, dtype=torch.float64) + 0.5) / 64)


def _fake_quant(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    q = ActivationQuantizer(lo, hi, bits)
    return (torch.round(x / q.scale) + q.zero_point).clamp(0, 2**bits - 1).sub(q.zero_point).mul(q.scale)


def _range(mean, std, clip, n: float) -> tuple[float, float]:
    lo = (mean - n * std).clamp(clip[0], clip[1]).min().item()
    hi = (mean + n * std).clamp(clip[0], clip[1]).max().item()
    return lo, hi


def _mse_range(mean, std, clip, bits: int) -> tuple[float, float, float]:
    """The range (and its n) minimising the expected squared error over the per-channel Gaussians, clipped."""
    x = (mean[:, None] + std[:, None] * _QUANTILES[None, :]).clamp(clip[0], clip[1])
    best = None
    for n in torch.linspace(1.5, DFQ_N, 19).tolist():
        lo, hi = _range(mean, std, clip, n)
        err = (_fake_quant(x, lo, hi, bits) - x).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, lo, hi, n)
    return best[1], best[2], best[3]


def _points(gm: fx.GraphModule) -> dict[fx.Node, str | None]:
    """Nodes whose output is quantized -> the name of a weight layer that reads it (None: an Add input only)."""
    points: dict[fx.Node, str | None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), WEIGHT_LAYERS):
            points.setdefault(node.args[0], node.target)
        if node.op == "call_function" and node.target in _ADD:
            for arg in node.args:
                if isinstance(arg, fx.Node) and arg.op == "call_module" and \
                        isinstance(gm.get_submodule(arg.target), BATCH_NORMS + WEIGHT_LAYERS):
                    points.setdefault(arg, None)
    return points


def quantize_activations(model: nn.Module, act_bits: int, input_range=IMAGENET_INPUT_RANGE, rule: str = "dfq",
                         n: float = DFQ_N, calibration: torch.Tensor | None = None, codes: dict | None = None):
    """A copy of ``model`` (a ``torch.fx.GraphModule``) with its activations fake-quantized; and one row per quantized
    tensor (name, source of its range, lo, hi, scale, zero point). ``model`` itself is not modified.

    The copy computes what the engine computes (:mod:`dfmpc.folding`): BatchNorms folded into the layers before
    them, and where ``codes`` (layer -> signed integer codes, :func:`dfmpc.folding.integer_codes`) are given, every
    weight that is codes x per-channel scales set to that float32 product and its bias rounded to int32 codes of
    scale (input scale x weight scale)."""
    from .folding import engine_arithmetic, fold_batch_norms
    from .propagation import input_moments

    check_act_bits(act_bits)
    if rule not in ACT_RULES:
        raise DfmpcError(f"unknown activation range rule {rule!r}; use one of {', '.join(ACT_RULES)}")
    try:
        lo_in, hi_in = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise DfmpcError(f"act_input_range must be (low, high) numbers, got {input_range!r}") from None
    if not (math.isfinite(lo_in) and math.isfinite(hi_in) and lo_in < hi_in):
        raise DfmpcError(f"act_input_range must be finite with low < high, got {input_range!r}")
    with torch.no_grad():
        gm = trace(copy.deepcopy(model)).eval()  # a copy: the quantizers are added to it only
        points = _points(gm)
        try:
            moments = input_moments(gm) if calibration is None else {}
        except DfmpcError:  # a graph the propagation does not know: only BatchNorm-fed tensors get ranges
            moments = {}
        placeholder = next(node for node in gm.graph.nodes if node.op == "placeholder")
        observed = _calibrated(gm, points, calibration) if calibration is not None else None
        rows = []
        for k, (node, reader) in enumerate(points.items()):
            if node is placeholder:
                lo, hi, source = lo_in, hi_in, "input"
            elif observed is not None:
                (lo, hi), source = observed[node.name], "calibration"
            else:
                mean, std, clip, source = _gaussians(gm, node, moments, reader, (lo_in, hi_in))
                if mean is None:
                    lo, hi = clip
                elif rule == "dfq":
                    lo, hi = _range(mean, std, clip, n)
                else:
                    lo, hi, used = _mse_range(mean, std, clip, act_bits)
                    source += f", n={used:.2f}"
            quantizer = ActivationQuantizer(lo, hi, act_bits)
            name = f"act_quant_{k}"
            gm.add_submodule(name, quantizer)
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            rows.append({"tensor": node.name, "reader": reader, "source": source, "lo": lo, "hi": hi,
                         "scale": quantizer.scale, "zero_point": quantizer.zero_point})
        gm.recompile()
        input_scales = {node.target: gm.get_submodule(node.args[0].target).scale for node in gm.graph.nodes
                        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), WEIGHT_LAYERS)
                        and node.args[0].op == "call_module"
                        and isinstance(gm.get_submodule(node.args[0].target), ActivationQuantizer)}
        fold_batch_norms(gm)
        engine_arithmetic(gm, codes or {}, input_scales)
    return gm, rows


def _calibrated(gm: fx.GraphModule, points: dict, images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Minimum and maximum of every quantized tensor on ``images`` (ZeroQ's calibration)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not len(images):
        raise DfmpcError("calibration= must be a batch of images, a 4-D tensor (N, C, H, W) with N >= 1")
    env = {}
    interp = fx.Interpreter(gm)
    seen = {node.name for node in points}
    original = interp.run_node

    def run_node(node):
        out = original(node)
        if node.name in seen:
            lo, hi = env.get(node.name, (math.inf, -math.inf))
            env[node.name] = (min(lo, out.min().item()), max(hi, out.max().item()))
        return out

    interp.run_node = run_node
    for batch in images.split(64):
        interp.run(batch)
    return env


def activation_table(rows: list[dict]) -> str:
    """The quantized tensors, one line each: tensor, range source, range, scale, zero point."""
    lines = [f"{'tensor':<28} {'source':<16} {'lo':>9} {'hi':>9} {'scale':>10} {'zp':>4}"]
    lines += [f"{r['tensor']:<28} {r['source']:<16} {r['lo']:>9.4f} {r['hi']:>9.4f} {r['scale']:>10.6f} "
              f"{r['zero_point']:>4}" for r in rows]
    return "\n".join(lines)
