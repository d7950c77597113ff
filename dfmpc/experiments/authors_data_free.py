"""SQuant and OCS at their authors' settings on the comparison's test half, beside dfmpc+.

The comparison (:mod:`.compare`) runs two data-free competitors differently from their authors, for reasons the
deviations (:mod:`.deviations`) list and measure on the development cell:

* **SQuant** flip-rounds on our symmetric max-|w| grid; the authors' reference code uses an asymmetric per-channel
  min/max grid with an integer zero point: ``grid="asymmetric"`` (its 3- to 8-bit layers; the ternary layers stay
  ours: the reference has no ternary grid). Its zero points count in the model size, 16 bits each.
* **OCS** quantizes with one scale per output channel; the authors use one per tensor (``granularity="tensor"``).

This experiment runs both at the authors' settings once on the test half of every model of the comparison, with
dfmpc+ (its default) on the same images. :func:`strongest` merges the result with the comparison's table, keeping
for each competitor and cell the better of its two settings, so that dfmpc+ is judged against every data-free
competitor at its strongest. Nothing here decides anything: it runs once, with the final defaults.
"""
from __future__ import annotations

from ..errors import DfmpcError
from ..methods import METHODS, settings_for_model
from .compare import figure, measured_row, model_entry
from .verdict import MODEL_LABELS, standing

__all__ = ["NAME", "TITLE", "BOOK_PRESET", "SETTINGS", "METHODS_SETTING", "AUTHORS", "AUTHORS_LABELS", "run", "strongest",
           "method_label", "rows"]

NAME = "authors_data_free"
TITLE = "SQuant (the reference's asymmetric grid) and OCS (one scale per tensor) at their authors' settings, test half"
BOOK_PRESET = "full"
#: method -> its settings at its authors' setting, on top of its defaults
AUTHORS = {"squant": {"grid": "asymmetric"}, "ocs": {"granularity": "tensor"}}
#: method -> its authors' setting in a table's cell
AUTHORS_LABELS = {"squant": "authors' grid", "ocs": "per tensor"}
#: The setting that lists the methods measured: one method's rows can be rerun alone (:mod:`.merge`).
METHODS_SETTING = "methods"
SETTINGS = {
    "quick": {"models": ["resnet20_cifar10_a"], "images": 200, "split": "test", "bits": ["2/6", "3/6"],
              "methods": ["dfmpc+", *AUTHORS]},
    # every model of the comparison's table; the CIFAR-100 ResNet-56 through its agreement with fp32 only
    "full": {"models": ["resnet20_cifar10_a", "resnet56_cifar10_a", "chenyaofo_resnet56_cifar100",
                        "efficientnet_lite0", "efficientnet_lite2"], "images": None, "split": "test",
             "bits": ["2/6", "3/6", "4/6"], "methods": ["dfmpc+", *AUTHORS]},
}


def run(session, cfg: dict) -> dict:
    from tqdm import tqdm

    methods = list(cfg["methods"])
    for m in methods:
        if m not in ("dfmpc+", *AUTHORS):
            raise DfmpcError(f"{NAME} measures dfmpc+ and {', '.join(AUTHORS)}, not {m!r}")
    # laid out as the comparison's result, so that its views (:func:`.compare.pivot`, :mod:`.verdict`) read it
    out = {"bits": list(cfg["bits"]), "authors": AUTHORS, "models": [], "rows": [],
           "methods": {m: METHODS[m].description for m in methods}}
    with tqdm(total=len(cfg["models"]) * len(cfg["bits"]) * len(methods), desc=NAME, unit="run",
              disable=not session.progress, leave=False) as bar:
        for name in cfg["models"]:
            _, spec = session.model(name)
            entry, dataset, fp, labelled = model_entry(session, name, cfg["images"], cfg["split"])
            out["models"].append(entry)
            for b in cfg["bits"]:
                for method in methods:
                    bar.set_postfix_str(f"{name} {b} {method}")
                    settings = {**settings_for_model(method, spec), **AUTHORS.get(method, {})}
                    out["rows"].append(measured_row(session, name, dataset, cfg["images"], cfg["split"], method, b,
                                                    fp, labelled, settings))
                    bar.update(1)
    return out


def _score(row: dict, metric: str) -> float:
    return row["agreement_with_fp32" if metric == "agreement_with_fp32" else "top1"]


def strongest(table: dict, authors: dict) -> dict:
    """The comparison ``table`` with each competitor of :data:`AUTHORS` at the better of its two settings in every
    cell that ``authors`` measured (rows gain ``"setting"``: "ours" or "authors'"). Both are results as
    :func:`dfmpc.experiments.load_result` returns them; the verdict functions read the merge as they read a table."""
    metric = {e["model"]: e["metric"] for e in table["results"]["models"]}
    theirs = {(r["model"], r["bits"], r["method"]): r for r in authors["results"]["rows"] if r["method"] in AUTHORS}
    rows = []
    for r in table["results"]["rows"]:
        other = theirs.get((r["model"], r["bits"], r["method"]))
        if other is not None and _score(other, metric[r["model"]]) > _score(r, metric[r["model"]]):
            rows.append({**other, "setting": "authors'"})
        else:
            rows.append({**r, "setting": "ours"})
    return {**table, "results": {**table["results"], "rows": rows}}


def method_label(row: dict) -> str:
    """A row's method as a table names it: with its authors' setting where :func:`strongest` took that one."""
    return f"{row['method']}, {AUTHORS_LABELS[row['method']]}" if row.get("setting") == "authors'" else row["method"]


def rows(data: dict, table: dict) -> tuple[list[str], list[list[str]]]:
    """The chapter's table: per labelled (model, bits), dfmpc+, and SQuant and OCS at our setting (the comparison's
    ``table``) and at the authors' (top-1 %), and where dfmpc+ stands against the best data-free method with every
    competitor at its stronger setting (:func:`strongest`; a lead under one standard error is a tie)."""
    merged = strongest(table, data)
    header = ["model", "bits", "dfmpc+", "squant, ours / authors' grid", "ocs, ours / authors' (per tensor)",
              "dfmpc+ against the best data-free method"]
    by_cell = {(r["model"], r["bits"], r["method"]): r for r in data["results"]["rows"]}
    out = []
    for e in data["results"]["models"]:
        if e["metric"] != "top1":
            continue
        for b in data["results"]["bits"]:
            s = standing(merged, e["model"], b, "data-free")
            pairs = [f"{figure(table, e['model'], b, m):.2f} / {by_cell[(e['model'], b, m)]['top1']:.2f}"
                     for m in AUTHORS]
            out.append([MODEL_LABELS.get(e["model"], e["model"]), b, f"{by_cell[(e['model'], b, 'dfmpc+')]['top1']:.2f}",
                        *pairs, f"**{s.word}** {s.lead:+.2f} vs {s.rival} (SE {s.se:.2f})"])
    return header, out
