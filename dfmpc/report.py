"""What a quantization method did to every layer, and what the result costs: the record that the file format
(:mod:`dfmpc.packed`) writes without guessing: every layer's role, bits, codes and scales (``quantized``), where its
compensation went, and the method's settings."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields

__all__ = ["LayerReport", "QuantizationReport"]


@dataclass(frozen=True)
class LayerReport:
    name: str
    kind: str  # "Conv2d" | "Linear"
    shape: tuple[int, ...]
    role: str  # "low" | "high" | "unpaired" | "fp32"
    bits: int  # 32 = full precision
    partner: str | None = None
    c_min: float | None = None  # compensation vector of a high layer (Eq. 7), when there is one
    c_mean: float | None = None
    c_max: float | None = None
    granularity: str | None = None  # "tensor" | "channel": the scales of its integer codes (None: fp32)
    weight_factor: str | None = None  # "in" | "out": its compensation vector multiplied into its weight along that axis
    changed: tuple[str, ...] = ()  # what its compensation or correction changed: "<layer>.weight", a BatchNorm, ...
    details: dict = field(default_factory=dict)  # what the method fitted for this layer, e.g. dfmpc+'s "rho"


@dataclass
class QuantizationReport:
    method: str
    bits: str
    settings: dict
    layers: list[LayerReport]
    pairs: list[tuple[str, str]]
    size_mb: float
    fp32_size_mb: float
    seconds: float
    compensation: dict = field(default_factory=dict, repr=False)  # high layer name -> c (torch tensor)
    # layer name -> QuantizedTensor: the integer codes and scales behind every quantized weight, which
    # dfmpc.save_quantized packs at their bit width
    quantized: dict = field(default_factory=dict, repr=False)
    # set by dfmpc.quantize(act_bits=...): the activations' bits, every quantized tensor with its range
    # (dfmpc.activations), and the model before its activations were quantized (what dfmpc.save_quantized writes)
    act_bits: int | None = None
    activations: list = field(default_factory=list, repr=False)
    weights_model: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        # the tensors and the model stay out: a plain, JSON-ready record (asdict would also deep-copy the model)
        skip = {"compensation", "quantized", "weights_model"}
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
        d["layers"] = [asdict(lr) for lr in self.layers]
        return d

    def table(self) -> str:
        """One line per weight layer: role, bits, partner and the compensation it got."""
        rows = [("layer", "kind", "role", "bits", "partner", "c min/mean/max")]
        for lr in self.layers:
            c = "" if lr.c_mean is None else f"{lr.c_min:.3f}/{lr.c_mean:.3f}/{lr.c_max:.3f}"
            rows.append((lr.name, lr.kind, lr.role, "fp32" if lr.bits == 32 else str(lr.bits), lr.partner or "", c))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)

    def __str__(self) -> str:
        head = (f"{self.method} {self.bits}: {len(self.pairs)} pairs, {len(self.layers)} weight layers, "
                f"{self.size_mb:.2f} MB (fp32 {self.fp32_size_mb:.2f} MB), {self.seconds:.3f} s")
        return head + "\n" + self.table()
