"""Which layer of each pair takes the low bit width: dfmpc+'s ``low_layer`` rules on the development half.

An ablation of one setting, measured after the comparison's committed run (``book/data/compare.json``) on the same
cells as its ablation -- the development half of ResNet-20 and EfficientNet-Lite0 at 2/6, 3/6 and 4/6 -- with the
same default row, and judged by the same rule (:func:`.compare.ablation_decisions`): ``"first"`` is the paper's
order (the default), ``"least-error"`` gives the low bit width of every pair to the layer whose codes lose less
where the model does not grow, ``"least-error-budget"`` also where it grows as long as the whole model does not,
``"least-error-any-size"`` whatever the size (:mod:`dfmpc.low_layer`).

A rule that makes the model larger is not adopted whatever its accuracy: the comparison sets every method at the
same bits, and a larger model is not the same budget (:func:`decisions`; :data:`PENDING_ADOPTION` holds what the rule
adopts and why).
"""
from __future__ import annotations

from ..low_layer import LOW_LAYERS
from .compare import DEVELOPMENT_MODELS, ablation_decisions, accuracy_scores, evaluation_set, measured_row

__all__ = ["NAME", "TITLE", "BOOK_PRESET", "SETTINGS", "VARIANTS", "PENDING_ADOPTION", "LARGER", "run", "decisions", "chosen",
           "size_growth", "best_passing"]

NAME = "pair_roles"
TITLE = "dfmpc+: which layer of a pair takes the low bit width, on the development half"
BOOK_PRESET = "full"
SETTINGS = {
    "quick": {"models": ["resnet20_cifar10_a"], "bits": ["2/6"], "images": 200, "split": "dev",
              "rules": list(LOW_LAYERS)},
    "full": {"models": DEVELOPMENT_MODELS, "bits": ["2/6", "3/6", "4/6"], "images": None, "split": "dev",
             "rules": list(LOW_LAYERS)},
}
#: rule -> its row label; the default's label is the comparison ablation's, so that its rows can be compared
VARIANTS = {"first": "dfmpc+", "least-error": "least-error layer of each pair low, no larger model",
            "least-error-budget": "least-error layer of each pair low, model no larger in total",
            "least-error-any-size": "least-error layer of each pair low, any size"}
#: Rules the decision rule adopts here that are not yet the default, each with why (the tests check this against the
#: committed result): they become the default with the next full run of the comparison, as the comparison's pending
#: variants do.
PENDING_ADOPTION = {
    "least-error layer of each pair low, model no larger in total":
        "adopted by the rule on the development half after the test-half table was measured; it becomes the default "
        "with the next full run, with the comparison's pending variants",
}
#: Why a rule that makes a model larger is not adopted, whatever its accuracy.
LARGER = "it makes a model larger than the other methods' at the same bits"


def run(session, cfg: dict) -> dict:
    out = {"ablation": [], "ablation_fp32": [], "rules": {VARIANTS[r]: r for r in cfg["rules"]}}
    for name in cfg["models"]:
        _, spec = session.model(name)
        dataset, fp, record, labelled = evaluation_set(session, name, spec, cfg["images"], cfg["split"])
        out["ablation_fp32"].append({"model": name, "data": record, **accuracy_scores(fp, labelled)})
        for bits in cfg["bits"]:
            for rule in cfg["rules"]:
                settings = {} if rule == "first" else {"low_layer": rule}  # the default row as the comparison's
                row = measured_row(session, name, dataset, cfg["images"], cfg["split"], "dfmpc+", bits, fp, labelled,
                                   settings)
                out["ablation"].append({"variant": VARIANTS[rule], **row})
    return out


def best_passing(decided: list[dict]) -> dict | None:
    """Of variants that exclude one another, the decision with the largest mean change among those the rule adopts
    and none refuses (the first of equal ones); None if there is none."""
    passing = [d for d in decided if d["adopted"] and not d["refused"]]
    return max(passing, key=lambda d: d["mean_change"]) if passing else None


def size_growth(rows: list[dict], variant: str, base: str) -> float:
    """The largest change of the model size in MB of ``variant`` against ``base`` over the cells of ``rows``
    (ablation rows): positive where ``variant`` makes a model larger."""
    size = {(r["variant"], r["model"], r["bits"]): r["size_mb"] for r in rows}
    return max(s - size[(base, m, b)] for (v, m, b), s in size.items() if v == variant)


def chosen(data: dict) -> str | None:
    """The rule to adopt: the rules exclude one another, so of those the decision rule adopts and that keep every
    model's size, the one with the largest mean change (None if there is none)."""
    best = best_passing(decisions(data))
    return None if best is None else best["variant"]


def decisions(data: dict) -> list[dict]:
    """:func:`.compare.ablation_decisions` of every rule against the paper's order, each with ``size_change`` (the
    largest change of the model size in MB over the cells: positive where the rule makes a model larger) and
    ``refused`` (:data:`LARGER` where the rule makes a model larger, else None): the accuracy rule's ``adopted``
    stands only where ``refused`` is None."""
    out = []
    for d in ablation_decisions(data):
        growth = size_growth(data["results"]["ablation"], d["variant"], VARIANTS["first"])
        out.append({**d, "size_change": growth, "refused": LARGER if growth > 0 else None})
    return out
