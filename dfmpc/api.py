"""The three-line API: ``qmodel, report = dfmpc.quantize(model, bits="2/6", lambda1=0.5, lambda2=0.0)``."""
from __future__ import annotations

from torch import nn

from .errors import DfmpcError
from .methods import METHODS

__all__ = ["quantize"]


def quantize(model: nn.Module, bits="2/6", method: str = "dfmpc", act_bits=None, act_rule: str = "dfq",
             act_input_range=None, **settings):
    """Quantize the weights of ``model`` to layer-wise mixed precision; return ``(qmodel, report)``.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (or pass ``pairs=``). Not modified
            unless ``inplace=True``.
        bits: ``"LOW/HIGH"`` (e.g. ``"2/6"``; 2 means ternary), with 2 <= LOW <= HIGH <= 8.
        method: a name from :data:`dfmpc.METHODS` (``"dfmpc"``, ``"original"``, ...).
        **settings: the method's settings, e.g. ``lambda1=0.5, lambda2=0.0`` for DF-MPC, and for all
            methods ``granularity`` ("tensor" | "channel"), ``unpaired`` ("high" | "low" | "fp32"),
            ``keep_fp32`` (layer names, "first", "last"), ``pairs``, ``inplace``.
        act_bits: also quantize the activations to this many bits (2 to 8; None: fp32 activations, the paper's
            setting), per tensor and asymmetric, with ranges from the BatchNorm statistics
            (``dfmpc.activations``); the result is then a ``torch.fx.GraphModule`` and ``report.activations``
            lists every quantized tensor with its range; ``report.weights_model`` is the model before its activations
            were quantized, the one :func:`dfmpc.save_quantized` writes. ``act_rule``: "dfq" (beta +- 6 gamma, DFQ) or "mse".
            ``act_input_range``: (low, high) of the network's input (default: pixels in [0, 1] normalized by the
            ImageNet mean and std). A method that distils synthetic images (``zeroq``) calibrates the ranges on them
            (minimum and maximum of every tensor), as in its paper; ``act_rule`` does not apply to it.

    Returns:
        The quantized copy (a plain ``nn.Module`` with dequantized weights) and a
        :class:`dfmpc.report.QuantizationReport` listing what every layer got, the size and the time; its
        ``quantized`` holds the integer codes and scales, which :func:`dfmpc.save_quantized` packs into a file.
    """
    if method not in METHODS:
        raise DfmpcError(f"unknown method {method!r}; choose from {', '.join(METHODS)} (dfmpc methods lists them)")
    try:
        transform = METHODS[method](bits, **settings)
    except TypeError as exc:  # an unknown keyword: say which, not Python's wording
        raise DfmpcError(f"method {method!r} does not take that setting ({exc}); see help(dfmpc.quantize)") from None
    if act_bits is None:
        return transform.apply(model)
    from .activations import ACT_RULES, IMAGENET_INPUT_RANGE, check_act_bits, quantize_activations
    from .folding import integer_codes

    check_act_bits(act_bits)
    if act_rule not in ACT_RULES:
        raise DfmpcError(f"unknown act_rule {act_rule!r}; use one of {', '.join(ACT_RULES)}")
    qmodel, report = transform.apply(model)
    report.weights_model = qmodel  # what dfmpc.save_quantized writes: the file keeps weights, not activation ranges
    # ZeroQ calibrates the activation ranges on its distilled images, as its paper does (the same images as its weights)
    calibration = transform.distilled(model)[0] if getattr(transform, "uses_synthetic_data", False) else None
    qmodel, report.activations = quantize_activations(qmodel, act_bits, act_input_range or IMAGENET_INPUT_RANGE,
                                                      act_rule, calibration=calibration, codes=integer_codes(report))
    report.act_bits = act_bits
    return qmodel, report
