"""Weights and activations quantized: every method at W2/6-A8, W4-A8, W4-A4 and W8-A8, on the test half.

DF-MPC and the data-free baselines quantize weights only; an engine also quantizes the activations. Every method
here quantizes the weights with its own default settings (as in the comparison), then the activations are
quantized the same way for all (:mod:`dfmpc.activations`: per tensor, asymmetric, the network's input at the
fixed range of its normalization, every other range from the BatchNorm statistics, no data; the classifier's
logits in fp32), and the model runs with the engine's arithmetic (BatchNorms folded, int32 biases). A config
``W4-A4 mse`` uses the expected-error range rule instead of DFQ's beta +- 6 gamma.

Rows: model, config (weight bits, activation bits, range rule), method, top-1 (or agreement with fp32 where the
labels are not the model's classes), agreement with fp32, and the weight-only top-1 of the same method and bits
(``weights_only_top1``, where ``weights_only`` is set: it costs one more evaluation per method and weight bits)
so that the cost of quantizing the activations reads off one row.
"""
from __future__ import annotations

from ..errors import DfmpcError
from ..methods import METHODS, settings_for_model
from ..plan import parse_bits

__all__ = ["NAME", "TITLE", "BOOK_PRESET", "SETTINGS", "METHODS_SETTING", "PAPER", "PAPER_NOTE", "CONFIGS", "parse_config", "run",
           "format_table"]

NAME = "wa"
TITLE = "Weights and activations: W2/6-A8, W4-A8, W4-A4, W8-A8 for every method"
BOOK_PRESET = "full"
CONFIGS = ["W2/6-A8", "W4-A8", "W4-A4", "W4-A4 mse", "W8-A8"]
#: The setting that lists the methods measured: one method's rows can be rerun alone (:mod:`.merge`).
METHODS_SETTING = "methods"
SETTINGS = {
    # CI: seconds; three methods on 100 images
    "quick": {"models": ["resnet20_cifar10_a"], "images": 100, "split": "test", "configs": CONFIGS,
              "methods": ["original", "dfq", "dfmpc+"], "weights_only": True},
    # what a shared 2-core CPU runs in under an hour: the CIFAR-10 ResNets on their whole test half, without the mse rule
    "full": {"models": ["resnet20_cifar10_a", "resnet56_cifar10_a"], "images": None, "split": "test",
             "configs": CONFIGS[:3] + CONFIGS[4:],
             "methods": list(METHODS), "weights_only": False},
}
PAPER = None
#: Why no paper figure stands beside ours: the W/A results of the methods' papers (DFQ's W8-A8, ZeroQ's and
#: SQuant's W4-A8 / W4-A4) are on ImageNet models whose weights are not in the offline data folder, and the
#: DF-MPC paper reports weights-only results (Section 5, "MP2/6 weights and FP32 activations").
PAPER_NOTE = ("no method's paper reports a W/A figure for a model measured here: DFQ, ZeroQ and SQuant report theirs "
              "on ImageNet models whose weights are not offline, and DF-MPC quantizes weights only")


def parse_config(config: str) -> tuple[str, int, str]:
    """"W2/6-A8" -> ("2/6", 8, "dfq"); "W4-A4 mse" -> ("4/4", 4, "mse")."""
    text, _, rule = config.strip().partition(" ")
    try:
        w, a = text.split("-")
        if not (w.startswith("W") and a.startswith("A")):
            raise ValueError
        bits = "{}/{}".format(*parse_bits(w[1:] if "/" in w else f"{w[1:]}/{w[1:]}"))
        act_bits = int(a[1:])
    except (ValueError, DfmpcError):
        raise DfmpcError(f"a W/A config reads like 'W2/6-A8' or 'W4-A4 mse', got {config!r}") from None
    return bits, act_bits, rule or "dfq"


def run(session, cfg: dict) -> dict:
    from tqdm import tqdm

    from ..activations import input_range_of
    from .compare import standard_error

    configs = [(c, *parse_config(c)) for c in cfg["configs"]]
    for name in cfg["methods"]:
        if name not in METHODS:
            raise DfmpcError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    out = {"configs": [c[0] for c in configs], "methods": list(cfg["methods"]), "models": [], "rows": [],
           "paper_note": PAPER_NOTE, "protocol": "every method's weights with its own defaults, then the same "
           "data-free activation quantization for all; engine arithmetic (BN folded, int32 biases)"}
    total = len(cfg["models"]) * len(configs) * len(cfg["methods"])
    with tqdm(total=total, desc="wa", unit="run", disable=not session.progress, leave=False) as bar:
        for name in cfg["models"]:
            model, spec = session.model(name)
            fp, record = session.predict(name, spec.dataset, cfg["images"], split=cfg["split"])
            out["models"].append({"model": name, "dataset": spec.dataset, "weights": spec.weights, "data": record,
                                  "images": record["images"], "fp32": fp.scores(),
                                  "input_range": list(input_range_of(spec.mean, spec.std))})
            weights_only = {}
            for config, bits, act_bits, rule in configs:
                for method in cfg["methods"]:
                    bar.set_postfix_str(f"{name} {config} {method}")
                    base = settings_for_model(method, spec)
                    if cfg["weights_only"] and (bits, method) not in weights_only:
                        pred, _ = session.predict(name, spec.dataset, cfg["images"], method, bits, cfg["split"], base)
                        weights_only[(bits, method)] = pred.top1_accuracy()
                    act = {"act_bits": act_bits, "act_rule": rule,
                           "act_input_range": tuple(input_range_of(spec.mean, spec.std))}
                    pred, _ = session.predict(name, spec.dataset, cfg["images"], method, bits, cfg["split"],
                                              {**base, **act})
                    top1 = pred.top1_accuracy()
                    out["rows"].append({"model": name, "config": config, "method": method, "bits": bits,
                                        "act_bits": act_bits, "act_rule": rule, "top1": top1,
                                        "top1_se": standard_error(top1, len(pred)),
                                        "agreement_with_fp32": pred.agreement(fp),
                                        "weights_only_top1": weights_only.get((bits, method)), "images": len(pred)})
                    bar.update(1)
    return out


def format_table(data: dict, model: str, field: str = "top1") -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one model: configs down, methods across, ``field`` in % (two decimals)."""
    res = data["results"]
    rows = [r for r in res["rows"] if r["model"] == model]
    methods = [m for m in res["methods"] if any(r["method"] == m for r in rows)]
    cell = {(r["config"], r["method"]): r[field] for r in rows}
    configs = [c for c in res["configs"] if any(r["config"] == c for r in rows)]
    return (["config", *methods],
            [[c] + [f"{cell[(c, m)]:.2f}" if (c, m) in cell else "" for m in methods] for c in configs])
