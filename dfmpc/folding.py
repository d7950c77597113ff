"""What an inference engine does to a quantized model before it runs it, shared by the simulation and the export.

* :func:`fold_batch_norms`: every BatchNorm that is the only reader of a Conv2d / Linear is folded into it;
* :func:`integer_codes` / :func:`per_channel_scales`: a quantized weight as signed integer codes times one float32
  scale per output channel (what a ``DequantizeLinear`` with ``axis=0`` computes), where it is one;
* :func:`engine_arithmetic`: the weights set to exactly those products, and the bias of a layer whose input is
  quantized rounded to int32 codes of scale (input scale x weight scale), as onnxruntime stores it
  (its ``QLinearConv`` / ``QGemm`` add the bias in int32).

:func:`dfmpc.activations.quantize_activations` applies them, so that the simulated model computes what the ONNX
model of :func:`dfmpc.export_onnx.export_onnx` computes, up to float32 summation order.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .errors import DfmpcError
from .graph import BATCH_NORMS, WEIGHT_LAYERS

__all__ = ["integer_codes", "signed_codes", "fold_batch_norms", "per_channel_scales", "engine_arithmetic"]


def integer_codes(report) -> dict[str, torch.Tensor]:
    """Layer name -> signed integer codes (int16) of every quantized weight of a report (:func:`signed_codes`)."""
    quantized = getattr(report, "quantized", None)
    if not quantized:
        raise DfmpcError("the report holds no integer codes; pass the report dfmpc.quantize returned with the model")
    return {name: signed_codes(q) for name, q in quantized.items()}


def signed_codes(q) -> torch.Tensor:
    """The codes of a :class:`~dfmpc.quantizers.QuantizedTensor` as signed integers m (int16) whose product with one
    number per output channel is the weight: ternary {-1, 0, 1} (times the scale); k-bit codes q as 2q - (2^k - 1)
    (times scale / (2^k - 1)), or, on an asymmetric grid, q - zero_point (times the step)."""
    codes = q.codes.to(torch.int16)
    if q.bits == 2:
        return codes
    if q.zero_point is not None:
        return codes - q.zero_point.to(torch.int16).reshape(-1, *([1] * (codes.dim() - 1)))
    return 2 * codes - (2**q.bits - 1)


def fold_batch_norms(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every BatchNorm that is the only reader of a Conv2d / Linear into it, in place (eval-mode arithmetic)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), WEIGHT_LAYERS):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or \
                not isinstance(gm.get_submodule(users[0].target), BATCH_NORMS):
            continue
        layer, bn = gm.get_submodule(node.target), gm.get_submodule(users[0].target)
        gain = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            gain = gain * bn.weight.double()
        shift = -bn.running_mean.double() * gain + (bn.bias.double() if bn.bias is not None else 0)
        w = layer.weight.double() * gain.reshape(-1, *([1] * (layer.weight.dim() - 1)))
        b = shift if layer.bias is None else layer.bias.double() * gain + shift
        layer.weight = nn.Parameter(w.float(), requires_grad=False)
        layer.bias = nn.Parameter(b.float(), requires_grad=False)
        users[0].replace_all_uses_with(node)
        gm.graph.erase_node(users[0])
    gm.graph.lint()
    gm.recompile()
    return gm


def per_channel_scales(weight: torch.Tensor, codes: torch.Tensor):
    """Scales s (one per output channel) with weight == s x codes up to float rounding, or None."""
    w, m = weight.detach().double().reshape(len(weight), -1), codes.double().reshape(len(weight), -1)
    if m.abs().max() > 127:
        return None
    norm = (m * m).sum(1)
    s = torch.where(norm > 0, (w * m).sum(1) / norm.clamp_min(1), torch.ones_like(norm))
    tolerance = 1e-5 * w.abs().max().clamp_min(1e-30)
    return s.float() if ((w - s[:, None] * m).abs().max() <= tolerance) else None




def engine_arithmetic(gm: fx.GraphModule, codes: dict[str, torch.Tensor], input_scales: dict[str, float]) -> list[str]:
    """Set every layer of ``codes`` whose weight is codes x per-channel scales to exactly that float32 product, and
    round its bias as the engine does where its input scale is known (``input_scales``: layer -> scale); in place.
    Returns the layers stored as integers."""
    modules, integer = dict(gm.named_modules()), []
    with torch.no_grad():
        for name, m in codes.items():
            layer = modules.get(name)
            if layer is None or tuple(layer.weight.shape) != tuple(m.shape):
                raise DfmpcError(f"the codes of layer {name!r} do not fit the model; pass the model and codes of one "
                                 "quantization (dfmpc.quantize's model and report, or one .dfmpc file)")
            scales = per_channel_scales(layer.weight, m)
            if scales is None:
                continue
            integer.append(name)
            shape = (-1, *([1] * (m.dim() - 1)))
            layer.weight.copy_(m.float() * scales.reshape(shape))
            if layer.bias is not None and name in input_scales:
                bias_scale = torch.tensor(input_scales[name], dtype=torch.float32) * scales
                layer.bias.copy_(torch.round(layer.bias / bias_scale).clamp(-2**31, 2**31 - 1) * bias_scale)
    return integer
