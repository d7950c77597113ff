"""The book's figure check: text that overlaps and legends that cover data, found where the figure is drawn.

A PNG on a page shows the browser nothing but pixels, so the check runs in the kernel, on the figure itself,
from the extents matplotlib's renderer gives every text and artist. :func:`figure_problems` lists what a
reader would call broken; :func:`install_figure_check` (called by the chapters' ``setup()``) runs it on every
figure a notebook displays and prints each problem to stderr, where the book shows it as a stderr block and
the browser check (``.ci/check_book_html.py``) fails the page.
"""
from __future__ import annotations

import sys

__all__ = ["figure_problems", "install_figure_check", "self_test_figures", "FIGURE_PROBLEM_PREFIX"]

FIGURE_PROBLEM_PREFIX = "figure check:"
_MIN_OVERLAP_PX = 1.0  # boxes that share less than this in width or in height only touch
_SAMPLES_PER_SEGMENT = 16  # points tested on each straight piece of a line (a line can cross a legend between points)


def _texts(fig):
    """(label, Text) for every visible, non-empty text of the figure outside legends."""
    found = []
    for text in fig.texts:
        found.append(("figure text", text))
    for text in (getattr(fig, "_suptitle", None), getattr(fig, "_supxlabel", None), getattr(fig, "_supylabel", None)):
        if text is not None and text not in fig.texts:
            found.append(("figure text", text))
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        name = f"axes {i + 1}"
        for loc in ("left", "center", "right"):
            found.append((f"{name} title", ax._left_title if loc == "left" else
                          ax.title if loc == "center" else ax._right_title))
        found.append((f"{name} x label", ax.xaxis.label))
        found.append((f"{name} y label", ax.yaxis.label))
        for axis, which in ((ax.xaxis, "x"), (ax.yaxis, "y")):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * max(abs(lo), abs(hi), 1.0)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - eps <= tick.get_loc() <= hi + eps:  # ticks outside the view are not drawn
                    continue
                for label in (tick.label1, tick.label2):
                    found.append((f"{name} {which} tick", label))
        for text in ax.texts:
            found.append((f"{name} text", text))
    return [(label, t) for label, t in found if t.get_visible() and t.get_text().strip()]


def _overlap(a, b) -> bool:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w > _MIN_OVERLAP_PX and h > _MIN_OVERLAP_PX


def _corners(text, box, renderer):
    """The four corners of the rectangle a text's glyphs fill, in display coordinates: its bounding box for
    upright or quarter-turned text; for text at another angle, its unrotated extent turned about the
    bounding box's centre (which the turn keeps)."""
    import numpy as np

    angle = text.get_rotation() % 90
    if angle == 0:
        return np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]])
    rotation = text.get_rotation()
    text.set_rotation(0)
    flat = text.get_window_extent(renderer)
    text.set_rotation(rotation)
    a = np.deg2rad(rotation)
    turn = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [flat.width / 2, flat.height / 2]
    return half @ turn.T + [(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2]


def _quads_overlap(p, q) -> bool:
    """Two convex quadrilaterals overlap by more than _MIN_OVERLAP_PX (separating axis theorem)."""
    import numpy as np

    for poly in (p, q):
        for i in range(4):
            edge = poly[(i + 1) % 4] - poly[i]
            axis = np.array([-edge[1], edge[0]])
            norm = np.hypot(*axis)
            if norm == 0:
                continue
            axis /= norm
            a, b = p @ axis, q @ axis
            if min(a.max(), b.max()) - max(a.min(), b.min()) <= _MIN_OVERLAP_PX:
                return False
    return True


def _inside_points(points, box) -> bool:
    import numpy as np

    if len(points) == 0:
        return False
    x, y = points[:, 0], points[:, 1]
    ok = np.isfinite(x) & np.isfinite(y)
    return bool(((x > box.x0) & (x < box.x1) & (y > box.y0) & (y < box.y1) & ok).any())


def _line_points(line):
    """Display coordinates of a line's points and of points between them."""
    import numpy as np

    xy = line.get_transform().transform(np.asarray(line.get_xydata(), dtype=float))
    if len(xy) < 2 or line.get_linestyle() in ("None", "none", "", " "):
        return xy
    t = np.linspace(0, 1, _SAMPLES_PER_SEGMENT)[None, :, None]
    return (xy[:-1, None, :] * (1 - t) + xy[1:, None, :] * t).reshape(-1, 2)


def _covered(ax, box, renderer) -> list[str]:
    """What of the axes' data the box covers: lines, markers, bars and filled areas, where they are drawn
    (data clipped to the axes, e.g. a bar from 0 on a log scale, counts only inside the axes)."""
    import numpy as np
    from matplotlib.transforms import Bbox

    inside = Bbox.intersection(box, ax.bbox)  # data is clipped to the axes
    if inside is None:
        return []
    box = inside
    covered = []
    for line in ax.lines:
        if line.get_visible() and len(line.get_xydata()) and _inside_points(_line_points(line), box):
            covered.append(f"line {line.get_label()!r}")
    for patch in ax.patches:
        if patch.get_visible() and _overlap(patch.get_window_extent(renderer), box):
            covered.append(f"bar/patch {patch.get_label()!r}")
    for coll in ax.collections:
        if not coll.get_visible():
            continue
        offsets = coll.get_offsets()
        if len(offsets) and len(coll.get_paths()) <= 1 + len(offsets):  # markers (scatter)
            pts = coll.get_offset_transform().transform(np.asarray(offsets, dtype=float))
            if _inside_points(pts, box):
                covered.append(f"markers {coll.get_label()!r}")
                continue
        for path in coll.get_paths():  # filled areas (fill_between, error bands)
            verts = coll.get_transform().transform(path.vertices)
            if len(verts) and _inside_points(verts, box):
                covered.append(f"area {coll.get_label()!r}")
                break
    return covered


def figure_problems(fig) -> list[str]:
    """What a reader would call broken in ``fig``: two texts that overlap (titles, labels, tick labels, texts
    placed on the axes, a legend over a text) and a legend that covers plotted data. Empty when none."""
    fig.canvas.draw()  # lays out every text (and tight or constrained layouts) as the saved image will
    renderer = fig.canvas.get_renderer()
    texts = [(label, t, t.get_window_extent(renderer)) for label, t in _texts(fig)]
    quads = [_corners(t, b, renderer) for _, t, b in texts]
    problems = []
    for i, (la, ta, ba) in enumerate(texts):
        for j, (lb, tb, bb) in enumerate(texts[i + 1:], start=i + 1):
            if _overlap(ba, bb) and _quads_overlap(quads[i], quads[j]):
                problems.append(f"text overlaps: {la} {ta.get_text()!r} and {lb} {tb.get_text()!r}")
    legends = [(f"axes {i + 1}", ax.get_legend(), [ax]) for i, ax in enumerate(fig.axes) if ax.get_legend()]
    legends += [("figure", leg, list(fig.axes)) for leg in fig.legends]
    for where, legend, axes in legends:
        if not legend.get_visible():
            continue
        box = legend.get_window_extent(renderer)
        for ax in axes:
            covered = _covered(ax, box, renderer)
            if covered:
                problems.append(f"legend of {where} covers data: {', '.join(dict.fromkeys(covered))}")
        for label, t, b in texts:
            if _overlap(box, b):
                problems.append(f"legend of {where} covers {label} {t.get_text()!r}")
    return list(dict.fromkeys(problems))


def install_figure_check() -> bool:
    """Check every figure the running IPython kernel displays (after drawing it, before its PNG is made) and
    print each problem to stderr. Returns False outside IPython (nothing to install)."""
    try:
        from IPython import get_ipython
        from matplotlib.figure import Figure
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    import matplotlib
    import matplotlib.pyplot as plt

    # load the kernel's backend now (pyplot loads it on the first figure): matplotlib_inline registers its PNG
    # printer then, once, and would replace a printer registered before it
    plt.switch_backend(matplotlib.get_backend())

    formatter = shell.display_formatter.formatters["image/png"]
    previous = formatter.type_printers.get(Figure)
    if previous is None or getattr(previous, "figure_check", False):
        return previous is not None

    def checked(fig, _print=previous):
        for problem in figure_problems(fig):
            print(f"{FIGURE_PROBLEM_PREFIX} {problem}", file=sys.stderr)
        return _print(fig)

    checked.figure_check = True
    formatter.for_type(Figure, checked)
    return True


def self_test_figures() -> dict:
    """Figures broken on purpose, for the self-tests of this check and of the browser check: two subplot titles
    that run into each other, and a legend placed over the data. {what: figure}."""
    import matplotlib.pyplot as plt

    titles, axes = plt.subplots(1, 2, figsize=(6.75, 2.5))
    for ax, title in zip(axes, ("Per output channel: mean of the input channels", "variance over the input channels")):
        ax.plot([0, 1], [0, 1])
        ax.set_title(title)
    legend, ax = plt.subplots(figsize=(4, 3))
    ax.plot(range(10), [5] * 10, label="flat line through the middle")
    ax.plot(range(10), range(10), label="diagonal")
    ax.legend(loc="center")
    return {"figure text overlapping": titles, "legend over the data": legend}
