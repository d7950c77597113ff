"""Where one method stands against the others in a comparison, cell by cell, in words that follow the table.

A lead smaller than one standard error is a tie and is called one: the standard error is the larger of the two
figures' binomial standard errors on the images of the cell (:func:`dfmpc.experiments.compare.standard_error`).
The methods fall into two classes, as in the tables: data-free, and those that calibrate on synthetic images
(``synthetic_data`` in :data:`dfmpc.catalog.METHOD_REGISTRY`, today ZeroQ). The README's and the chapters'
comparative sentences are made by, or asserted against, these functions.
"""
from __future__ import annotations

from typing import NamedTuple

from ..catalog import METHOD_REGISTRY
from .compare import pivot, standard_error

__all__ = ["Standing", "WORDS", "MODEL_LABELS", "CLASS_LABELS", "rivals", "standing", "standings", "standings_table",
           "class_summary"]

#: what a signed lead is called
WORDS = ("ahead", "tie", "behind")
#: the models' names in sentences
MODEL_LABELS = {"resnet20_cifar10_a": "ResNet-20", "resnet56_cifar10_a": "ResNet-56",
                "chenyaofo_resnet56_cifar100": "CIFAR-100 ResNet-56", "efficientnet_lite0": "EfficientNet-Lite0",
                "efficientnet_lite2": "EfficientNet-Lite2"}
#: the two classes of rivals, in sentences
CLASS_LABELS = {"data-free": "data-free method", "synthetic data": "method calibrated on synthetic images"}


class Standing(NamedTuple):
    """One cell: ``ours`` against the best of ``rival_class`` (its best method ``rival``), the lead in points,
    the standard error it is judged by, and the word for it (one of :data:`WORDS`)."""
    model: str
    bits: str
    ours: float
    rival: str
    rival_value: float
    lead: float
    se: float
    word: str


def rivals(data: dict, rival_class: str, ours: str = "dfmpc+") -> list[str]:
    """The methods of a comparison in ``rival_class`` ("data-free" or "synthetic data"), ``ours`` excluded."""
    if rival_class not in ("data-free", "synthetic data"):
        raise ValueError(f"rival_class is 'data-free' or 'synthetic data', not {rival_class!r}")
    synthetic = rival_class == "synthetic data"
    return [m for m in data["results"]["methods"] if m not in (ours, "fp32") and m in METHOD_REGISTRY
            and METHOD_REGISTRY[m].synthetic_data == synthetic]


def _field(entry: dict) -> str:
    return "agreement_with_fp32" if entry.get("metric") == "agreement_with_fp32" else "top1"


def standing(data: dict, model: str, bits: str, rival_class: str = "data-free", ours: str = "dfmpc+") -> Standing:
    """How ``ours`` stands at (``model``, ``bits``) against the best method of ``rival_class`` (top-1, or the
    agreement with fp32 for a model with no labelled test set)."""
    entry = next(e for e in data["results"]["models"] if e["model"] == model)
    _, _, cells = pivot(data, model, _field(entry))
    others = {m: cells[(bits, m)] for m in rivals(data, rival_class, ours) if cells.get((bits, m)) is not None}
    best = max(others, key=others.get)
    value, rival_value = cells[(bits, ours)], others[best]
    se = max(standard_error(value, entry["images"]), standard_error(rival_value, entry["images"]))
    lead = value - rival_value
    word = "tie" if abs(lead) < se else "ahead" if lead > 0 else "behind"
    return Standing(model, bits, value, best, rival_value, lead, se, word)


def standings(data: dict, rival_class: str = "data-free", ours: str = "dfmpc+", bits=None,
              labelled_only: bool = True) -> list[Standing]:
    """Every (model, bits) cell of a comparison (``bits``: those bit widths only), models with a labelled test set
    only unless ``labelled_only`` is False."""
    out = []
    for entry in data["results"]["models"]:
        if labelled_only and _field(entry) != "top1":
            continue
        model_bits, methods, _ = pivot(data, entry["model"])
        if ours not in methods:
            continue
        out += [standing(data, entry["model"], b, rival_class, ours) for b in model_bits if bits is None or b in bits]
    return out


def standings_table(data: dict, ours: str = "dfmpc+", names: dict = MODEL_LABELS) -> str:
    """Markdown: per (model, bits), ``ours`` (and as a % of fp32; for a model with no labelled test set its
    agreement with fp32, already a fraction of it) against the best data-free method and against the best
    synthetic-data one: the lead in points, the standard error and the word."""
    from .book import md_table

    rows = []
    columns = [c for c in ("data-free", "synthetic data") if rivals(data, c, ours)]
    for entry in data["results"]["models"]:
        model_bits, methods, _ = pivot(data, entry["model"])
        if ours not in methods:
            continue
        for b in model_bits:
            found = [standing(data, entry["model"], b, c, ours) for c in columns]
            cells = [f"**{s.word}** {s.lead:+.2f} vs {s.rival} {s.rival_value:.2f} (SE {s.se:.2f})" for s in found]
            fp32 = entry["fp32"]["top1"] or 100.0  # agreement with fp32 is already a fraction of fp32
            rows.append([names.get(entry["model"], entry["model"]), b, f"{found[0].ours:.2f}",
                         f"{100 * found[0].ours / fp32:.1f}", *cells])
    return md_table(["model", "bits", ours, f"{ours} as % of fp32",
                     *[f"against the best {CLASS_LABELS[c]}" for c in columns]], rows)


def _cells(items: list[Standing], names: dict) -> str:
    return ", ".join(f"{names.get(s.model, s.model)} at {s.bits} ({s.lead:+.2f} vs {s.rival})" for s in items)


def class_summary(data: dict, rival_class: str, bits=("2/6", "3/6", "4/6"), ours: str = "dfmpc+",
                  names: dict = MODEL_LABELS) -> str:
    """One sentence: in how many of the labelled cells at ``bits`` ``ours`` is ahead of the best method of
    ``rival_class`` by more than one standard error, tied within one, or behind by more; the ties and the
    losses named."""
    cells = standings(data, rival_class, ours, bits)
    by_word = {w: [s for s in cells if s.word == w] for w in WORDS}
    widths = ", ".join(bits[:-1]) + f" and {bits[-1]}" if len(bits) > 1 else bits[0]
    text = (f"against the best {CLASS_LABELS[rival_class]}, at {widths} on the {len({s.model for s in cells})} "
            f"models with labelled test images, `{ours}` is ahead by more than one standard error in "
            f"{len(by_word['ahead'])} of {len(cells)} cells")
    if by_word["tie"]:
        text += f", tied (within one standard error) in {len(by_word['tie'])}: {_cells(by_word['tie'], names)}"
    if by_word["behind"]:
        text += f", and behind in {len(by_word['behind'])}: {_cells(by_word['behind'], names)}"
    return text
