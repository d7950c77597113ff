"""What a packed ``.dfmpc`` file says about itself, checked before anything is built or allocated.

A ``.dfmpc`` file is data from wherever the user got it: its SHA-256 is a checksum against accidents, not a
signature (anyone can recompute it), so every field is checked against what this dfmpc writes before it is
used. :func:`read_header` reads the safetensors header itself (8 bytes of length, then JSON), so that

* a file that is not a safetensors container at all (a ``torch.save`` zip archive or pickle, gzip, an empty
  file, a folder) is told apart from a truncated one, with no code of the file run and no tensor read;
* the header may be at most :data:`MAX_HEADER_BYTES` long and every tensor must lie inside the file, so that
  what loading allocates is bounded by the file's size;
* the dfmpc metadata is checked against its schema (:func:`check_metadata`): the model is one that
  ``dfmpc models`` lists (nothing is parsed out of a name), the method is known and takes the settings, the
  bits are LOW/HIGH within 2..8, the plan is consistent with the bits and the unpaired policy.

Every refusal is one :class:`~dfmpc.errors.DfmpcError` naming the field and what was expected.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from .bits import MAX_BITS, MIN_BITS, parse_bits
from .catalog import MODELS
from .errors import DfmpcError

__all__ = ["MAX_HEADER_BYTES", "TENSOR_DTYPES", "LATER_SETTINGS", "PlanRow", "encode_plan", "decode_plan",
           "read_header", "check_metadata", "check_plan"]

#: a dfmpc header is a few kilobytes (the plan's layer names: about 35 bytes per weight layer); a larger one is
#: not a dfmpc file, and is refused before it is read
MAX_HEADER_BYTES = 16 * 2**20
#: safetensors dtype codes -> the names dfmpc gives its tensors ("codes" is uint8, the rest are named by dtype)
TENSOR_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
#: settings that methods gained after files of this format were first written, with the default those files ran at
LATER_SETTINGS = {"grid": "symmetric", "low_layer": "first"}
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FOREIGN = [  # the first bytes of files that people mistake for a quantized model, and what they are
    (b"PK\x03\x04", "a zip archive (the format of torch.save: a PyTorch checkpoint, not a dfmpc quantized model)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x89HDF", "an HDF5 file (a Keras model?)"),
]


def _foreign(head: bytes) -> str:
    """What a file that is not a safetensors container is, from its first bytes (for the message)."""
    for magic, what in _FOREIGN:
        if head.startswith(magic):
            return what
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (torch.save's legacy format: a PyTorch checkpoint, not a dfmpc quantized model)"
    return "not a safetensors file"


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """The dfmpc metadata (parsed JSON, unchecked), the tensor entries ``{name: (dtype, count)}`` and the file
    size, read without loading any tensor. Raises :class:`DfmpcError` for a folder, a missing, empty, truncated
    or foreign file."""
    path = Path(path).expanduser()
    name = repr(str(path))
    if path.is_dir():
        raise DfmpcError(f"{name} is a folder, not a quantized model file; pass the file that dfmpc quantize --save "
                         "or dfmpc.save_quantized wrote")
    if not path.exists():
        raise DfmpcError(f"quantized model file {name} does not exist; pass the file dfmpc quantize --save wrote")
    if not path.is_file():
        raise DfmpcError(f"{name} is not a regular file; pass the file dfmpc quantize --save wrote")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            length = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
            fits = 0 <= length <= min(size - 8, MAX_HEADER_BYTES)
            header = (head[8:] + f.read(length - 1)) if fits and length > 0 else b""
    except OSError as e:
        raise DfmpcError(f"cannot read {name} ({e.strerror or type(e).__name__}); check the file's permissions") from None
    bad = f"{name} is not a dfmpc quantized model file"
    if size == 0:
        raise DfmpcError(f"{name} is empty; write it again with dfmpc quantize --save")
    if not fits or not header.startswith(b"{"):
        if head[8:9] == b"{" and 0 < length <= MAX_HEADER_BYTES:  # a safetensors start, cut short
            raise DfmpcError(f"{name} is truncated: its header announces {length:,} bytes, the file has {size:,} in "
                             "all; copy or write it again")
        if size < 8:
            raise DfmpcError(f"{name} is truncated or not a dfmpc file ({size} bytes); write it again")
        raise DfmpcError(f"{bad}: it is {_foreign(head)}; pass the file dfmpc quantize --save wrote")
    try:
        parsed = json.loads(header.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: absurd nesting
        raise DfmpcError(f"{bad}: its safetensors header is not valid JSON; write it again") from None
    if not isinstance(parsed, dict):
        raise DfmpcError(f"{bad}: its safetensors header is not a JSON object; write it again")
    entries, end = {}, 0
    for key, entry in parsed.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = math.prod(int(s) for s in shape) if isinstance(shape, list) else -1
            ok = dtype in _ITEM_BYTES and all(isinstance(v, int) and v >= 0 for v in (*shape, start, stop))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or not isinstance(shape, list) or stop - start != count * _ITEM_BYTES[dtype]:
            raise DfmpcError(f"{name} is damaged: the entry of tensor {str(key)[:40]!r} in its header is malformed; "
                             "write it again")
        entries[key], end = (dtype, count), max(end, stop)
    if 8 + length + end > size:
        raise DfmpcError(f"{name} is truncated: its tensors need {8 + length + end:,} bytes, the file has {size:,}; "
                         "copy or write it again")
    metadata = parsed.get("__metadata__")
    try:
        meta = json.loads(metadata["dfmpc"])
        if not isinstance(meta, dict) or meta.get("format") != "dfmpc-packed":
            raise ValueError
    except (TypeError, KeyError, ValueError, RecursionError):
        raise DfmpcError(f"{bad} (a safetensors file without dfmpc metadata); write one with dfmpc.save_quantized or "
                         "dfmpc quantize --save") from None
    return meta, entries, size


def _field(path: Path, field: str, got, expected: str) -> DfmpcError:
    shown = repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return DfmpcError(f"{str(path)!r} is not a file this dfmpc wrote: its field {field!r} is {shown}, expected "
                      f"{expected}; write it again (or load it with the dfmpc that wrote it)")


def _plain(value, depth: int = 0) -> bool:
    """A setting's value as dfmpc writes it: a finite number, a string, a boolean, null, or a list of those
    (OCS's pairs: a list of lists)."""
    if isinstance(value, list):
        return depth < 2 and len(value) <= 4096 and all(_plain(v, depth + 1) for v in value)
    return value is None or isinstance(value, (str, bool, int)) or isinstance(value, float) and math.isfinite(value)


def check_metadata(meta: dict, entries: dict, path: str | os.PathLike, methods: dict, version: int):
    """Check every field of ``meta`` (what :func:`read_header` returned) against the schema of format
    ``version``; ``methods``: the registry (name -> class). Returns the method object the settings make."""
    path = Path(path)
    if meta.get("version") != version:
        raise DfmpcError(f"{str(path)!r} is version {meta.get('version')!r} of the dfmpc file format, written by dfmpc "
                         f"{meta.get('dfmpc', 'unknown')!r}; this dfmpc reads version {version} (use that dfmpc, or "
                         "write the file again)")
    types = {"model": (str, type(None)), "method": (str,), "bits": (str,), "settings": (dict,), "plan": (dict,),
             "zeros": (list,), "state": (dict,), "sha256": (str,), "provenance": (dict,)}
    for key, kinds in types.items():
        if not isinstance(meta.get(key), kinds):
            raise _field(path, key, meta.get(key), " or ".join("null" if k is type(None) else k.__name__ for k in kinds))
    if meta["model"] is not None and meta["model"] not in MODELS:
        raise _field(path, "model", meta["model"], "a name that `dfmpc models` lists (e.g. resnet56_cifar10_a)")
    if meta["method"] not in methods:
        raise _field(path, "method", meta["method"], f"one of {', '.join(methods)}")
    try:
        parse_bits(meta["bits"])
    except DfmpcError:
        raise _field(path, "bits", meta["bits"], "LOW/HIGH with 2 <= LOW <= HIGH <= 8, e.g. '2/6'") from None
    settings = meta["settings"]
    if not all(isinstance(k, str) and _plain(v) for k, v in settings.items()):
        raise _field(path, "settings", settings, "names with numbers, strings, booleans or short lists")
    cls = methods[meta["method"]]
    try:
        method = cls(meta["bits"], **settings)
        recorded = method.settings()
    except (TypeError, ValueError) as e:  # DfmpcError is a ValueError
        detail = str(e).split(";")[0][:80]
        raise _field(path, "settings", settings, f"the settings of method {meta['method']} ({detail})") from None
    # a setting added after a file could be written (LATER_SETTINGS) is absent from older files: they ran at its default
    later = {k: v for k, v in recorded.items() if k not in settings and LATER_SETTINGS.get(k, object()) == v}
    recorded = {k: v for k, v in recorded.items() if k not in later}
    if set(recorded) != set(settings) or json.dumps(recorded, sort_keys=True) != json.dumps(settings, sort_keys=True):
        raise _field(path, "settings", sorted(settings), f"the settings method {meta['method']} records "
                                                         f"({', '.join(sorted(recorded))})")
    if not all(isinstance(z, str) and z in TENSOR_DTYPES.values() for z in meta["zeros"]):
        raise _field(path, "zeros", meta["zeros"], f"dtype names among {', '.join(TENSOR_DTYPES.values())}")
    state = meta["state"]
    if not (isinstance(state.get("tensors"), int) and 0 <= state["tensors"] <= 100_000 and
            isinstance(state.get("fingerprint"), str) and re.fullmatch(r"[0-9a-f]{16}", state["fingerprint"])):
        raise _field(path, "state", state, "{'tensors': a count, 'fingerprint': 16 hex digits}")
    if not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]):
        raise _field(path, "sha256", meta["sha256"], "64 hex digits")
    if "codes" not in entries:
        raise _field(path, "tensors", sorted(entries), "a tensor 'codes' (uint8) and one tensor per dtype")
    for name, (dtype, _count) in entries.items():
        expected = "U8" if name == "codes" else next((k for k, v in TENSOR_DTYPES.items() if v == name), None)
        if dtype != expected:
            raise _field(path, "tensors", name, "'codes' (uint8) and one tensor per dtype, named by its dtype")
    return method


def check_plan(rows: list, bits: str, unpaired: str, path: str | os.PathLike) -> None:
    """The decoded plan (one :class:`dfmpc.packed.PlanRow` per layer) is one that
    ``bits`` and the ``unpaired`` policy give: low layers at LOW bits, high at HIGH, unpaired layers at the
    policy's bits, full-precision layers at 32, every low layer paired with one high layer, names unique."""
    low, high = parse_bits(bits)
    expected = {"low": {low}, "high": {high}, "unpaired": {{"high": high, "low": low}.get(unpaired, -1)},
                "fp32": {32}}
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise _field(Path(path), "plan", "a layer listed twice", "each weight layer once")
    roles = {r.name: r.role for r in rows}
    for r in rows:
        name, role, layer_bits, partner = r.name, r.role, r.bits, r.partner
        if layer_bits not in expected[role]:
            raise _field(Path(path), "plan", f"{name}: {role} at {layer_bits} bits",
                         f"{role} layers at {'/'.join(map(str, sorted(expected[role])))} bits for bits {bits!r} and "
                         f"unpaired {unpaired!r}")
        if role in ("low", "high") and roles.get(partner) != {"low": "high", "high": "low"}[role]:
            raise _field(Path(path), "plan", f"{name}: {role} layer paired with {partner!r}",
                         "every low layer paired with one high layer")


_ROLES = {"low": "l", "high": "h", "unpaired": "u", "fp32": "f"}
_GRANULARITIES = {"tensor": "t", "channel": "c", None: "-"}
_FACTORS = {"in": "i", "out": "o", None: "-"}


def encode_plan(rows: list[PlanRow]) -> dict:
    """The plan in few bytes (it is most of the header, and the header counts in the file size): the layer names,
    the bits, the pairs as indices, one letter per layer for the role (l/h/u/f), the scale granularity (t/c/-),
    the compensation multiplied into the weight (i: per input channel, o: per output channel, -) and the bias; and,
    only where a layer has them (an asymmetric grid), which layers store zero points ("zero_points": 1 or 0 each)."""
    index = {r.name: i for i, r in enumerate(rows)}
    plan = {"layers": [r.name for r in rows], "bits": [r.bits for r in rows],
            "pairs": [[i, index[r.partner]] for i, r in enumerate(rows) if r.role == "low" and r.partner in index],
            "roles": "".join(_ROLES[r.role] for r in rows), "scales": "".join(_GRANULARITIES[r.granularity] for r in rows),
            "compensation": "".join(_FACTORS[r.factor] for r in rows), "bias": "".join("1" if r.has_bias else "0" for r in rows)}
    if any(r.zero_point for r in rows):  # a symmetric model's plan stays as it was
        plan["zero_points"] = "".join("1" if r.zero_point else "0" for r in rows)
    return plan


class PlanRow(NamedTuple):
    """One weight layer of a saved plan."""

    name: str
    role: str  # "low" | "high" | "unpaired" | "fp32"
    bits: int  # 32: full precision
    partner: str | None
    granularity: str | None  # "tensor" | "channel" (None: full precision)
    factor: str | None  # "in" | "out": the compensation vector multiplied into the weight along that axis
    has_bias: bool
    zero_point: bool = False  # k-bit codes on an asymmetric grid: one int16 zero point per output channel


def decode_plan(plan: dict) -> list[PlanRow]:
    """:func:`encode_plan` undone: one :class:`PlanRow` per layer."""
    names = plan["layers"]
    partner = {}
    for low, high in plan["pairs"]:
        partner[names[low]], partner[names[high]] = names[high], names[low]
    decode = [{v: k for k, v in table.items()} for table in (_ROLES, _GRANULARITIES, _FACTORS)]
    zero_points = plan.get("zero_points", "0" * len(names))
    columns = (plan["roles"], plan["scales"], plan["compensation"], plan["bias"], plan["bits"], zero_points)
    if any(len(col) != len(names) for col in columns) or not all(isinstance(n, str) for n in names):
        raise ValueError("plan columns of different lengths")
    if not isinstance(zero_points, str) or set(zero_points) - {"0", "1"}:
        raise ValueError("zero points not a string of 0 and 1")
    if any(z == "1" and not (2 < b < 32 and g == "c") for z, b, g in zip(zero_points, plan["bits"], plan["scales"])):
        raise ValueError("a zero point on a layer that is not k-bit with per-channel scales")
    if any(b not in range(MIN_BITS, MAX_BITS + 1) and b != 32 for b in plan["bits"]):
        raise ValueError("bits out of range")
    if any((b < 32) != (g != "-") for b, g in zip(plan["bits"], plan["scales"])):
        raise ValueError("a quantized layer without scales")
    if any(not 0 <= i < len(names) for pair in plan["pairs"] for i in pair):
        raise ValueError("pair index out of range")
    return [PlanRow(name, decode[0][plan["roles"][i]], int(plan["bits"][i]), partner.get(name),
                    decode[1][plan["scales"][i]], decode[2][plan["compensation"][i]], plan["bias"][i] == "1",
                    zero_points[i] == "1")
            for i, name in enumerate(names)]
