"""The shared skeleton of every weight-quantization method: copy, plan, quantize, adjust, report.

A method is a small class (one file each, in the style of brevitas' graph transforms): its
settings go to the constructor, which checks them once, and ``apply(model)`` returns
``(quantized_model, report)``. The input model is never modified unless ``inplace=True``, and the method
object is not changed by ``apply``: what one call learns (moments, fitted parameters, split layers, where a
compensation went) lives in a :class:`Run` that ``apply`` creates, hands to every hook, and turns into the
report. Subclasses override the hooks:

* :meth:`prepare` -- change the full-precision model before quantizing (e.g. equalization);
* :meth:`quantize_layer` -- how one weight is quantized (default: the paper's quantizers);
* :meth:`adjust` -- change the quantized model afterwards (e.g. DF-MPC's compensation), and record in the
  run where every vector went (:meth:`Run.multiplied_into`, :meth:`Run.folded_into`);
* :meth:`rebuild` -- the structural changes of :meth:`prepare` (modules replaced, BatchNorms folded) on a
  fresh full-precision model, so that :func:`dfmpc.load_quantized` can load a saved quantized model into it;
* :meth:`size_model` -- which model's weight shapes the reported size counts (OCS's added channels).
"""
from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import torch
from torch import nn

from ..catalog import METHOD_REGISTRY
from ..errors import DfmpcError
from ..plan import UNPAIRED_POLICIES, MixedPrecisionPlan, plan_layers
from ..quantizers import GRANULARITIES, QuantizedTensor, quantize_weight
from ..report import LayerReport, QuantizationReport
from ..size import MIB, fp32_size_mb, quantized_size_mb

__all__ = ["QuantizationMethod", "Run"]


class _Registered:
    """A class attribute taken from the method's entry in :data:`dfmpc.catalog.METHOD_REGISTRY` (by ``name``)."""

    def __init__(self, field: str, default):
        self.field, self.default = field, default

    def __get__(self, obj, owner):
        entry = METHOD_REGISTRY.get(owner.name)
        return self.default if entry is None else getattr(entry, self.field)


class Run(SimpleNamespace):
    """The scratch space of one ``apply`` call: what :meth:`QuantizationMethod.prepare` learns for the other hooks
    (any attribute a method sets), and the record of what was done, which the report carries:

    * ``weight_factors``: layer -> "in" or "out", for a compensation vector multiplied into that layer's weight
      per input channel (DF-MPC's c, Eq. 7) or per output channel;
    * ``changed_modules``: layer -> the modules its compensation or correction changed besides its weight (the
      BatchNorm it was folded into, the layer whose bias was corrected);
    * ``stored``: layer -> floats stored for its compensation (counted in the model size);
    * ``details``: layer -> what the method fitted for it (dfmpc+'s kernel correlation "rho", ...);
    * ``reused_seconds``: seconds of work this call reused instead of redoing (ZeroQ's cached distillation),
      counted in the reported time.
    """

    def __init__(self, **kwargs):
        super().__init__(weight_factors={}, changed_modules={}, stored={}, details={}, reused_seconds=0.0, **kwargs)

    def multiplied_into(self, layer: str, axis: str) -> None:
        """A compensation vector was multiplied into ``layer``'s weight along ``axis`` ("in" or "out")."""
        self.weight_factors[layer] = axis
        self.changed_modules.setdefault(layer, []).append(f"{layer}.weight")

    def folded_into(self, layer: str, module: str) -> None:
        """``layer``'s compensation or correction changed ``module`` (a BatchNorm, or a layer's bias)."""
        self.changed_modules.setdefault(layer, []).append(module)


class QuantizationMethod:
    name = "base"
    #: both read from the one registry, :data:`dfmpc.catalog.METHOD_REGISTRY`, by the method's name
    description = _Registered("description", "")
    needs_pairs = False
    #: True for a method that calibrates on images it generates (ZeroQ): not data-free in the paper's strict
    #: sense, so tables keep it apart from the data-free methods.
    uses_synthetic_data = _Registered("synthetic_data", False)

    def __init__(self, bits="2/6", granularity: str = "tensor", unpaired: str = "high", keep_fp32=(),
                 pairs=None, inplace: bool = False):
        if granularity not in GRANULARITIES:
            raise DfmpcError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if unpaired not in UNPAIRED_POLICIES:
            raise DfmpcError(f"unknown unpaired policy {unpaired!r}; use one of {', '.join(UNPAIRED_POLICIES)}")
        keep = (keep_fp32,) if isinstance(keep_fp32, str) else keep_fp32
        if not isinstance(keep, (list, tuple)) or not all(isinstance(k, str) for k in keep):
            raise DfmpcError(f"keep_fp32 takes 'first', 'last' or layer names, got {keep_fp32!r}")
        self.bits = bits
        self.granularity = granularity
        self.unpaired = unpaired
        self.keep_fp32 = tuple(keep)
        self.pairs = pairs
        self.inplace = inplace

    # --- hooks -------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {"granularity": self.granularity, "unpaired": self.unpaired, "keep_fp32": list(self.keep_fp32)}

    def revise_plan(self, model: nn.Module, plan: MixedPrecisionPlan, run: Run) -> MixedPrecisionPlan:
        """The plan to quantize by: a method may give a pair's layers other roles (``dfmpc+``'s ``low_layer``).
        Default: the plan as found (layer l of every pair low, the paper's order)."""
        return plan

    def prepare(self, model: nn.Module, plan: MixedPrecisionPlan, run: Run) -> nn.Module | None:
        """Modify the full-precision copy before quantization; may return a replacement with the same layer
        names (e.g. its traced graph). Default: nothing."""

    def quantize_layer(self, name: str, weight: torch.Tensor, bits: int, run: Run) -> QuantizedTensor:
        return quantize_weight(weight, bits, self.granularity)

    def adjust(self, model: nn.Module, plan: MixedPrecisionPlan, fp_weights: dict[str, torch.Tensor],
               quantized: dict[str, QuantizedTensor], run: Run) -> dict[str, torch.Tensor]:
        """Modify the quantized model; return compensation vectors (high layer name -> c). Default: none."""
        return {}

    def rebuild(self, model: nn.Module) -> nn.Module:
        """``model`` (a fresh full-precision copy of the architecture) with the modules this method's quantized
        models have: the same names, types and parameters, whatever their values. Default: unchanged."""
        return model

    def size_model(self, model: nn.Module, qmodel: nn.Module) -> nn.Module:
        """The model whose weight shapes the report's size and layer shapes count: the input ``model`` by default;
        a method that stores more weights than the original has (OCS's split channels) returns ``qmodel``."""
        return model

    def compensation_storage(self, compensation: dict[str, torch.Tensor], run: Run) -> dict[str, int]:
        """Floats stored for the compensation vectors, per layer (counted in the model size)."""
        return {k: v.numel() for k, v in compensation.items()}

    # --- the skeleton ------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> tuple[nn.Module, QuantizationReport]:
        if not isinstance(model, nn.Module):
            raise DfmpcError(f"expected a torch.nn.Module, got {type(model).__name__}")
        for pname, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise DfmpcError(f"parameter {pname!r} contains NaN or inf; fix the model's weights before quantizing")
        start = time.perf_counter()
        qmodel = model if self.inplace else copy.deepcopy(model)
        plan = plan_layers(qmodel, self.bits, self.unpaired, self.keep_fp32, self.pairs, require_pairs=self.needs_pairs)
        run = Run()
        with torch.no_grad():
            plan = self.revise_plan(qmodel, plan, run)
            qmodel = self.prepare(qmodel, plan, run) or qmodel
            modules = dict(qmodel.named_modules())
            fp_weights, quantized = {}, {}
            for a in plan.layers:
                if a.bits >= 32:
                    continue
                layer = modules[a.name]
                fp_weights[a.name] = layer.weight.detach().clone()
                quantized[a.name] = self.quantize_layer(a.name, fp_weights[a.name], a.bits, run)
                layer.weight.copy_(quantized[a.name].dequantize())
            compensation = self.adjust(qmodel, plan, fp_weights, quantized, run)
        seconds = time.perf_counter() - start + run.reused_seconds
        return qmodel, self._report(model, plan, compensation, seconds, self.size_model(model, qmodel), run, quantized)

    def _report(self, model, plan, compensation, seconds, sized, run, quantized) -> QuantizationReport:
        modules, stored = dict(model.named_modules()), dict(sized.named_modules())  # stored: see size_model
        layers = []
        for a in plan.layers:
            m, shape = modules[a.name], tuple(stored[a.name].weight.shape)
            c = compensation.get(a.name)
            stats = {} if c is None else {"c_min": float(c.min()), "c_mean": float(c.mean()), "c_max": float(c.max())}
            q = quantized.get(a.name)
            layers.append(LayerReport(name=a.name, kind=type(m).__name__, shape=shape, role=a.role,
                                      bits=a.bits, partner=a.partner, **stats,
                                      granularity=None if q is None else q.granularity,
                                      weight_factor=run.weight_factors.get(a.name),
                                      changed=tuple(run.changed_modules.get(a.name, ())),
                                      details=dict(run.details.get(a.name, {}))))
        size = quantized_size_mb(sized, plan.bits_by_layer(), self.granularity,
                                 self.compensation_storage(compensation, run))
        size += sum(q.zero_point_bits for q in quantized.values()) / MIB  # an asymmetric grid's zero points
        return QuantizationReport(method=self.name, bits=f"{plan.low_bits}/{plan.high_bits}", settings=self.settings(),
                                  layers=layers, pairs=[(p.low, p.high) for p in plan.pairs], size_mb=size,
                                  fp32_size_mb=fp32_size_mb(model), seconds=seconds, compensation=compensation,
                                  quantized=quantized)
