"""The pending choices of dfmpc+ together, on the development half: every combination, judged by the one rule.

Each pending choice (:data:`.compare.PENDING_ADOPTION`, :data:`.pair_roles.PENDING_ADOPTION`) was adopted by the rule
against the default it was measured with, one at a time. Choices interact (the low-layer rule compares the codes of
the two layers of a pair, which the restarts and the grid change), so the next full run must not adopt them on
their separate verdicts. This experiment measures every combination of them on the cells where they were decided
(the development half of ResNet-20 and EfficientNet-Lite0 at 2/6, 3/6 and 4/6), judges each against the default by
the same rule (:func:`.compare.ablation_decisions`), refuses a combination whose low-layer rule makes a model larger
than the same combination in the paper's order (:data:`.pair_roles.LARGER`: the rule's own condition, checked where
it now acts), and chooses, of the combinations left, the one with the largest mean change (:func:`chosen`): what the
next full run adopts (:data:`ADOPT`; the tests check it against the committed result).
"""
from __future__ import annotations

import itertools

from . import compare, pair_roles
from .compare import DEVELOPMENT_MODELS, ablation_decisions, accuracy_scores, evaluation_set, measured_row

__all__ = ["NAME", "TITLE", "BOOK_PRESET", "SETTINGS", "pending", "combinations", "run", "decisions", "chosen",
           "ADOPT", "SHORT", "table"]

NAME = "adoption"
TITLE = "dfmpc+: every combination of the pending choices, on the development half"
BOOK_PRESET = "full"
SETTINGS = {
    "quick": {"models": ["resnet20_cifar10_a"], "bits": ["2/6"], "images": 200, "split": "dev"},
    "full": {"models": DEVELOPMENT_MODELS, "bits": ["2/6", "3/6", "4/6"], "images": None, "split": "dev"},
}
#: What the committed result chooses (:func:`chosen`), and so what the next full run of the comparison adopts.
ADOPT = ["asymmetric grid for the k-bit layers", "least-error layer of each pair low, model no larger in total"]


#: A pending choice's name in a table's first column.
SHORT = {"ternary search from one start (no restarts)": "one start",
         "asymmetric grid for the k-bit layers": "asymmetric grid",
         "least-error layer of each pair low, model no larger in total": "low layer by error"}


def pending() -> dict[str, dict]:
    """Every pending choice (its ablation label) -> its settings: the comparison's, then the pair roles'."""
    out = {label: dict(compare.ABLATION[label]) for label in compare.PENDING_ADOPTION}
    rules = {label: rule for rule, label in pair_roles.VARIANTS.items()}
    out.update({label: {"low_layer": rules[label]} for label in pair_roles.PENDING_ADOPTION})
    return out


def combinations() -> dict[str, list[str]]:
    """Row label -> the pending choices it combines: the default ("dfmpc+", none), then every non-empty subset."""
    labels = list(pending())
    subsets = [list(c) for n in range(1, len(labels) + 1) for c in itertools.combinations(labels, n)]
    return {"dfmpc+": [], **{" + ".join(c): c for c in subsets}}


def _settings(choices: list[str]) -> dict:
    table = pending()
    return {k: v for c in choices for k, v in table[c].items()}


def run(session, cfg: dict) -> dict:
    combos = combinations()
    out = {"pending": pending(), "combinations": combos, "ablation": [], "ablation_fp32": []}
    for name in cfg["models"]:
        _, spec = session.model(name)
        dataset, fp, record, labelled = evaluation_set(session, name, spec, cfg["images"], cfg["split"])
        out["ablation_fp32"].append({"model": name, "data": record, **accuracy_scores(fp, labelled)})
        for bits in cfg["bits"]:
            for label, choices in combos.items():
                row = measured_row(session, name, dataset, cfg["images"], cfg["split"], "dfmpc+", bits, fp, labelled,
                                   _settings(choices))
                out["ablation"].append({"variant": label, **row})
    return out


def _low_layer_growth(data: dict, label: str) -> float | None:
    """How much larger (MB, the largest over the cells) the low-layer rule of combination ``label`` makes a model
    than the same combination in the paper's order; None where it has no low-layer rule."""
    combos = data["results"]["combinations"]
    settings = data["results"]["pending"]
    rule = [c for c in combos[label] if "low_layer" in settings[c]]
    if not rule:
        return None
    without = [c for c in combos[label] if c not in rule]
    base = next(k for k, v in combos.items() if v == without)
    return pair_roles.size_growth(data["results"]["ablation"], label, base)


def decisions(data: dict) -> list[dict]:
    """:func:`.compare.ablation_decisions` of every combination against the default, each with ``choices``,
    ``size_change`` (:func:`_low_layer_growth`) and ``refused`` (:data:`.pair_roles.LARGER` where the low-layer rule
    makes a model larger, else None): the accuracy rule's ``adopted`` stands only where ``refused`` is None."""
    combos = data["results"]["combinations"]
    out = []
    for d in ablation_decisions(data):
        growth = _low_layer_growth(data, d["variant"])
        out.append({**d, "choices": combos[d["variant"]], "size_change": growth,
                    "refused": pair_roles.LARGER if growth is not None and growth > 0 else None})
    return out


def chosen(data: dict) -> list[str]:
    """The pending choices to adopt: those of the combination with the largest mean change among the ones the rule
    adopts and none refuses (the combinations exclude one another; of two with the same mean, the one of fewer
    choices); [] where there is none."""
    best = pair_roles.best_passing(decisions(data))
    return [] if best is None else best["choices"]


def table(data: dict, labels: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """The chapter's table: one row per combination (its choices by :data:`SHORT`; "none": the default), top-1 % in
    every development cell (model columns named by ``labels``), the mean change against the default in points, and
    the verdict: adopted by the rule, failed (its worst cell, the change and the standard error) or refused."""
    rows = data["results"]["ablation"]
    cells = list(dict.fromkeys((r["model"], r["bits"]) for r in rows))
    top1 = {(r["variant"], r["model"], r["bits"]): r["top1"] for r in rows}
    decided = {d["variant"]: d for d in decisions(data)}
    best = chosen(data)
    header = ["pending choices", *(f"{labels.get(m, m)} {b}" for m, b in cells), "mean change", "verdict"]
    out = []
    for label, choices in data["results"]["combinations"].items():
        d = decided.get(label)
        if d is None:
            verdict, mean = "the default", ""
        else:
            mean = f"{d['mean_change']:+.2f}"
            model, bits = d["worst_cell"]
            if d["refused"]:
                verdict = "refused: a larger model"
            elif d["adopted"]:
                verdict = "**chosen**" if choices == best else "adopted by the rule"
            else:
                verdict = (f"fails: {d['worst_change']:+.2f} at {labels.get(model, model)} {bits} "
                           f"(SE {d['worst_cell_se']:.2f})" if d["mean_change"] > 0 else "fails: mean not above 0")
        out.append([" + ".join(SHORT.get(c, c) for c in choices) or "none",
                    *(f"{top1[(label, m, b)]:.2f}" for m, b in cells), mean, verdict])
    return header, out
