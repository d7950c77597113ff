"""Figure 4 of the paper: the 6-bit weight distributions before and after compensation."""
from __future__ import annotations

from .measure import weight_histogram
from .paper import DFMPC_SETTINGS
from .paper import PAPER as _PAPER

__all__ = ["NAME", "TITLE", "SETTINGS", "PAPER", "run"]

NAME = "fig4"
TITLE = "Figure 4: 6-bit weight distributions before and after compensation"
PAPER = _PAPER["fig4"]
_SETTINGS = {"model": "resnet56_cifar10_a", "bits": "2/6", "layers": ["layer1.2.conv2", "layer3.8.conv2"], "bins": 64}
SETTINGS = {"quick": dict(_SETTINGS), "full": dict(_SETTINGS)}  # weights only: no images, nothing to scale up


def run(session, cfg: dict) -> dict:
    name, bits = cfg["model"], cfg["bits"]
    model, spec = session.model(name)
    orig, _ = session.quantized(name, "original", bits)
    comp, report = session.quantized(name, "dfmpc", bits, **DFMPC_SETTINGS)
    fp_mod, o_mod, c_mod = dict(model.named_modules()), dict(orig.named_modules()), dict(comp.named_modules())
    layers = {}
    for layer in cfg["layers"]:
        w_fp, w_o, w_c = fp_mod[layer].weight, o_mod[layer].weight, c_mod[layer].weight
        m = float(max(w.detach().abs().max() for w in (w_fp, w_o, w_c)))
        c = report.compensation.get(layer)
        layers[layer] = {"fp32": weight_histogram(w_fp, cfg["bins"], (-m, m)),
                         "before": weight_histogram(w_o, cfg["bins"], (-m, m)),
                         "after": weight_histogram(w_c, cfg["bins"], (-m, m)),
                         "c_mean": None if c is None else float(c.mean())}
    every = []
    for lr in (lr for lr in report.layers if lr.role == "high"):
        before, after = o_mod[lr.name].weight.detach().double(), c_mod[lr.name].weight.detach().double()
        every.append({"layer": lr.name, "mean_before": float(before.mean()), "mean_after": float(after.mean()),
                      "std_before": float(before.std()), "std_after": float(after.std()),
                      "c_mean": lr.c_mean, "closer_to_zero": abs(float(after.mean())) < abs(float(before.mean()))})
    return {"model": name, "weights": spec.weights, "bits": bits, "dfmpc_settings": DFMPC_SETTINGS, "layers": layers,
            "high_layers": every, "closer_to_zero": sum(r["closer_to_zero"] for r in every),
            "high_layer_count": len(every)}
