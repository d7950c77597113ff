r"""DFQ: data-free quantization through weight equalization and bias correction (Nagel et al. 2019).

Four steps, in the paper's order, on a copy of the model:

1. **Cross-layer equalization** (CLE, their Section 4.1). For two layers joined by a positively
   homogeneous activation (ReLU: f(x / s) = f(x) / s for s > 0) the network output does not change
   when output channel j of the first is divided by s_j and input channel j of the second multiplied
   by s_j. CLE picks s_j = sqrt(r1_j / r2_j), where r1_j is the range (max |.|) of output channel j of
   the first layer with its BatchNorm folded in, and r2_j the range of input channel j of the second;
   both ranges become sqrt(r1_j r2_j), which suits one scale per tensor. Every chain layer -> [BN] ->
   channel-wise ops -> layer is equalized (:func:`dfmpc.graph.adjacent_pairs`: in expand -> depthwise ->
   project both links), in rounds until the scales stop changing, as in their iterative scheme. The first
   layer's 1/s_j goes into its BatchNorm's gamma and beta. ReLU6 is not homogeneous; three ways to treat it:

   * ``relu6="clip"`` (default): exact. ReLU6 is clip(z, 0, 6), and clip(z / s, 0, 6 / s) = clip(z, 0, 6) / s,
     so each ReLU6 between equalized layers becomes a :class:`ChannelClip` whose upper bound for channel j is
     divided by s_j with it. A ReLU6 module called at several places (EfficientNet-Lite's blocks share one)
     gets one copy per call, which makes the returned model the traced graph of the original (a
     ``torch.fx.GraphModule`` with the same layer names). Activations stay in full precision here, so a
     per-channel clip costs nothing that weight-only quantization would count.
   * ``relu6="relu"``: Nagel et al.'s recipe for MobileNetV2, every ReLU6 replaced by a ReLU: exact for
     the equalization but a different full-precision network (the comparison chapter reports its cost).
   * ``relu6="keep"``: pairs through a ReLU6 are not equalized.
2. **BatchNorm folding**: every BN that directly follows a weight layer is folded into it
   (W <- W gamma / sigma, b <- beta + (b - mu) gamma / sigma) and replaced by an identity, as DFQ
   quantizes the folded weights.
3. **Quantization** of every layer with the bit width of the plan (one scale per tensor by default,
   as in the paper; ``granularity="channel"`` is accepted).
4. **Bias correction** (their Section 4.2, the analytic, data-free variant): the quantized layer
   computes (W + D) (*) x, whose expected output differs from the full-precision one by D E[x].
   E[x] comes from the BatchNorm statistics (:mod:`dfmpc.propagation`: the preceding BN's beta and
   gamma through a Gaussian ReLU or clip), and D E[x] is subtracted from the layer's bias. Layers whose input
   comes through a residual sum get E[x] from the same propagation (means of the branches add).

High-bias absorption (their Section 4.1.1) is skipped: it helps activation quantization, and here
only weights are quantized.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..errors import DfmpcError
from ..graph import BATCH_NORMS, adjacent_pairs, trace
from ..moments import expected_output_shift
from ..placement import correct_bias, input_channel_multiplier
from ..propagation import following_batch_norms, input_moments
from .base import QuantizationMethod

__all__ = ["DataFreeQuantization", "ChannelClip", "equalize_pair", "equalize", "replace_relu6", "fold_batch_norm",
           "correct_bias", "input_channel_absmax", "RELU6_MODES"]

RELU6_MODES = ("clip", "relu", "keep")
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool2d)


class ChannelClip(nn.Hardtanh):
    """clip(x, lo_c, hi_c) with one range per channel of a feature map [N, C, H, W]: a ReLU6 after equalization."""

    def __init__(self, channels: int, lo: float = 0.0, hi: float = 6.0):
        nn.Module.__init__(self)
        self.inplace = False
        self.register_buffer("min_val", torch.full((1, channels, 1, 1), float(lo)))
        self.register_buffer("max_val", torch.full((1, channels, 1, 1), float(hi)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(x, self.max_val), self.min_val)

    def extra_repr(self) -> str:
        return f"channels={self.max_val.shape[1]}"


def input_channel_absmax(layer: nn.Module) -> torch.Tensor:
    """max |W| over the weights that read input channel j, for every input channel j (grouped convs too).

    A grouped convolution's weight is [O, C/g, k...]: input channel j = group * C/g + slot is read by the
    O/g outputs of its group at that slot.
    """
    w = layer.weight.detach().abs()
    if isinstance(layer, nn.Linear):
        return w.amax(dim=0)
    groups = layer.groups
    per_group = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)  # [g, O/g, C/g, taps]
    return per_group.amax(dim=(1, 3)).reshape(-1)


def _bn_scale(bn: nn.Module) -> torch.Tensor:
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


def equalize_pair(low: nn.Module, bn: nn.Module | None, high: nn.Module, clips=()) -> torch.Tensor:
    """Cross-layer equalization of one pair in place; returns s. Exact when everything between the layers is
    positively homogeneous or one of ``clips`` (:class:`ChannelClip`, whose bounds are divided by s too)."""
    w1 = low.weight.detach()
    folded = w1 * (_bn_scale(bn) if bn is not None else torch.ones(w1.shape[0], dtype=w1.dtype)).reshape(
        -1, *([1] * (w1.dim() - 1)))
    r1 = folded.abs().reshape(w1.shape[0], -1).amax(dim=1)
    r2 = input_channel_absmax(high)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
    if bn is not None:
        if bn.weight is None:
            raise DfmpcError("a BatchNorm without affine parameters cannot take the equalization scale; "
                             "use dfq with equalize=False")
        bn.weight.div_(s)
        bn.bias.div_(s)
    else:
        low.weight.div_(s.reshape(-1, *([1] * (w1.dim() - 1))))
        if low.bias is not None:
            low.bias.div_(s)
    for clip in clips:
        clip.min_val.div_(s.reshape(clip.min_val.shape))
        clip.max_val.div_(s.reshape(clip.max_val.shape))
    high.weight.mul_(input_channel_multiplier(high, s))
    return s


def _one_module_per_call(model: nn.Module) -> fx.GraphModule | None:
    """The traced graph of ``model`` with a copy of every ReLU6 / Hardtanh module for each further place it is
    called at (None if no such module is shared): each call site can then get its own clip bounds."""
    gm = trace(model)
    seen, shared = set(), False
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Hardtanh):
            continue
        if node.target in seen:
            parent, _, child = node.target.rpartition(".")
            target = f"{parent}.{child}_{node.name}" if parent else f"{child}_{node.name}"
            gm.add_submodule(target, copy.deepcopy(gm.get_submodule(node.target)))
            node.target, shared = target, True
        seen.add(node.target)
    if not shared:
        return None
    gm.recompile()
    return gm


def equalize(model: nn.Module, relu6: str = "clip", rounds: int = 20, tol: float = 1e-3) -> int:
    """Cross-layer equalization of every chain of ``model`` in place, in rounds until no scale moves by more than
    ``tol`` (relative); ReLU6 between the layers as ``relu6`` says (module docstring). Returns the rounds used."""
    modules = dict(model.named_modules())

    def clips_of(pair):  # the clips that make the pair exact, or None if it cannot be equalized exactly
        clips = []
        for name in pair.between:
            mod = modules.get(name)
            if isinstance(mod, BATCH_NORMS + _HOMOGENEOUS) or (mod is None and pair.exact):
                continue
            if relu6 == "clip" and isinstance(mod, nn.Hardtanh) and mod.min_val is not None:
                if not isinstance(mod, ChannelClip):
                    channels = modules[pair.low].weight.shape[0]
                    mod = ChannelClip(channels, float(mod.min_val), float(mod.max_val))
                    _set_module(model, name, mod)
                    modules[name] = mod
                clips.append(mod)
                continue
            return None
        return clips

    chains = [(pair, clips_of(pair)) for pair in adjacent_pairs(model)]
    chains = [(pair, clips) for pair, clips in chains if clips is not None]
    for done in range(1, rounds + 1):
        moved = 0.0
        for pair, clips in chains:
            s = equalize_pair(modules[pair.low], modules[pair.bn] if pair.bn else None, modules[pair.high], clips)
            moved = max(moved, float((s - 1).abs().max()))
        if moved < tol:
            return done
    return rounds


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


class DataFreeQuantization(QuantizationMethod):
    name = "dfq"

    def __init__(self, bits="2/6", equalize: bool = True, bias_correction: bool = True, relu6: str = "clip", **kwargs):
        super().__init__(bits, **kwargs)
        if relu6 not in RELU6_MODES:
            raise DfmpcError(f"unknown relu6 {relu6!r}; use 'clip' (per-channel clip bounds, exact), 'relu' (replace "
                             "ReLU6 by ReLU, as Nagel et al.) or 'keep' (do not equalize across ReLU6)")
        self.equalize, self.bias_correction, self.relu6 = bool(equalize), bool(bias_correction), relu6

    def settings(self) -> dict:
        return {**super().settings(), "equalize": self.equalize, "bias_correction": self.bias_correction,
                "relu6": self.relu6}

    def prepare(self, model, plan, run):
        model = self._equalized(model)
        run.moments = input_moments(model) if self.bias_correction else {}
        self._fold(model)
        return model

    def rebuild(self, model):
        # the same steps as prepare: on a fresh model they make the same modules (the values do not matter)
        model = self._equalized(model)
        self._fold(model)
        return model

    def _equalized(self, model):
        if self.equalize and self.relu6 == "clip":
            model = _one_module_per_call(model) or model
        if self.equalize and self.relu6 == "relu":
            replace_relu6(model)
        if self.equalize:
            equalize(model, self.relu6)
        return model

    @staticmethod
    def _fold(model):
        for layer_name, bn_name in following_batch_norms(model, trace(model)).items():
            fold_batch_norm(model, layer_name, bn_name)

    def adjust(self, model, plan, fp_weights, quantized, run):
        if not self.bias_correction:
            return {}
        modules = dict(model.named_modules())
        for name, q in quantized.items():
            layer = modules[name]
            shift = expected_output_shift(layer, q.dequantize() - fp_weights[name], run.moments[name])
            correct_bias(layer, shift)
            run.folded_into(name, f"{name}.bias")
        return {}
