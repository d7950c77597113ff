"""A quantized model as a file a user can ship: integer codes packed at their bit width, in safetensors.

:func:`save_quantized` writes what :func:`dfmpc.quantize` made, :func:`load_quantized` turns the file back into
a module whose outputs are bit-identical to the quantized model's. The file is a safetensors container (no
pickle: loading runs no code from the file) with

* ``codes`` (uint8): for every quantized weight, in the order of the model's ``state_dict``, its integer codes
  at ``bits`` bits each, least significant bit first, padded to a whole byte per layer. Ternary codes
  {-1, 0, +1} are stored as {0, 1, 2} in 2 bits; k-bit codes {0 .. 2^k - 1} in k bits.
* one tensor per floating-point (and integer) dtype of the model, e.g. ``float32``: every number that is not
  a code, flattened in ``state_dict`` order: each quantized weight's scale(s) and the compensation vector
  multiplied into it (and, on an asymmetric grid, its zero points: under ``int16``), then every other parameter and
  buffer as it is (biases changed by a method, BatchNorm
  parameters and running statistics, layers kept in full precision). An integer dtype whose numbers are all
  zero (BatchNorm's ``num_batches_tracked`` in most models) is listed under ``zeros`` instead.
* metadata ``dfmpc`` (JSON): format and version, the model name, the method, its bits and settings, the plan
  (every weight layer's role, bits, partner, scale granularity, where its compensation went and whether it has
  zero points), the sizes of the report, provenance, a fingerprint of the ``state_dict`` layout, and one SHA-256
  over the metadata and every tensor (a changed or truncated file is refused).

The architecture is not in the file: it comes from the model name (``load_model(name, pretrained=False)``,
no download) or from ``model=``, a fresh full-precision instance, and the method's structural changes
(:meth:`~dfmpc.methods.base.QuantizationMethod.rebuild`, e.g. DFQ's folded BatchNorms) are applied to it.
Every weight is rebuilt by the same operations the method used (codes -> :meth:`QuantizedTensor.dequantize`,
then the compensation), and :func:`save_quantized` checks that this gives every weight bit for bit before it
writes anything.

Size: the codes and the 32-bit numbers the report counts (see :mod:`dfmpc.size`), plus what the paper's
convention leaves out: BatchNorm running statistics (two floats per channel, 3.6-3.7 % of the CIFAR ResNets at
2/6), a compensation vector that the report counts as folded into per-channel scales (dfmpc+'s classifier: one
float per class), and the header (about 0.7 KB plus some 35 bytes per weight layer). ResNet-20 and ResNet-56 at 2/6
with dfmpc+: 4.8 % and 4.2 % above ``report.size_mb`` (both in MB of 2^20 bytes).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import DfmpcError
from .packed_header import PlanRow, check_metadata, check_plan, decode_plan, encode_plan, read_header
from .placement import input_channel_multiplier
from .quantizers import QuantizedTensor

__all__ = ["FORMAT", "FORMAT_VERSION", "save_quantized", "load_quantized", "read_info", "read_quantized", "pack_codes",
           "unpack_codes", "encode_plan", "decode_plan", "PlanRow"]

FORMAT, FORMAT_VERSION = "dfmpc-packed", 1
_CHUNK = 2**20  # codes packed per step (a multiple of 8, so every chunk ends on a byte boundary)


def pack_codes(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers below 2^bits -> uint8 bytes holding ``bits`` bits each, least significant first."""
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    out = [np.packbits(np.unpackbits(v[i:i + _CHUNK, None], axis=1, count=bits, bitorder="little").reshape(-1),
                       bitorder="little") for i in range(0, v.size, _CHUNK)]
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_codes`: ``count`` values of ``bits`` bits as uint8."""
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count * bits, bitorder="little")
    return np.packbits(planes.reshape(count, bits), axis=1, bitorder="little").reshape(-1)


def _packed_bytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (``torch.equal`` takes -0.0 for 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def _fingerprint(state: dict) -> str:
    """The layout of a state dict (names, shapes, dtypes), hashed: the names themselves would add kilobytes to a
    file of 150 KB; the plan keeps those of the weight layers."""
    layout = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in state.items())
    return hashlib.sha256(layout.encode()).hexdigest()[:16]


def _apply_factor(layer: nn.Module, weight: torch.Tensor, factor: str | None, c: torch.Tensor | None) -> torch.Tensor:
    """The weight after the compensation the method multiplied into it: DF-MPC's c per input channel (Eq. 7),
    dfmpc+'s c per output channel (a layer without a BatchNorm after it), or none."""
    if factor == "in":
        return weight * input_channel_multiplier(layer, c)
    if factor == "out":
        return weight * c.reshape(-1, *([1] * (weight.dim() - 1)))
    return weight


def _rebuilt_weight(name: str, layer: nn.Module, q: QuantizedTensor, weight: torch.Tensor, factor: str | None, c):
    """The compensation vector to store for ``name`` (None without one), after checking that the saved ``weight`` is
    exactly its codes times its scales times the compensation the report says went into it (``factor``)."""
    if factor is None:
        c = None  # a vector folded elsewhere (a BatchNorm) is in the state that is stored as it is
    else:
        if c is None:
            raise DfmpcError(f"the report says layer {name!r} has a compensation vector in its weight but holds none; "
                             "pass the report dfmpc.quantize returned with the model")
        c = c.detach().to("cpu", weight.dtype)
    dequantized = q.dequantize().to("cpu", weight.dtype)  # the same operations as at loading, on the CPU
    try:
        exact = _same_bits(_apply_factor(layer, dequantized, factor, c), weight)
    except RuntimeError:  # a vector of the wrong length
        exact = False
    if not exact:
        raise DfmpcError(f"the weight of layer {name!r} is not its integer codes times its scales (and compensation); "
                         "save the model exactly as dfmpc.quantize returned it, with its report")
    return c


def _architecture(meta: dict, model: nn.Module | None) -> nn.Module:
    """A fresh full-precision model of the saved architecture, with the method's structural changes."""
    from .methods import METHODS

    if model is not None:
        if not isinstance(model, nn.Module):
            raise DfmpcError(f"model= must be a torch.nn.Module (a fresh instance of the architecture), "
                             f"got {type(model).__name__}")
        arch = copy.deepcopy(model).cpu()
    elif meta.get("model"):
        from .models import load_model

        arch = load_model(meta["model"], pretrained=False)[0]
    else:
        raise DfmpcError("the file names no architecture (it was saved from a model of your own); pass model= a "
                         "fresh instance of it: dfmpc.load_quantized(path, model=MyNet())")
    if meta["method"] not in METHODS:
        raise DfmpcError(f"the file was written by method {meta['method']!r}, which this dfmpc does not know; "
                         f"it knows {', '.join(METHODS)}")
    try:
        method = METHODS[meta["method"]](meta["bits"], **meta["settings"])
    except (TypeError, DfmpcError) as e:
        raise DfmpcError(f"the file's settings of {meta['method']} are not ones this dfmpc takes ({e})") from None
    with torch.no_grad():
        arch = method.rebuild(arch) or arch
    modules = dict(arch.named_modules())
    for row in meta["plan"]:
        name, layer = row.name, modules.get(row.name)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            what = "has no layer" if layer is None else f"has a {type(layer).__name__}, not a Conv2d/Linear, as layer"
            raise DfmpcError(f"the model {what} {name!r} that the file quantized: it was saved from another "
                             f"architecture than {meta.get('model') or type(arch).__name__}")
        if row.has_bias and layer.bias is None:  # bias correction gave a bias-free layer one
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
    planned = {row.name for row in meta["plan"]}
    unplanned = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in planned]
    if unplanned:
        raise DfmpcError(f"the file's field 'plan' leaves out layer {unplanned[0]!r} of "
                         f"{meta.get('model') or type(arch).__name__} (expected every Conv2d/Linear layer): it was "
                         "saved from another architecture; load it with the architecture it was saved from")
    return arch


def _check_layout(meta: dict, state: dict, what: str) -> None:
    if _fingerprint(state) != meta["state"].get("fingerprint"):
        raise DfmpcError(f"{what} does not fit the file: the file holds {meta['state'].get('tensors')} tensors saved from "
                         f"{meta.get('model') or 'a model of your own'}, the architecture here has {len(state)} "
                         "whose names or shapes differ; load it with the architecture it was saved from")


def save_quantized(qmodel: nn.Module, report, path: str | os.PathLike, model_name: str | None = None,
                   provenance: dict | None = None) -> int:
    """Write ``qmodel`` (from ``dfmpc.quantize``, with its ``report``) to ``path`` packed; return the bytes written.

    ``model_name``: the ``dfmpc models`` name of the architecture, so that :func:`load_quantized` can rebuild it
    (None for a model of your own: load it with ``model=``). ``provenance``: JSON-serializable facts to keep
    with it (where the weights came from, the accuracy measured, ...). The model is not modified.
    """
    if not isinstance(qmodel, nn.Module):
        raise DfmpcError(f"expected the quantized torch.nn.Module, got {type(qmodel).__name__}")
    quantized = getattr(report, "quantized", None)
    if not quantized:
        raise DfmpcError("the report holds no integer codes; pass the report dfmpc.quantize returned with the model")
    modules = dict(qmodel.named_modules())
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    rows, packed, factors = [], {}, {}
    for lr in report.layers:
        layer = modules.get(lr.name)
        if layer is None or f"{lr.name}.weight" not in state:
            raise DfmpcError(f"the model has no layer {lr.name!r} of its report; pass the model and report that "
                             "dfmpc.quantize returned together")
        granularity = factor = None
        if lr.bits < 32:
            q = quantized.get(lr.name)
            if q is None or q.bits != lr.bits:
                raise DfmpcError(f"the report has no {lr.bits}-bit codes for layer {lr.name!r}; pass the report "
                                 "dfmpc.quantize returned with the model")
            factor = lr.weight_factor  # where the method put it, as its record says: nothing is inferred
            c = _rebuilt_weight(lr.name, layer, q, state[f"{lr.name}.weight"], factor, report.compensation.get(lr.name))
            packed[f"{lr.name}.weight"], factors[lr.name], granularity = q, c, q.granularity
        zero_point = lr.bits < 32 and quantized[lr.name].zero_point is not None
        rows.append(PlanRow(lr.name, lr.role, lr.bits, lr.partner, granularity, factor, layer.bias is not None,
                            zero_point))

    codes, blobs = [], {}
    for key, value in state.items():
        q = packed.get(key)
        if q is None:
            blobs.setdefault(value.dtype, []).append(value.reshape(-1))
            continue
        offset = 1 if q.is_ternary else 0  # ternary {-1, 0, 1} -> {0, 1, 2}
        codes.append(pack_codes((q.codes.cpu().to(torch.int16) + offset).numpy(), q.bits))
        numbers = [q.scale.detach().cpu().to(value.dtype).reshape(-1)]
        c = factors[key[:-len(".weight")]]
        blobs.setdefault(value.dtype, []).extend(numbers + ([] if c is None else [c.reshape(-1)]))
        if q.zero_point is not None:
            blobs.setdefault(torch.int16, []).append(q.zero_point.detach().cpu().to(torch.int16).reshape(-1))
    tensors = {"codes": torch.from_numpy(np.concatenate(codes) if codes else np.zeros(0, np.uint8))}
    tensors.update({str(dtype).replace("torch.", ""): torch.cat(parts) for dtype, parts in blobs.items()})
    # a dtype whose numbers are all zero is left out (BatchNorm's num_batches_tracked, in most models)
    zeros = sorted(k for k, t in tensors.items() if k != "codes" and not t.is_floating_point() and not t.any())
    tensors = {k: t for k, t in tensors.items() if k not in zeros}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "dfmpc": __version__, "torch": torch.__version__,
            "model": model_name, "method": report.method, "bits": report.bits, "settings": report.settings,
            "size_mb": round(report.size_mb, 6), "fp32_size_mb": round(report.fp32_size_mb, 6), "zeros": zeros,
            "plan": encode_plan(rows),
            "state": {"tensors": len(state), "fingerprint": _fingerprint(state)}, "provenance": provenance or {}}
    try:
        meta["sha256"] = _digest(tensors, meta)
    except TypeError as e:  # json.dumps: provenance that is not JSON
        raise DfmpcError(f"provenance must be JSON data (str, numbers, lists, dicts): {e}") from None
    if model_name is not None:  # fail now, not when someone loads the file
        arch = _architecture({**meta, "plan": rows}, None)
        _check_layout(meta, arch.state_dict(), f"model {model_name!r}")
    return _write(tensors, meta, Path(path).expanduser())


def _digest(tensors: dict, meta: dict) -> str:
    """One SHA-256 over the metadata (but this digest; as sorted, compact JSON) and every tensor's name and bytes."""
    fields = {k: v for k, v in meta.items() if k != "sha256"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write(tensors: dict, meta: dict, path: Path) -> int:
    """Write through a temporary file beside ``path``: a failure leaves no half-written file."""
    from safetensors.torch import save

    data = save(tensors, metadata={"dfmpc": json.dumps(meta, separators=(",", ":"))})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise DfmpcError(f"cannot write {str(path)!r} ({e.strerror or type(e).__name__}); give a path in a "
                         "writable folder") from None
    finally:
        tmp.unlink(missing_ok=True)
    return len(data)


def _read(path: str | os.PathLike) -> tuple[dict, dict]:
    """The metadata and tensors of a packed file: the header and every metadata field checked
    (:mod:`dfmpc.packed_header`) before any tensor is read, then every tensor against the SHA-256."""
    from safetensors import SafetensorError, safe_open

    from .methods import METHODS

    meta, entries, _size = read_header(path)
    check_metadata(meta, entries, path, METHODS, FORMAT_VERSION)
    try:
        rows = decode_plan(meta["plan"])
    except (KeyError, ValueError, TypeError, IndexError):
        raise DfmpcError(f"{str(path)!r} is not a file this dfmpc wrote: its field 'plan' cannot be read (expected "
                         "layers, bits, pairs, roles, scales, compensation, bias and zero points of equal lengths); "
                         "write it again")\
            from None
    check_plan(rows, meta["bits"], meta["settings"].get("unpaired", "high"), path)
    try:  # every tensor lies inside the file (read_header checked it): what this allocates is at most its size
        with safe_open(str(Path(path).expanduser()), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise DfmpcError(f"{str(path)!r} is damaged (unreadable safetensors: {reason}); write it again") from None
    if _digest(tensors, meta) != meta["sha256"]:
        raise DfmpcError(f"{str(path)!r} is damaged: its contents do not match their checksum (modified or corrupted "
                         "after it was written); write it again")
    meta["plan"] = rows
    return meta, tensors


def read_info(path: str | os.PathLike) -> dict:
    """The metadata of a packed file, checked: model, method, bits, settings, sizes, provenance, and the plan as
    one tuple per weight layer (name, role, bits, partner, scale granularity, compensation "in"/"out", has bias,
    has zero points)."""
    return _read(path)[0]


def load_quantized(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The quantized model saved in ``path`` (by :func:`save_quantized` or ``dfmpc quantize --save``), in eval
    mode on the CPU; its outputs are bit-identical to those of the model that was saved.

    ``model``: a fresh full-precision instance of the architecture, for a file saved without a model name
    (or to override it); it is copied, not modified.
    """
    meta, tensors = _read(path)
    arch = _architecture(meta, model)
    state = arch.state_dict()
    _check_layout(meta, state, "model= " + type(model).__name__ if model is not None else f"model {meta['model']!r}")
    arch.load_state_dict(_unpacked_state(meta, tensors, arch, state), strict=True)
    return arch.eval()


def read_quantized(path: str | os.PathLike, model: nn.Module) -> dict[str, QuantizedTensor]:
    """Layer name -> the :class:`QuantizedTensor` (codes, scales, zero points) of every quantized weight in a
    ``.dfmpc`` file; ``model``: what :func:`load_quantized` returned for it (its ``state_dict`` is the file's
    layout). The file is checked as :func:`load_quantized` checks it."""
    meta, tensors = _read(path)
    state = model.state_dict()
    _check_layout(meta, state, f"model= {type(model).__name__}")
    quantized = {}
    _unpacked_state(meta, tensors, model, state, quantized)
    return quantized


def _unpacked_state(meta: dict, tensors: dict, arch: nn.Module, state: dict, quantized: dict | None = None) -> dict:
    """The state dict of the quantized model: codes dequantized, compensation applied, everything else as saved;
    every layer's :class:`QuantizedTensor` goes into ``quantized`` where it is given."""
    modules = dict(arch.named_modules())
    layers = {f"{row.name}.weight": row for row in meta["plan"] if row.bits < 32}
    blobs = {name: t for name, t in tensors.items() if name != "codes"}
    offsets = dict.fromkeys(tensors, 0)
    codes = tensors["codes"].numpy()

    def damaged(tensor: str, holds: int, needs: str) -> DfmpcError:
        return DfmpcError(f"the file's tensor {tensor!r} holds {holds:,} numbers, its plan and architecture need "
                          f"{needs} (damaged, or written by another dfmpc); write it again")

    def take(dtype: torch.dtype, count: int) -> torch.Tensor:
        name = str(dtype).replace("torch.", "")
        if name in meta["zeros"]:
            return torch.zeros(count, dtype=dtype)
        start = offsets.get(name, 0)
        if name not in blobs or start + count > blobs[name].numel():
            raise damaged(name, blobs[name].numel() if name in blobs else 0, f"more than {start + count - 1:,}")
        offsets[name] = start + count
        return blobs[name][start:start + count]

    out = {}
    for key, ref in state.items():
        row = layers.get(key)
        if row is None:
            out[key] = take(ref.dtype, ref.numel()).reshape(ref.shape).clone()
            continue
        name, bits, granularity, factor = row.name, row.bits, row.granularity, row.factor
        count, nbytes = ref.numel(), _packed_bytes(ref.numel(), bits)
        if offsets["codes"] + nbytes > codes.size:
            raise damaged("codes", codes.size, f"more than {offsets['codes'] + nbytes - 1:,}")
        values = unpack_codes(codes[offsets["codes"]:offsets["codes"] + nbytes], bits, count)
        offsets["codes"] += nbytes
        if bits == 2 and values.max(initial=0) > 2:
            raise DfmpcError(f"layer {name!r} has ternary codes outside {{-1, 0, +1}}: the file is damaged")
        level = torch.from_numpy(values.astype(np.int16) - (1 if bits == 2 else 0))
        scale = take(ref.dtype, 1 if granularity == "tensor" else ref.shape[0]).clone()
        layer = modules[name]
        c = None if factor is None else take(ref.dtype, {"in": layer.weight.shape[1] * getattr(layer, "groups", 1),
                                                           "out": ref.shape[0]}[factor]).clone()
        zero_point = take(torch.int16, ref.shape[0]).clone() if row.zero_point else None
        q = QuantizedTensor(codes=level.to(torch.int8 if bits <= 7 else torch.int16).reshape(ref.shape),
                            scale=scale.reshape(()) if granularity == "tensor" else scale, bits=bits,
                            granularity=granularity, zero_point=zero_point)
        if quantized is not None:
            quantized[name] = q
        out[key] = _apply_factor(layer, q.dequantize().to(ref.dtype), factor, c)
    for name, t in tensors.items():
        if offsets[name] != t.numel():
            raise damaged(name, t.numel(), f"{offsets[name]:,}")
    return out
