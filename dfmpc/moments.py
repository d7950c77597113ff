r"""What the BatchNorm statistics say about every layer's input: data-free per-channel moments.

A trained network carries a record of its activations: every BatchNorm's running mean mu_j and
running variance sigma_j^2 are the mean and variance of channel j of its input over the training
data. The BN's output z_j = gamma_j (x_j - mu_j) / sqrt(sigma_j^2 + eps) + beta_j therefore has mean
beta_j and variance gamma_j^2 sigma_j^2 / (sigma_j^2 + eps). With one further assumption -- z_j is
Gaussian -- the moments of everything up to the next weight layer follow in closed form:

* ReLU:  E[relu z] = m Phi(a) + s phi(a),  E[relu(z)^2] = (m^2 + s^2) Phi(a) + m s phi(a),  a = m / s
  (z ~ N(m, s^2); Phi, phi: standard normal CDF and density);
* ReLU6 / Hardtanh(lo, hi): clip(z, 0, h) = relu(z) - relu(z - h), clip^2 = relu(z)^2 - relu(z-h)^2
  - 2 h relu(z - h), so the clipped moments are differences of rectified ones;
* a residual sum of two branches: means add, variances add (the branches are taken as independent);
* channel-structural ops (identity, dropout, average pooling, flatten, indexing, channel padding,
  concatenation): the op applied to the vector of means and to the vector of variances; average
  pooling keeps the variance (an upper bound: pixels are taken as perfectly correlated);
* a weight layer that is not followed by a BN (e.g. the classifier): mean W mu + b, variance
  sum W^2 v (inputs taken as independent); the network's input has mean 0 and variance 1 per channel
  (it is normalised).

:func:`input_moments` runs this propagation once over the ``torch.fx`` graph of a full-precision
model and returns, for every Conv2d / Linear layer, the mean and variance of each of its input
channels. Nothing but the model's own parameters and buffers is used.

:func:`expected_output_shift` turns those moments into the expected change of a layer's output
when its weight W is replaced by W + D: E[D (*) x]_o = sum_{i,k} D_{o,i,k} mu_i (border pixels, where
zero padding cuts the kernel, are treated like interior ones).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import DfmpcError
from .graph import BATCH_NORMS, WEIGHT_LAYERS, trace

__all__ = ["BatchNormStats", "ChannelMoments", "relu_moments", "clip_moments", "input_moments", "following_batch_norms",
           "expected_output_shift", "weighted_output_energy"]

_SQRT_2PI = math.sqrt(2 * math.pi)


@dataclass(frozen=True)
class BatchNormStats:
    """The running statistics and affine parameters of the BN after layer l (eval mode)."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    @classmethod
    def from_module(cls, bn: nn.Module) -> BatchNormStats:
        if bn.running_mean is None or bn.running_var is None:
            raise DfmpcError(f"{type(bn).__name__} has no running statistics (track_running_stats=False); "
                             "DF-MPC needs them: build the model with track_running_stats=True")
        n = bn.running_mean.numel()
        weight = bn.weight.detach() if bn.weight is not None else torch.ones(n)
        bias = bn.bias.detach() if bn.bias is not None else torch.zeros(n)
        return cls(bn.running_mean.detach(), bn.running_var.detach(), weight, bias, float(bn.eps))

    @property
    def scale(self) -> torch.Tensor:
        """s_j = gamma_j / sqrt(sigma_j^2 + eps)."""
        return self.weight / torch.sqrt(self.var + self.eps)

    def relative_shift_sq(self) -> torch.Tensor:
        """t_j = b_bar_j^2 / (mu_j^2 + sigma_j^2 + eps), with b_bar_j = beta_j / s_j - mu_j (0 where s_j = 0)."""
        s = self.scale
        safe_s = torch.where(s != 0, s, torch.ones_like(s))
        b_bar = torch.where(s != 0, self.bias / safe_s - self.mean, torch.zeros_like(s))
        return b_bar**2 / (self.mean**2 + self.var + self.eps)


@dataclass(frozen=True)
class ChannelMoments:
    """Per-channel mean and variance of an activation (1-D float64 tensors of length C)."""

    mean: torch.Tensor
    var: torch.Tensor

    @property
    def second(self) -> torch.Tensor:
        """E[x^2] = var + mean^2."""
        return self.var + self.mean**2


def _phi(a: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * a * a) / _SQRT_2PI


def _relu_raw(m: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[relu z] and E[relu(z)^2] for z ~ N(m, v) (v = 0 allowed: z is the constant m)."""
    m, v = m.double(), v.double().clamp(min=0)
    s = v.sqrt()
    positive = s > 0
    safe_s = torch.where(positive, s, torch.ones_like(s))
    a = m / safe_s
    cdf, pdf = torch.special.ndtr(a), _phi(a)
    first = torch.where(positive, m * cdf + s * pdf, m.clamp(min=0))
    second = torch.where(positive, (m * m + v) * cdf + m * s * pdf, m.clamp(min=0) ** 2)
    return first, second


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of relu(z) for z ~ N(mean, var), elementwise (float64)."""
    first, second = _relu_raw(mean, var)
    return first, (second - first**2).clamp(min=0)


def clip_moments(mean: torch.Tensor, var: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of clip(z, lo, hi) for z ~ N(mean, var), lo < hi finite (ReLU6: 0, 6)."""
    if not lo < hi:
        raise DfmpcError(f"clip bounds must satisfy lo < hi, got {lo}, {hi}")
    h = hi - lo
    m = mean.double() - lo
    r1, r2 = _relu_raw(m, var)
    t1, t2 = _relu_raw(m - h, var)
    first = r1 - t1
    second = r2 - t2 - 2 * h * t1
    first_out = first + lo
    return first_out, (second - first**2).clamp(min=0)


class _Mom:
    """Moments carried through the graph: mean and variance shaped like a batch-1 activation with 1x1 maps."""

    __slots__ = ("mean", "var")

    def __init__(self, mean: torch.Tensor, var: torch.Tensor):
        self.mean, self.var = mean, var


def _channel_vector(t: torch.Tensor) -> torch.Tensor:
    """(1, C, 1, 1) or (1, C) -> (C,)."""
    return t.reshape(t.shape[0], t.shape[1], -1).mean(dim=2)[0] if t.dim() > 2 else t[0]


def _as_map(vec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return vec.reshape(1, -1, *([1] * (like.dim() - 2)))


def _weight_layer(mod: nn.Module, x: _Mom) -> _Mom:
    w = mod.weight.detach().double()
    b = mod.bias.detach().double() if getattr(mod, "bias", None) is not None else None
    if isinstance(mod, nn.Linear):
        mean = x.mean @ w.T + (b if b is not None else 0)
        var = x.var @ (w * w).T
        return _Mom(mean, var)
    # Conv: a 1x1 map sees the kernel summed over its taps (interior pixels; stride and padding drop out).
    k1 = w.sum(dim=tuple(range(2, w.dim())), keepdim=True)
    k2 = (w * w).sum(dim=tuple(range(2, w.dim())), keepdim=True)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    mean = conv(x.mean, k1, b, groups=mod.groups)
    var = conv(x.var, k2, None, groups=mod.groups)
    return _Mom(mean, var)


def _batch_norm(mod: nn.Module, x: _Mom) -> _Mom:
    if mod.running_mean is None or mod.running_var is None:
        raise DfmpcError(f"{type(mod).__name__} has no running statistics; data-free moments need them "
                         "(build the model with track_running_stats=True)")
    n = mod.running_var.numel()
    gamma = mod.weight.detach().double() if mod.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = mod.bias.detach().double() if mod.bias is not None else torch.zeros(n, dtype=torch.float64)
    var = mod.running_var.detach().double()
    out_var = gamma**2 * var / (var + mod.eps)
    return _Mom(_as_map(beta, x.mean), _as_map(out_var, x.mean))


def _activation(kind: str, x: _Mom, lo: float = 0.0, hi: float = 6.0) -> _Mom:
    if kind == "relu":
        m, v = relu_moments(x.mean, x.var)
    else:
        m, v = clip_moments(x.mean, x.var, lo, hi)
    return _Mom(m, v)


def _add(a, b):
    if isinstance(a, _Mom) and isinstance(b, _Mom):
        return _Mom(a.mean + b.mean, a.var + b.var)
    mom, const = (a, b) if isinstance(a, _Mom) else (b, a)
    return _Mom(mom.mean + const, mom.var)


def _mul(a, b):
    if isinstance(a, _Mom) and isinstance(b, _Mom):  # independent factors
        return _Mom(a.mean * b.mean, a.var * b.var + a.var * b.mean**2 + b.var * a.mean**2)
    mom, const = (a, b) if isinstance(a, _Mom) else (b, a)
    return _Mom(mom.mean * const, mom.var * const**2)


_RELU_FUNCTIONS = {F.relu, torch.relu}
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}


def _structural(fn, args, kwargs):
    """Apply a channel-structural op to the means and, separately, to the variances."""
    def pick(obj, field):
        if isinstance(obj, _Mom):
            return getattr(obj, field)
        if isinstance(obj, (list, tuple)):
            return type(obj)(pick(o, field) for o in obj)
        if isinstance(obj, dict):
            return {k: pick(v, field) for k, v in obj.items()}
        return obj

    mean = fn(*pick(args, "mean"), **pick(kwargs, "mean"))
    var = fn(*pick(args, "var"), **pick(kwargs, "var"))
    if isinstance(mean, torch.Tensor):
        return _Mom(mean, var)
    return mean  # e.g. x.size(0): no moments


def _run(model: nn.Module, gm: fx.GraphModule, in_channels: int, input_mean: float, input_var: float):
    env: dict[fx.Node, object] = {}
    record: dict[str, ChannelMoments] = {}
    modules = dict(gm.named_modules())

    def load(a):
        return fx.node.map_arg(a, lambda n: env[n])

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = (1, in_channels, 1, 1)
            env[node] = _Mom(torch.full(shape, float(input_mean), dtype=torch.float64),
                             torch.full(shape, float(input_var), dtype=torch.float64))
            continue
        if node.op == "output":
            break
        if node.op == "get_attr":
            env[node] = operator.attrgetter(node.target)(gm)
            continue
        args, kwargs = load(node.args), load(node.kwargs)
        if node.op == "call_module":
            mod = modules[node.target]
            x = args[0]
            if isinstance(mod, WEIGHT_LAYERS):
                record[node.target] = ChannelMoments(_channel_vector(x.mean).clone(), _channel_vector(x.var).clone())
                env[node] = _weight_layer(mod, x)
            elif isinstance(mod, BATCH_NORMS):
                env[node] = _batch_norm(mod, x)
            elif isinstance(mod, nn.ReLU):
                env[node] = _activation("relu", x)
            elif isinstance(mod, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
                env[node] = _activation("clip", x, mod.min_val, mod.max_val)
            else:  # identity, dropout, pooling, flatten, padding, ... : structural
                env[node] = _structural(mod, args, kwargs)
        elif node.op == "call_function":
            fn = node.target
            if fn in _RELU_FUNCTIONS:
                env[node] = _activation("relu", args[0])
            elif fn is F.relu6:
                env[node] = _activation("clip", args[0], 0.0, 6.0)
            elif fn in _ADD and any(isinstance(a, _Mom) for a in args[:2]):
                env[node] = _add(args[0], args[1])
            elif fn in _MUL and any(isinstance(a, _Mom) for a in args[:2]):
                env[node] = _mul(args[0], args[1])
            else:
                env[node] = _structural(fn, args, kwargs)
        elif node.op == "call_method":
            self_obj = args[0]
            if node.target in ("relu", "relu_"):
                env[node] = _activation("relu", self_obj)
            elif node.target in ("add", "add_") and isinstance(self_obj, _Mom):
                env[node] = _add(self_obj, args[1])
            elif isinstance(self_obj, _Mom):
                env[node] = _structural(lambda t, *a, **k: getattr(t, node.target)(*a, **k), args, kwargs)
            else:
                env[node] = getattr(self_obj, node.target)(*args[1:], **kwargs)
    return record


def _input_channels(model: nn.Module, gm: fx.GraphModule) -> int:
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), WEIGHT_LAYERS):
            mod = gm.get_submodule(node.target)
            return mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
    raise DfmpcError(f"{type(model).__name__} has no Conv2d or Linear layer")


def input_moments(model: nn.Module, input_mean: float = 0.0, input_var: float = 1.0) -> dict[str, ChannelMoments]:
    """Data-free mean and variance of every input channel of every Conv2d / Linear layer of ``model``.

    Propagates per-channel Gaussian moments through the ``torch.fx`` graph (module docstring), with the
    network input taken as ``input_mean`` / ``input_var`` per channel. Returns layer name -> moments.
    """
    with torch.no_grad():
        gm = trace(model)
        return _run(model, gm, _input_channels(model, gm), input_mean, input_var)


def following_batch_norms(model: nn.Module, gm: fx.GraphModule | None = None) -> dict[str, str]:
    """Weight layer name -> name of the BatchNorm that is the only user of its output (where there is one)."""
    gm = gm if gm is not None else trace(model)
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), WEIGHT_LAYERS):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(gm.get_submodule(users[0].target), BATCH_NORMS):
            out[node.target] = users[0].target
    return out


def per_input_channel(layer: nn.Module, vec: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-channel vector to the weight's shape (grouped convolutions included)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return vec.reshape(1, -1)
    groups = layer.groups
    out_per_group, in_per_group = w.shape[0] // groups, w.shape[1]
    group_of_output = torch.arange(w.shape[0]) // out_per_group
    index = group_of_output[:, None] * in_per_group + torch.arange(in_per_group)[None, :]
    return vec[index].reshape(w.shape[0], in_per_group, *([1] * (w.dim() - 2)))


def expected_output_shift(layer: nn.Module, delta: torch.Tensor, moments: ChannelMoments) -> torch.Tensor:
    """E[(delta (*) x)_o] = sum_{i,k} delta_{o,i,k} mu_i for every output channel o (float64)."""
    mu = per_input_channel(layer, moments.mean.double())
    return (delta.double() * mu).reshape(delta.shape[0], -1).sum(dim=1)


def weighted_output_energy(layer: nn.Module, weight: torch.Tensor, moments: ChannelMoments,
                           centred: bool = True) -> torch.Tensor:
    """sum_{i,k} v_i w_{o,i,k}^2 per output channel: Var[(w (*) x)_o] for independent inputs of variance v_i.

    ``centred=False`` uses E[x_i^2] instead of Var[x_i].
    """
    v = moments.var if centred else moments.second
    vb = per_input_channel(layer, v.double())
    return (weight.double() ** 2 * vb).reshape(weight.shape[0], -1).sum(dim=1)
