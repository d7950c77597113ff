"""Where a competitor of the comparison runs differently from how its authors ran it, and what the difference does.

Each entry of :data:`DEVIATIONS` names the method, the setting, the authors' choice, ours and why; where the authors'
choice can be expressed in our implementation, the experiment quantizes the development cell (ResNet-20, the
development half of the CIFAR-10 test set: no figure here can inform the test-half table) once with our setting
and once with the authors', at each of ``bits``, and records both top-1 accuracies with their standard error.
dfmpc+ on the same images is recorded beside them, so the reader sees whether a difference could change who leads.

Every authors' choice listed is a setting of our implementation (SQuant's asymmetric grid is ``grid="asymmetric"``:
codes with a zero point per output channel, which the file format and the ONNX export store); an entry whose
``"authors_settings"`` is None would be listed with its effect "not measured".
"""
from __future__ import annotations

from ..methods import settings_for_model
from .compare import standard_error

__all__ = ["NAME", "TITLE", "BOOK_PRESET", "SETTINGS", "DEVIATIONS", "run", "rows", "effects", "summary"]

NAME = "deviations"
TITLE = "Competitors at their authors' settings and at ours: the effect of each difference"
BOOK_PRESET = "full"
SETTINGS = {
    # quick: a handful of distillation steps stands in for the authors' 500 (CI's budget); the book's result is "full"
    "quick": {"model": "resnet20_cifar10_a", "images": 200, "split": "dev", "bits": ["2/6"], "zeroq_steps": 20},
    "full": {"model": "resnet20_cifar10_a", "images": None, "split": "dev", "bits": ["2/6", "3/6", "4/6"],
             "zeroq_steps": 500},
}
#: One row per difference. ``authors_settings``: the settings that give the authors' choice (``"zeroq_steps"`` is
#: replaced by the preset's number of steps), or None where our code cannot express it.
DEVIATIONS = [
    {"method": "zeroq", "setting": "distillation iterations",
     "authors": "500 iterations on a batch of 32 (their distill_data.py)", "ours": "100 steps on 32 images (8 at 224 px)",
     "why": "the CPU budget of the comparison: a step takes 0.09 s for ResNet-20 on one thread, 0.8 s for "
            "EfficientNet-Lite0 on 8 images (not because it measured stronger: see its effect)",
     "authors_settings": {"steps": "zeroq_steps"}},
    {"method": "zeroq", "setting": "weights",
     "authors": "rounded to nearest; only the activation ranges are calibrated on the distilled images",
     "ours": "clipping fitted to the layer's output error, bias correction and BatchNorm re-estimation on the "
             "distilled images",
     "why": "activations stay in full precision in the comparison, so the authors' ZeroQ would leave the distilled "
            "images unused; ours uses them on the weight side, where they can help",
     "authors_settings": {"clipping": False, "bias_correction": False, "bn_reestimation": "off"}},
    {"method": "ocs", "setting": "scales", "authors": "one scale per tensor", "ours": "one scale per output channel",
     "why": "so that splitting is compared on the per-channel grid every other method uses (not because it "
            "measured stronger: see its effect)",
     "authors_settings": {"granularity": "tensor"}},
    {"method": "squant", "setting": "grid",
     "authors": "asymmetric per-channel min/max grid with an integer zero point (their reference code)",
     "ours": "symmetric max-|w| grid",
     "why": "the grid every other method of the comparison uses, so that the table compares roundings, not grids "
            "(the authors' grid is a setting, grid='asymmetric'; the comparison keeps the stronger of the two per "
            "cell); the 2-bit layers are ternary in both runs (the reference has no ternary grid)",
     "authors_settings": {"grid": "asymmetric"}},
]


def _settings(entry: dict, cfg: dict) -> dict | None:
    if entry["authors_settings"] is None:
        return None
    return {k: cfg[v] if v == "zeroq_steps" else v for k, v in entry["authors_settings"].items()}


def run(session, cfg: dict) -> dict:
    name, images, split = cfg["model"], cfg["images"], cfg["split"]
    _, spec = session.model(name)
    base = {entry["method"]: settings_for_model(entry["method"], spec) for entry in DEVIATIONS}
    authors_of = [_settings(entry, cfg) for entry in DEVIATIONS]
    variants = []
    for b in cfg["bits"]:
        variants.append((f"dfmpc+ {b}", "dfmpc+", b, {}))
        for entry, authors in zip(DEVIATIONS, authors_of):
            method = entry["method"]
            variants.append((f"{method} ours {b}", method, b, base[method]))
            if authors is not None:
                variants.append((f"{method} {entry['setting']} authors {b}", method, b, {**base[method], **authors}))
    unique = list({label: (label, m, b, s) for label, m, b, s in variants}.values())
    measured = session.measure(name, spec.dataset, images, unique, split)
    res = measured["results"]
    n = res["fp32"]["images"]

    def cell(label):
        r = res[label]
        return {"top1": r["top1"], "top1_se": standard_error(r["top1"], n), "quantize_s": r["quantize_s"],
                "settings": r["settings"]}

    out = []
    for entry, authors in zip(DEVIATIONS, authors_of):
        row = {k: v for k, v in entry.items() if k != "authors_settings"}
        row["authors_settings"] = authors
        row["cells"] = []
        for b in cfg["bits"]:
            theirs = None if authors is None else cell(f"{entry['method']} {entry['setting']} authors {b}")
            row["cells"].append({"bits": b, "ours": cell(f"{entry['method']} ours {b}"), "authors": theirs,
                                 "dfmpc+": cell(f"dfmpc+ {b}")["top1"]})
        out.append(row)
    return {"model": name, "weights": measured["weights"], "data": measured["data"], "images": n,
            "fp32": res["fp32"]["top1"], "bits": cfg["bits"], "deviations": out}


def rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """The chapter's table: one row per difference; at each bits "ours / the authors' (dfmpc+)", top-1 %."""
    res = data["results"]
    header = ["method", "setting", "the authors'", "ours", "why"] + [f"top-1 % at {b}" for b in res["bits"]]
    out = []
    for d in res["deviations"]:
        cells = []
        for c in d["cells"]:
            if c["authors"] is None:
                cells.append(f"{c['ours']['top1']:.2f} / not measured ({c['dfmpc+']:.2f})")
            else:
                cells.append(f"{c['ours']['top1']:.2f} / {c['authors']['top1']:.2f} ({c['dfmpc+']:.2f})")
        out.append([d["method"], d["setting"], d["authors"], d["ours"], d["why"], *cells])
    return header, out


def effects(data: dict) -> list[dict]:
    """Per measured difference and bits: the authors' top-1 minus ours, in points, the larger standard error of
    the two figures, and the word for it: "higher" or "lower" where the difference is at least one standard
    error, else "tie" (the comparison's rule, :mod:`.verdict`)."""
    out = []
    for d in data["results"]["deviations"]:
        for c in d["cells"]:
            if c["authors"] is None:
                continue
            delta = c["authors"]["top1"] - c["ours"]["top1"]
            se = max(c["authors"]["top1_se"], c["ours"]["top1_se"])
            word = "tie" if abs(delta) < se else "higher" if delta > 0 else "lower"
            out.append({"method": d["method"], "setting": d["setting"], "bits": c["bits"], "ours": c["ours"]["top1"],
                        "authors": c["authors"]["top1"], "delta": delta, "se": se, "word": word,
                        "dfmpc+": c["dfmpc+"]})
    return out


def summary(data: dict) -> list[str]:
    """One sentence per measured difference, written from the result."""
    sentences, measured = [], effects(data)
    for d in data["results"]["deviations"]:
        cells = [e for e in measured if (e["method"], e["setting"]) == (d["method"], d["setting"])]
        if not cells:
            sentences.append(f"{d['method']} ({d['setting']}): the authors' setting is not measured ({d['why']}).")
            continue
        parts = [f"{e['bits']} {e['authors']:.2f} % against our {e['ours']:.2f} % "
                 f"({'a tie' if e['word'] == 'tie' else e['word']}: {e['delta']:+.2f} points, SE {e['se']:.2f})"
                 for e in cells]
        sentences.append(f"{d['method']} ({d['setting']}) at the authors' setting: " + "; ".join(parts) + ".")
    return sentences
