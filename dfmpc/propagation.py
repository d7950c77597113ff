r"""Data-free moments of every layer's input: BatchNorm statistics carried through the network's graph.

:func:`input_moments` walks the traced ``torch.fx`` graph of a full-precision model once and returns, for
every Conv2d / Linear layer, the mean and variance of each of its input channels. Nothing but the model's
own parameters and buffers is used. Activations are taken as stationary (every pixel of a channel has the
same moments), so they are carried as one mean and one variance per channel, and each op has a rule:

* the network's input: mean ``input_mean``, variance ``input_var`` per channel (it is normalised);
* Conv2d / Linear: mean W mu + b (a conv kernel summed over its taps), variance sum W^2 v (inputs taken as
  independent); a Linear after a flatten of C x H x W features sees every channel's moments H x W times;
* BatchNorm: mean beta, variance gamma^2 sigma^2 / (sigma^2 + eps), what it recorded on the training data;
* ReLU, ReLU6 / Hardtanh, LeakyReLU: closed forms for a Gaussian input; any other elementwise activation
  (SiLU, GELU, sigmoid, tanh, hardswish, ELU, ...): Gauss-Hermite quadrature (:mod:`dfmpc.moments`);
* a sum of two branches: means add, variances add (independent branches); a product: independent factors;
* pooling (average or max; fixed-kernel, strided or adaptive), spatial padding, dropout, identity: the moments
  of a channel are unchanged. For average pooling the mean is exact and the variance an upper bound (pixels
  taken as perfectly correlated); for max pooling the kept mean is a lower bound (the max of a window is at
  least each of its pixels), an under-estimate that the coverage experiment measures;
* constant padding along the channels (option-A ResNet shortcuts) adds channels equal to that constant;
* concatenation, flatten, reshape, squeeze, indexing: applied to the vectors of means and of variances;
* anything else ends with a :class:`~dfmpc.errors.DfmpcError` that names the node and its type.

The book's improvement chapter derives each rule in one line; the tests check them against measurements.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import DfmpcError
from .graph import BATCH_NORMS, WEIGHT_LAYERS, trace
from .moments import ChannelMoments, activation_moments, clip_moments, leaky_relu_moments, relu_moments

__all__ = ["input_moments", "following_batch_norms"]

_KEEP_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                 nn.ReplicationPad1d, nn.ReplicationPad2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.Identity)
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_KEEP_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.max_pool2d, torch.avg_pool1d,
                   torch.adaptive_avg_pool1d, F.dropout, F.dropout2d, torch.dropout}
_SMOOTH_MODULES = (nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Softplus)
_SMOOTH_FUNCTIONS = {F.silu, F.gelu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid,
                     F.elu, F.mish, F.softplus}
_RELU_FUNCTIONS = {F.relu, torch.relu}
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_STRUCTURAL_FUNCTIONS = {torch.flatten, torch.cat, torch.concat, torch.reshape, torch.squeeze, torch.unsqueeze,
                         operator.getitem}
_STRUCTURAL_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "clone", "detach"}


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


def _layer_input(name: str, mod: nn.Module, x: _Mom) -> ChannelMoments:
    """The per-channel moments the layer sees: a Linear after a flatten of C x H x W sees each channel H x W times."""
    mean, var = _channel_vector(x.mean), _channel_vector(x.var)
    expected = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
    if isinstance(mod, nn.Linear) and expected != mean.numel() and expected % mean.numel() == 0:
        k = expected // mean.numel()  # flatten is channel-major: channel c fills features c*k .. c*k + k - 1
        mean, var = mean.repeat_interleave(k), var.repeat_interleave(k)
    if expected != mean.numel():
        raise DfmpcError(f"layer {name!r} ({type(mod).__name__}) expects {expected} input channels but the moments "
                         f"propagated to it have {mean.numel()}; an op before it is not modelled")
    return ChannelMoments(mean.clone(), var.clone())


def _weight_layer(mod: nn.Module, x: ChannelMoments) -> _Mom:
    w = mod.weight.detach().double()
    b = mod.bias.detach().double() if getattr(mod, "bias", None) is not None else None
    mean, var = x.mean[None, :], x.var[None, :]
    if isinstance(mod, nn.Linear):
        return _Mom(mean @ w.T + (b if b is not None else 0), var @ (w * w).T)
    # Conv: a 1x1 map sees the kernel summed over its taps (interior pixels; stride and padding drop out).
    spatial = tuple(range(2, w.dim()))
    k1, k2 = w.sum(dim=spatial, keepdim=True), (w * w).sum(dim=spatial, keepdim=True)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    shape = (1, -1) + (1,) * len(spatial)
    return _Mom(conv(mean.reshape(shape), k1, b, groups=mod.groups), conv(var.reshape(shape), k2, None, groups=mod.groups))


def _batch_norm(mod: nn.Module, x: _Mom) -> _Mom:
    if mod.running_mean is None or mod.running_var is None:
        raise DfmpcError(f"{type(mod).__name__} has no running statistics; data-free moments need them "
                         "(build the model with track_running_stats=True)")
    n = mod.running_var.numel()
    gamma = mod.weight.detach().double() if mod.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = mod.bias.detach().double() if mod.bias is not None else torch.zeros(n, dtype=torch.float64)
    var = mod.running_var.detach().double()
    return _Mom(_as_map(beta, x.mean), _as_map(gamma**2 * var / (var + mod.eps), x.mean))


def _elementwise(moments_of, x: _Mom) -> _Mom:
    m, v = moments_of(x.mean, x.var)
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


def _structural(fn, args, kwargs):
    """Apply a channel-structural op (concatenation, flatten, ...) to the means and, separately, to the variances."""
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
    return _Mom(mean, var) if isinstance(mean, torch.Tensor) else mean  # e.g. x.size(0): no moments


def _pad(x: _Mom, pad, value: float = 0.0) -> _Mom:
    """Constant padding: spatial padding keeps a channel's moments (interior pixels); padding along the channel
    dimension (option-A ResNet shortcuts) adds channels that are the constant ``value``: mean value, variance 0."""
    pad = list(pad)
    for i in range(min(len(pad), 2 * (x.mean.dim() - 2))):  # F.pad's pairs run from the last dimension backwards
        pad[i] = 0
    return _Mom(F.pad(x.mean, pad, value=float(value)), F.pad(x.var, pad, value=0.0))


def _has_moments(args) -> bool:
    return any(isinstance(a, _Mom) or (isinstance(a, (list, tuple)) and _has_moments(a)) for a in args)


def _module_rule(mod: nn.Module, x):
    """The moments after a call of ``mod`` (None: no rule for this module)."""
    if isinstance(mod, BATCH_NORMS):
        return _batch_norm(mod, x)
    if isinstance(mod, nn.ReLU):
        return _elementwise(relu_moments, x)
    if isinstance(mod, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
        return _elementwise(lambda m, v: clip_moments(m, v, mod.min_val, mod.max_val), x)
    if isinstance(mod, nn.LeakyReLU):
        return _elementwise(lambda m, v: leaky_relu_moments(m, v, mod.negative_slope), x)
    if isinstance(mod, _SMOOTH_MODULES):
        return _elementwise(lambda m, v: activation_moments(mod, m, v), x)
    if isinstance(mod, _KEEP_MODULES):
        return x
    if isinstance(mod, _PAD_MODULES):
        return _pad(x, mod.padding, getattr(mod, "value", 0.0))
    if isinstance(mod, nn.Flatten):
        return _structural(mod, (x,), {})
    return None


def _function_rule(fn, args, kwargs):
    """The moments after ``fn(*args, **kwargs)`` with moments among the arguments (None: no rule)."""
    x = args[0] if args else None
    if fn in _RELU_FUNCTIONS:
        return _elementwise(relu_moments, x)
    if fn is F.relu6:
        return _elementwise(lambda m, v: clip_moments(m, v, 0.0, 6.0), x)
    if fn is F.hardtanh:
        lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return _elementwise(lambda m, v: clip_moments(m, v, lo, hi), x)
    if fn is F.leaky_relu:
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return _elementwise(lambda m, v: leaky_relu_moments(m, v, slope), x)
    if fn in _SMOOTH_FUNCTIONS:
        return _elementwise(lambda m, v: activation_moments(lambda t: fn(t, *args[1:], **kwargs), m, v), x)
    if fn in _ADD and len(args) >= 2:
        return _add(args[0], args[1])
    if fn in _MUL and len(args) >= 2:
        return _mul(args[0], args[1])
    if fn in _KEEP_FUNCTIONS:
        return x
    if fn is F.pad and kwargs.get("mode", args[2] if len(args) > 2 else "constant") == "constant":
        return _pad(x, args[1] if len(args) > 1 else kwargs["pad"], args[3] if len(args) > 3 else kwargs.get("value") or 0.0)
    if fn in _STRUCTURAL_FUNCTIONS:
        return _structural(fn, args, kwargs)
    return None


def _method_rule(name: str, args, kwargs):
    """The moments after ``args[0].name(*args[1:], **kwargs)`` on moments (None: no rule)."""
    x = args[0]
    if name in ("relu", "relu_"):
        return _elementwise(relu_moments, x)
    if name in ("sigmoid", "tanh"):
        return _elementwise(lambda m, v: activation_moments(getattr(torch, name), m, v), x)
    if name in ("add", "add_"):
        return _add(x, args[1])
    if name in ("mul", "mul_"):
        return _mul(x, args[1])
    if name == "mean":  # global average pooling written as x.mean((2, 3)): keeps the channel moments
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if dims and all(d not in (0, 1, -x.mean.dim() + 1) for d in dims):
            return _structural(lambda t, *a, **k: t.mean(*a, **k), args, kwargs)
        return None
    if name in _STRUCTURAL_METHODS or name in ("size", "dim"):
        return _structural(lambda t, *a, **k: getattr(t, name)(*a, **k), args, kwargs)
    return None


def _fail(node: fx.Node, what: str, why: str = "") -> DfmpcError:
    return DfmpcError(f"cannot carry BatchNorm moments through {what} (graph node {node.name}){why}; dfq and dfmpc+ "
                      "need every op between the layers to be modelled: use another method, or open an issue")


def _run(gm: fx.GraphModule, in_channels: int, input_mean: float, input_var: float) -> dict[str, ChannelMoments]:
    env: dict[fx.Node, object] = {}
    record: dict[str, ChannelMoments] = {}
    modules = dict(gm.named_modules())
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
        args, kwargs = fx.node.map_arg(node.args, lambda n: env[n]), fx.node.map_arg(node.kwargs, lambda n: env[n])
        what = (f"{type(modules[node.target]).__name__} {node.target!r}" if node.op == "call_module" else
                f"function {getattr(node.target, '__name__', node.target)}" if node.op == "call_function" else
                f"method .{node.target}()")
        try:
            if not _has_moments(list(args) + list(kwargs.values())):  # plain values (sizes, constants)
                env[node] = _evaluate(node, modules, args, kwargs)
                continue
            if node.op == "call_module" and isinstance(modules[node.target], WEIGHT_LAYERS):
                mod = modules[node.target]
                record[node.target] = _layer_input(node.target, mod, args[0])
                out = _weight_layer(mod, record[node.target])
            elif node.op == "call_module":
                out = _module_rule(modules[node.target], args[0])
            elif node.op == "call_function":
                out = _function_rule(node.target, args, kwargs)
            else:
                out = _method_rule(node.target, args, kwargs)
        except DfmpcError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise _fail(node, what, f": {type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
        if out is None:
            raise _fail(node, what, ", which has no moment rule")
        env[node] = out
    return record


def _evaluate(node: fx.Node, modules: dict, args, kwargs):
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


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
        return _run(gm, _input_channels(model, gm), input_mean, input_var)


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
