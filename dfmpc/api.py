"""The three-line API: ``qmodel, report = dfmpc.quantize(model, bits="2/6", lambda1=0.5, lambda2=0.0)``."""
from __future__ import annotations

from torch import nn

from .errors import DfmpcError
from .methods import METHODS

__all__ = ["quantize"]


def quantize(model: nn.Module, bits="2/6", method: str = "dfmpc", **settings):
    """Quantize the weights of ``model`` to layer-wise mixed precision; return ``(qmodel, report)``.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (or pass ``pairs=``). Not modified
            unless ``inplace=True``.
        bits: ``"LOW/HIGH"`` (e.g. ``"2/6"``; 2 means ternary), with 2 <= LOW <= HIGH <= 8.
        method: a name from :data:`dfmpc.METHODS` (``"dfmpc"``, ``"original"``, ...).
        **settings: the method's settings, e.g. ``lambda1=0.5, lambda2=0.0`` for DF-MPC, and for all
            methods ``granularity`` ("tensor" | "channel"), ``unpaired`` ("high" | "low" | "fp32"),
            ``keep_fp32`` (layer names, "first", "last"), ``pairs``, ``inplace``.

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
    return transform.apply(model)
