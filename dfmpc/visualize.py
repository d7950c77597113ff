"""Small matplotlib helpers that draw a mixed-precision plan (used by the book's chapters).

* :func:`plot_plan` -- one bar per weight layer, in execution order, coloured by its role in the
  plan (low / high / unpaired / fp32), bar height = number of weights.
* :func:`draw_block` -- the traced graph of one building block (e.g. a ResNet basic block), with
  its weight layers coloured by role: a drawing of the paper's Figure 2 found in a real model.

matplotlib is imported inside the functions, so ``import dfmpc`` does not need it.
"""
from __future__ import annotations

from torch import nn

from .graph import trace
from .plan import MixedPrecisionPlan

__all__ = ["ROLE_COLORS", "ROLE_LABELS", "role_legend", "plot_plan", "draw_block"]

ROLE_COLORS = {"low": "#1f77b4", "high": "#ff7f0e", "unpaired": "#9e9e9e", "fp32": "#2b2b2b"}
ROLE_LABELS = {"low": "low bits (layer l of a pair)", "high": "high bits (layer l+1, compensates)",
               "unpaired": "unpaired (policy)", "fp32": "kept in fp32"}


def role_legend(ax, roles=("low", "high", "unpaired", "fp32"), **kwargs):
    """Add a legend with one coloured patch per role to ``ax`` (an axes or a figure); kwargs go to ``legend``."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=ROLE_COLORS[r], label=ROLE_LABELS[r]) for r in roles]
    return ax.legend(handles=handles, **kwargs)


def plot_plan(model: nn.Module, plan: MixedPrecisionPlan, ax=None, title: str | None = None, log: bool = True):
    """Bar chart of ``plan`` along depth: bar i is weight layer i (execution order), coloured by role.

    The bar height is the layer's number of weights (log scale by default), so the chart shows both
    where the pairs are and how much of the model each role holds. Returns the axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax = ax if ax is not None else plt.gca()
    modules = dict(model.named_modules())
    sizes = [modules[a.name].weight.numel() for a in plan.layers]
    colors = [ROLE_COLORS[a.role] for a in plan.layers]
    ax.bar(range(len(sizes)), sizes, width=1.0, color=colors, edgecolor="white", linewidth=0.3)
    if log:
        ax.set_yscale("log")
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("weight layer (execution order)")
    ax.set_ylabel("weights")
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    return ax


def _label(gm, node) -> str:
    if node.op == "placeholder":
        return "in"
    if node.op == "output":
        return "out"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Conv2d):
            k = "x".join(str(s) for s in mod.kernel_size)
            dw = " dw" if mod.groups > 1 and mod.groups == mod.in_channels else ""
            return f"{'dw' if dw else 'conv'} {k}\n{mod.in_channels}\u2192{mod.out_channels}"
        if isinstance(mod, nn.Linear):
            return f"fc\n{mod.in_features}\u2192{mod.out_features}"
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return "BN"
        if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return "pool"
        return type(mod).__name__.replace("Shortcut", "\nshortcut")
    name = getattr(node.target, "__name__", str(node.target))
    return {"add": "+", "iadd": "+", "cat": "concat", "getitem": "slice"}.get(name, name)


def draw_block(block: nn.Module, plan: MixedPrecisionPlan | None = None, prefix: str = "", ax=None,
               title: str | None = None, span: int | None = None):
    """Draw the ``torch.fx`` graph of ``block`` with its weight layers coloured by their role in ``plan``.

    ``prefix`` is the block's name in the model the plan was made for (e.g. ``"layer1.0"``), so that
    its layers can be looked up in the plan. The longest path from input to output is drawn on one
    row; side branches (shortcut convolutions) on a row below; an edge that skips nodes on the main
    row is drawn above it. ``span``: width of the drawing in plain boxes (a weight layer's box is 1.5 of them;
    default: the block's own), so that several blocks drawn with the same ``span`` have boxes of the same size.
    Returns the axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    ax = ax if ax is not None else plt.gca()
    gm = trace(block)
    nodes = list(gm.graph.nodes)
    roles = {} if plan is None else {a.name: a.role for a in plan.layers}

    def full(node):  # the node's module name in the whole model
        return f"{prefix}.{node.target}" if prefix else str(node.target)

    # longest path (main row)
    depth, parent = {}, {}
    for n in nodes:
        ins = n.all_input_nodes
        best = max(ins, key=lambda p: depth[p], default=None)
        depth[n], parent[n] = (depth[best] + 1 if best is not None else 0), best
    main, n = [], nodes[-1]
    while n is not None:
        main.append(n)
        n = parent[n]
    main = main[::-1]
    def width(n):  # weight layers get wider boxes: their labels are longer
        weighted = n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))
        return 1.35 if weighted else 0.9

    column = {n: i for i, n in enumerate(main)}
    for n in nodes:
        if n not in column:
            column[n] = max((column[p] for p in n.all_input_nodes if p in column), default=0) + 1
    centre, x = [], 0.0  # the centre of each column of the main row
    for n in main:
        centre.append(x + width(n) / 2)
        x += width(n)
    centre += [x + 0.45 + 0.9 * i for i in range(len(nodes))]  # side nodes beyond the main row (not expected)
    pos = {n: (centre[column[n]], 0.0 if n in main else -1.15) for n in nodes}
    h = 0.75
    for n in nodes:
        x, y = pos[n]
        w = 0.94 * width(n)
        role = roles.get(full(n)) if n.op == "call_module" else None
        face = ROLE_COLORS.get(role, "white")
        text_color = "white" if role in ("low", "high", "fp32") else "black"
        if n.op == "call_module" and role is None and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear)):
            face = "#dddddd"
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02", facecolor=face,
                                    edgecolor="#444444", linewidth=0.8))
        ax.text(x, y, _label(gm, n), ha="center", va="center", fontsize=9, color=text_color)
    arrow = dict(arrowstyle="-|>", mutation_scale=8, color="#444444", linewidth=0.8)
    for n in nodes:
        for p in n.all_input_nodes:
            (x0, y0), (x1, y1) = pos[p], pos[n]
            w0, w1 = 0.94 * width(p), 0.94 * width(n)
            if y0 == y1 and column[n] - column[p] > 1:  # a skip over the main row: up, across, down
                top = y0 + h / 2 + 0.35
                ax.plot([x0, x0, x1], [y0 + h / 2, top, top], color="#444444", linewidth=0.8)
                ax.add_patch(FancyArrowPatch((x1, top), (x1, y1 + h / 2), **arrow))
            elif y0 == y1:
                ax.add_patch(FancyArrowPatch((x0 + w0 / 2, y0), (x1 - w1 / 2, y1), **arrow))
            elif y1 < y0:  # main row -> side branch: bottom of p to the left side of n
                ax.add_patch(FancyArrowPatch((x0, y0 - h / 2), (x1 - w1 / 2, y1), **arrow))
            else:  # side branch -> main row: right side of p to the bottom of n
                ax.add_patch(FancyArrowPatch((x0 + w0 / 2, y0), (x1, y1 - h / 2), **arrow))
    right = max(x + 0.94 * width(n) / 2 for n, (x, _) in pos.items())
    ax.set_xlim(-0.1, max(span if span is not None else 0, right + 0.1))
    ax.set_ylim(-1.6, 0.95)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    return ax
