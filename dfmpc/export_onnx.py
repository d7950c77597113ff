"""A quantized model as a standard QDQ ONNX model that an inference engine (onnxruntime) runs.

:func:`export_onnx` takes what :func:`dfmpc.quantize` returned (with ``act_bits=`` for quantized activations) or
what :func:`dfmpc.load_quantized` rebuilt from a ``.dfmpc`` file, and writes an ONNX model (opset 13) where

* every BatchNorm that directly follows a Conv2d / Linear is folded into it (the changes a method made to the
  BatchNorm, DF-MPC's ``fold="bn"`` compensation and dfmpc+'s gains, go with it), and so is a compensation
  multiplied per output channel;
* every quantized weight whose (folded) values are its integer codes times one scale per output channel is stored
  as those codes in int8 (ternary codes {-1, 0, 1}; a k-bit code q as the odd integer 2q - (2^k - 1), which fits
  in int8 up to 7 bits, or as q - zero point on an asymmetric grid, SQuant's ``grid="asymmetric"``, which fits
  wherever the zero point is a level) with its float scales, and read through a ``DequantizeLinear`` (per output channel,
  axis 0). Its bias is stored as int32 with scale (input scale x weight scale), as the engines expect, where its
  input is quantized. A weight that is not codes times per-output-channel scales (DF-MPC's compensation
  multiplied per *input* channel, ``fold="next"``, or 8-bit codes, which need 9 bits) is stored in float32 and
  counted in ``float_weights``;
* every :class:`~dfmpc.activations.ActivationQuantizer` becomes a ``QuantizeLinear`` -> ``DequantizeLinear``
  pair with its scale and zero point (uint8; below 8 bits a ``Clip`` first keeps the codes in range).

Why int8 and not int4 for ternary and 4-bit codes: in onnxruntime 1.32 an int4 weight (opset 21) is dequantized and
convolved in float, an int8 one runs ``QLinearConv`` (``tests/test_export.py`` checks both).

``onnx.checker`` checks the file before it is written. ``onnx`` (and ``onnxruntime`` to run the file) are the
optional extra ``dfmpc[deploy]``.
"""
from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from .errors import DfmpcError
from .folding import fold_batch_norms, per_channel_scales, signed_codes
from .graph import trace

__all__ = ["OPSET", "require", "codes_from_file", "export_onnx", "onnx_predict"]

OPSET = 13
_INSTALL = "pip install 'dfmpc[deploy]' (or: pip install onnx onnxruntime)"


def require(module: str = "onnx"):
    """Import ``onnx`` or ``onnxruntime``, or fail with one line saying how to install them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DfmpcError(f"{module} is not installed; ONNX export and the engine measurements need it: {_INSTALL}")\
            from None


def codes_from_file(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """The signed integer codes of every quantized weight in a ``.dfmpc`` file (``model``: what
    :func:`dfmpc.load_quantized` returned for it, whose ``state_dict`` order the file follows)."""
    from .packed import read_quantized

    return {name: signed_codes(q) for name, q in read_quantized(path, model).items()}


def _constant(name: str, inits: dict, producers: dict) -> np.ndarray:
    """The value of a constant tensor of the exported graph (an initializer, or Constant -> Cast nodes)."""
    from onnx import helper, numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers[name]
    if node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    if node.op_type == "Cast":
        dtype = helper.tensor_dtype_to_np_dtype(node.attribute[0].i)
        return _constant(node.input[0], inits, producers).astype(dtype)
    raise DfmpcError(f"the exported graph computes the scale {name!r} with a {node.op_type}; report this as a bug")


def export_onnx(qmodel: nn.Module, codes: dict[str, torch.Tensor], path: str | os.PathLike, input_shape,
                opset: int = OPSET) -> dict:
    """Write ``qmodel`` as a QDQ ONNX model to ``path``; return what was stored how.

    ``codes``: layer name -> signed integer codes (:func:`integer_codes` of the report, or :func:`codes_from_file`).
    ``input_shape``: one input's shape (C, H, W); the batch dimension is dynamic. The model is not modified.
    """
    onnx = require("onnx")
    from onnx import helper, numpy_helper

    export = copy.deepcopy(qmodel).cpu().eval()
    gm = export if isinstance(export, fx.GraphModule) else trace(export)
    gm = fold_batch_norms(gm)
    modules = dict(gm.named_modules())
    integer = {}
    for name, m in codes.items():
        layer = modules.get(name)
        if layer is None or tuple(layer.weight.shape) != tuple(m.shape):
            raise DfmpcError(f"the codes of layer {name!r} do not fit the model; pass the model and codes of one "
                             "quantization (dfmpc.quantize's model and report, or one .dfmpc file)")
        scales = per_channel_scales(layer.weight, m)
        if scales is not None:
            integer[name] = (m.to(torch.int8), scales)
    buffer = io.BytesIO()
    dummy = torch.zeros(1, *input_shape)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(gm, (dummy,), buffer, opset_version=opset, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=False,
                              dynamo=False)
    except Exception as e:  # the exporter raises many types; the user needs one line
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DfmpcError(f"torch.onnx.export cannot export {type(qmodel).__name__} ({first}); export a model made of "
                         "standard layers (Conv2d, Linear, BatchNorm, ReLU, pooling, add)") from None
    model = onnx.load_from_string(buffer.getvalue())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    dq_nodes, stored = [], {}
    for name, (m, scales) in integer.items():
        key = f"{name}.weight"
        if key not in inits or not consumers.get(key):
            raise DfmpcError(f"the exported graph has no weight {key!r} (the exporter renamed it); "
                             "export with a torch version that keeps parameter names")
        graph.initializer.remove(inits[key])
        graph.initializer.extend([numpy_helper.from_array(m.numpy(), f"{key}_quantized"),
                                  numpy_helper.from_array(scales.numpy(), f"{key}_scale"),
                                  numpy_helper.from_array(np.zeros(len(scales), np.int8), f"{key}_zero_point")])
        dq_nodes.append(helper.make_node("DequantizeLinear", [f"{key}_quantized", f"{key}_scale", f"{key}_zero_point"],
                                         [key], name=f"{key}_DequantizeLinear", axis=0))
        stored[name] = "int8"
        reader = consumers[key][0][0]
        bias = f"{name}.bias"
        source = producers.get(reader.input[0])
        if bias in inits and source is not None and source.op_type == "DequantizeLinear":
            input_scale = _constant(source.input[1], inits, producers).astype(np.float64)
            bias_scale = (input_scale * scales.double().numpy()).astype(np.float32)
            b = numpy_helper.to_array(inits[bias]).astype(np.float64)
            codes32 = np.clip(np.round(b / bias_scale), -2**31, 2**31 - 1).astype(np.int32)
            graph.initializer.remove(inits[bias])
            graph.initializer.extend([numpy_helper.from_array(codes32, f"{bias}_quantized"),
                                      numpy_helper.from_array(bias_scale, f"{bias}_scale"),
                                      numpy_helper.from_array(np.zeros(len(b), np.int32), f"{bias}_zero_point")])
            dq_nodes.append(helper.make_node("DequantizeLinear", [f"{bias}_quantized", f"{bias}_scale",
                                                                  f"{bias}_zero_point"], [bias],
                                             name=f"{bias}_DequantizeLinear", axis=0))
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(dq_nodes + old)
    model.producer_name, model.doc_string = "dfmpc", "QDQ model written by dfmpc.export_onnx"
    onnx.checker.check_model(model)
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    except OSError as e:
        raise DfmpcError(f"cannot write {str(path)!r} ({e.strerror or type(e).__name__}); give a writable path") from None
    float_weights = [n for n in codes if n not in integer]
    return {"path": str(path), "bytes": path.stat().st_size, "opset": opset, "int8_weights": sorted(stored),
            "float_weights": float_weights,
            "activation_qdq": sum(node.op_type == "QuantizeLinear" for node in old)}


def onnx_predict(path: str | os.PathLike, dataset, batch_size: int = 128, threads: int = 1):
    """onnxruntime (CPU execution provider) over ``dataset`` of (image, label) pairs, in order: the same
    :class:`~dfmpc.evaluate.Predictions` as :func:`dfmpc.evaluate.predict`, so that top-1 and agreement compare."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from .evaluate import Predictions

    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tops, labels, losses = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).float()
        y = torch.as_tensor(y)
        tops.append(logits.topk(min(5, logits.shape[1]), dim=1).indices)
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        labels.append(y)
    return Predictions(torch.cat(tops), torch.cat(labels), torch.cat(losses))
