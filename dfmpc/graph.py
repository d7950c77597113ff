"""Find the (low-bit layer l, high-bit layer l+1) pairs of a network from its graph (paper Figure 2).

A pair is a chain in the traced ``torch.fx`` graph

    layer l (Conv2d or Linear) -> [BatchNorm] -> [channel-wise ops ...] -> layer l+1 (Conv2d or Linear)

in which every node between the two layers has exactly one user. That single-user rule is what
excludes residual connections and concatenations: in a ResNet basic block it yields
conv1 -> bn1 -> relu -> conv2 (Figure 2a) but never conv2 -> next block, whose output is also added
to the shortcut; in a DenseNet layer it yields the 1x1 -> BN -> ReLU -> 3x3 chain (Figure 2c). The
search uses the graph, not class or attribute names, so it works on any traceable model.

Allowed between the layers (they act on every channel separately, so the coefficient c_j of
Eq. 7 still refers to channel j): one BatchNorm right after layer l, then activations, dropout and
pooling. ReLU, LeakyReLU, pooling, dropout and identity are positively homogeneous
(f(c x) = c f(x) for c >= 0): for them, scaling the input channels of layer l+1 equals scaling the
output channels of layer l (``LayerPair.exact``). ReLU6 / hardtanh (MobileNetV2) are channel-wise
but not homogeneous: Eq. (7) still applies, the equivalence is only approximate.

Pairs do not overlap: layers are visited in execution order and a layer joins at most one pair.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import DfmpcError

__all__ = ["WEIGHT_LAYERS", "BATCH_NORMS", "LayerPair", "trace", "weight_layer_names", "find_pairs", "adjacent_pairs",
           "pairs_from_names"]

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_CHANNELWISE_MODULES = (nn.ReLU6, nn.Hardtanh)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.dropout, F.max_pool2d, F.avg_pool2d,
                          F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_CHANNELWISE_FUNCTIONS = {F.relu6, F.hardtanh}
_HOMOGENEOUS_METHODS = {"relu", "relu_"}


@dataclass(frozen=True)
class LayerPair:
    """One low/high pair. ``between`` names the graph nodes between the two layers."""

    low: str
    high: str
    bn: str | None
    between: tuple[str, ...]
    exact: bool


class _LayerTracer(fx.Tracer):
    """Keeps every Conv2d / Linear / BatchNorm / Hardtanh a leaf, subclasses defined outside torch.nn included.

    The default tracer only keeps torch.nn's own classes as leaves: a library's ``Conv2d`` subclass
    (EfficientNet-Lite's "same"-padding conv, say) would be traced into a bare conv2d call.
    """

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Hardtanh subclasses too: dfq's per-channel clip (a ReLU6 after equalization) stays one node
        return isinstance(m, WEIGHT_LAYERS + BATCH_NORMS + (nn.Hardtanh,)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, with an error that says what to do when it fails."""
    try:
        tracer = _LayerTracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # fx raises many types; the user needs one clear message
        raise DfmpcError(f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); pass the pairs explicitly: "
                         "pairs=[(low_layer_name, high_layer_name), ...]") from None


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_weight_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), WEIGHT_LAYERS)


def _classify(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'bn', 'homogeneous', 'channelwise' or None (a node that ends the chain)."""
    mod = _module(gm, node)
    if mod is not None:
        if isinstance(mod, BATCH_NORMS):
            return "bn"
        if isinstance(mod, _HOMOGENEOUS_MODULES):
            return "homogeneous"
        if isinstance(mod, _CHANNELWISE_MODULES):
            return "channelwise"
        return None
    if node.op == "call_function":
        if node.target in _HOMOGENEOUS_FUNCTIONS:
            return "homogeneous"
        if node.target in _CHANNELWISE_FUNCTIONS:
            return "channelwise"
    if node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS:
        return "homogeneous"
    return None


def weight_layer_names(model: nn.Module, gm: fx.GraphModule | None = None) -> list[str]:
    """Names of the Conv2d / Linear modules in execution order (each called once in the graph)."""
    gm = gm if gm is not None else trace(model)
    names: list[str] = []
    for node in gm.graph.nodes:
        if _is_weight_layer(gm, node) and node.target not in names:
            names.append(node.target)
    return names


def _partner(gm: fx.GraphModule, start: fx.Node) -> LayerPair | None:
    low = _module(gm, start)
    bn, between, exact, node = None, [], True, start
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        nxt = users[0]
        if _is_weight_layer(gm, nxt):
            high = _module(gm, nxt)
            if nxt.args[:1] != (node,) or len(nxt.args) + len(nxt.kwargs) != 1:
                return None
            out_ch = low.out_channels if isinstance(low, nn.Conv2d) else low.out_features
            in_ch = high.in_channels if isinstance(high, nn.Conv2d) else high.in_features
            if out_ch != in_ch or type(low) is not type(high):  # Conv -> Linear needs a flatten
                return None
            return LayerPair(low=start.target, high=nxt.target, bn=bn, between=tuple(between), exact=exact)
        kind = _classify(gm, nxt)
        if kind is None or (kind == "bn" and (bn is not None or between)):
            return None
        if kind == "bn":
            bn = nxt.target
        exact = exact and kind != "channelwise"
        between.append(str(nxt.target) if nxt.op == "call_module" else nxt.name)
        node = nxt


def find_pairs(model: nn.Module, gm: fx.GraphModule | None = None) -> list[LayerPair]:
    """All non-overlapping (low, high) pairs of ``model``, in execution order."""
    gm = gm if gm is not None else trace(model)
    pairs: list[LayerPair] = []
    used: set[str] = set()
    for node in gm.graph.nodes:
        if not _is_weight_layer(gm, node) or node.target in used:
            continue
        pair = _partner(gm, node)
        if pair is not None and pair.high not in used:
            pairs.append(pair)
            used.update((pair.low, pair.high))
    return pairs


def adjacent_pairs(model: nn.Module, gm: fx.GraphModule | None = None) -> list[LayerPair]:
    """Every chain layer -> [BN] -> channel-wise ops -> layer of ``model``, overlapping ones included.

    :func:`find_pairs` keeps a layer in at most one pair (the mixed-precision plan); cross-layer
    equalization (DFQ) wants every such chain: in expand -> depthwise -> project it equalizes both links.
    """
    gm = gm if gm is not None else trace(model)
    return [p for p in (_partner(gm, n) for n in gm.graph.nodes if _is_weight_layer(gm, n)) if p is not None]


def pairs_from_names(model: nn.Module, names) -> list[LayerPair]:
    """Pairs given by hand, as (low, high) or (low, high, bn) module names, for models torch.fx cannot trace.

    Without a BN name the shift term Theta of the objective is dropped for that pair.
    """
    modules = dict(model.named_modules())
    out = []
    for entry in names:
        low, high, bn = (tuple(entry) + (None,))[:3]
        for name in (low, high):
            if not isinstance(modules.get(name), WEIGHT_LAYERS):
                raise DfmpcError(f"{name!r} is not a Conv2d or Linear layer of the model; check the names in pairs")
        if bn is not None and not isinstance(modules.get(bn), BATCH_NORMS):
            raise DfmpcError(f"{bn!r} is not a BatchNorm layer of the model; check the names in pairs")
        out.append(LayerPair(low=low, high=high, bn=bn, between=(), exact=False))
    return out


