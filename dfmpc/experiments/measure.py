"""Measurements behind the experiment chapters: feature-map errors, weight fits and histograms, loss surfaces.

Accuracy and loss come from the one evaluation loop, :func:`dfmpc.evaluate.predict`.

* :func:`feature_errors` -- relative error of the output of every Conv2d / Linear layer of a quantized model
  against the full-precision one, measured with forward hooks on the same images, in two ways:
  *accumulated* (each model runs on its own activations, so errors of earlier layers propagate) and
  *local* (the quantized layer applied to the full-precision layer's own input, i.e. the error that
  layer adds by itself).
* :func:`weight_histogram` -- histogram and moments of a weight tensor (the paper's Figure 4).
* :func:`filter_normalized_directions` and :func:`loss_surface` -- the loss landscape of Li et al. (2018),
  "Visualizing the loss landscape of neural nets": two random Gaussian directions in weight space whose
  every filter is rescaled to the norm of the corresponding filter of the model, with the 1-D parameters
  (biases, BatchNorm) left out; the loss is evaluated on the grid ``w + alpha d1 + beta d2`` (Figure 5).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ..errors import DfmpcError
from ..evaluate import device_of, predict, resolve_device

__all__ = ["sqnr_db", "logits_of", "run_with_input_hooks", "channel_means", "measured_input_means", "correlation",
           "feature_errors", "weight_fit", "weight_histogram", "filter_normalized_directions", "loss_surface", "batch_of"]

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


@contextlib.contextmanager
def _forward_hooks(layers: dict, make_hook):
    """Forward hooks ``make_hook(name)`` on the named layers for the duration of the block."""
    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def batch_of(dataset: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images and labels of ``dataset`` stacked into two tensors."""
    n = min(n, len(dataset))
    if n < 1:
        raise DfmpcError("need at least one image")
    xs, ys = zip(*(dataset[i] for i in range(n)))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor([int(y) for y in ys])


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


def feature_errors(fp_model: nn.Module, q_model: nn.Module, images: torch.Tensor, batch_size: int = 64,
                   device=None) -> list[dict]:
    """Relative error ||X_q - X_fp|| / ||X_fp|| of the output X of every Conv2d / Linear layer.

    ``fp_model`` and ``q_model`` must have the same layer names (``q_model`` is a quantized copy).
    For every layer, in execution order, returns ``{"name", "accumulated", "local", "index"}``:

    * ``accumulated``: both models run on ``images``; the outputs of the layer are compared, so the
      error includes everything that went wrong before it;
    * ``local``: the quantized layer is applied to the input the full-precision layer received, so the
      error is the layer's own (for a compensated layer it includes its coefficients c, which scale it).

    Norms are summed over all images before the ratio is taken.
    """
    device = resolve_device(device)
    fp_layers, q_layers = _weight_layers(fp_model), _weight_layers(q_model)
    if set(fp_layers) != set(q_layers):
        raise DfmpcError("the two models do not have the same Conv2d/Linear layers; pass a model and its quantized copy")
    homes = (device_of(fp_model), device_of(q_model))
    modes = (fp_model.training, q_model.training)
    sums = {name: {"ref": 0.0, "acc": 0.0, "loc": 0.0} for name in fp_layers}
    order: list[str] = []
    q_out: dict[str, torch.Tensor] = {}

    def keep_q(name):
        def hook(module, inputs, output):
            q_out[name] = output.detach()
        return hook

    def compare(name):
        def hook(module, inputs, output):
            if name not in order:
                order.append(name)
            ref = output.detach().double()
            s = sums[name]
            s["ref"] += float((ref * ref).sum())
            s["acc"] += float(((q_out[name].double() - ref) ** 2).sum())
            s["loc"] += float(((q_layers[name](inputs[0]).double() - ref) ** 2).sum())
        return hook

    try:
        fp_model.to(device).eval()
        q_model.to(device).eval()
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].to(device)
                with _forward_hooks(q_layers, keep_q):
                    q_model(x)
                with _forward_hooks(fp_layers, compare):
                    fp_model(x)
                q_out.clear()
    finally:
        fp_model.to(homes[0]).train(modes[0])
        q_model.to(homes[1]).train(modes[1])
    rows = []
    for i, name in enumerate(order):
        s = sums[name]
        ref = math.sqrt(s["ref"]) if s["ref"] > 0 else float("nan")
        rows.append({"index": i, "name": name, "accumulated": math.sqrt(s["acc"]) / ref, "local": math.sqrt(s["loc"]) / ref})
    return rows


def weight_fit(w: torch.Tensor, w_q: torch.Tensor) -> dict:
    """How well a quantized filter bank ``w_q`` matches ``w``, and how well it could after rescaling each filter.

    Filters are the slices along dimension 0 (output channels). Returns

    * ``rel_error``: ||w_q - w|| / ||w|| over the whole tensor;
    * ``best_scale_rel_error``: the same after the best scalar c_j >= 0 per filter, i.e.
      sqrt(sum_j ||w_j||^2 (1 - cos_j^2) / sum_j ||w_j||^2) with cos_j the cosine between w_q_j and w_j
      (and cos_j = 0 where it is negative or w_q_j = 0). No per-filter (per-channel) rescaling -- DF-MPC's
      c included -- can bring the weight error below this bound: it is the part of the error orthogonal
      to the full-precision filter;
    * ``cos_mean`` / ``cos_min``: the cosines; ``dead_filters``: filters quantized to all zeros.
    """
    a, b = w.detach().double().reshape(w.shape[0], -1), w_q.detach().double().reshape(w.shape[0], -1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    dot = (a * b).sum(dim=1)
    cos = torch.where((na > 0) & (nb > 0), dot / (na * nb).clamp(min=1e-300), torch.zeros_like(na)).clamp(min=0.0)
    total = float((na**2).sum())
    if total == 0:
        raise DfmpcError("the full-precision weight is all zeros; nothing to compare")
    rel = float(((b - a) ** 2).sum()) ** 0.5 / total**0.5
    best = float(((na**2) * (1 - cos**2)).sum()) ** 0.5 / total**0.5
    return {"rel_error": rel, "best_scale_rel_error": best, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "dead_filters": int((nb == 0).sum()), "filters": int(w.shape[0])}


def weight_histogram(weight: torch.Tensor, bins: int = 60, range: tuple[float, float] | None = None) -> dict:
    """Histogram of the entries of ``weight`` plus their mean, standard deviation and mean |w|.

    ``range`` defaults to the symmetric interval [-max|w|, max|w|]. Values are plain Python lists and floats.
    """
    w = weight.detach().double().flatten().cpu()
    if w.numel() == 0:
        raise DfmpcError("cannot take the histogram of an empty tensor")
    if range is None:
        m = float(w.abs().max()) or 1.0
        range = (-m, m)
    counts = torch.histc(w, bins=bins, min=range[0], max=range[1])
    edges = torch.linspace(range[0], range[1], bins + 1, dtype=torch.float64)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "mean": float(w.mean()),
            "std": float(w.std()) if w.numel() > 1 else 0.0, "abs_mean": float(w.abs().mean()),
            "numel": int(w.numel()), "distinct": int(torch.unique(w.float()).numel())}


def filter_normalized_directions(model: nn.Module, count: int = 2, seed: int = 0) -> list[list[torch.Tensor]]:
    """``count`` random directions in the parameter space of ``model``, filter-normalised (Li et al. 2018).

    Every parameter with more than one dimension gets a standard Gaussian tensor whose slice i along
    dimension 0 (filter / output unit i) is rescaled to the norm of the model's slice i; 1-D parameters
    (biases, BatchNorm weights) get zeros, as in Li et al.'s "ignore biasbn" setting. The Gaussians come
    from a CPU generator seeded with ``seed``, so two models with the same parameter shapes get the same
    raw directions, each normalised to its own filters.
    """
    gen = torch.Generator().manual_seed(seed)
    directions = []
    for _ in range(count):
        d = []
        for p in model.parameters():
            if p.dim() <= 1:
                d.append(torch.zeros_like(p))
                continue
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            w = p.detach().double().cpu()
            r_norm = r.reshape(r.shape[0], -1).norm(dim=1)
            w_norm = w.reshape(w.shape[0], -1).norm(dim=1)
            scale = torch.where(r_norm > 0, w_norm / r_norm.clamp(min=1e-12), torch.zeros_like(r_norm))
            d.append((r * scale.reshape(-1, *([1] * (r.dim() - 1)))).to(p.dtype).to(p.device))
        directions.append(d)
    return directions


def loss_surface(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = 9, span: float = 1.0,
                 seed: int = 0, batch_size: int = 256, device=None, progress: bool = False, desc: str = "surface") -> dict:
    """Mean cross-entropy and top-1 accuracy of ``model`` on the grid ``w + a d1 + b d2``, a, b in [-span, span].

    ``d1, d2`` from :func:`filter_normalized_directions` (``seed``). BatchNorm layers use their running
    statistics (eval mode). The model is restored afterwards. Returns ``{"coords": [steps values],
    "loss": steps x steps list (row = b, column = a), "accuracy": same, "center_loss": loss at (0, 0)}``.
    """
    from tqdm import tqdm  # plain text bar: tqdm.auto needs ipywidgets in notebooks

    if steps < 2:
        raise DfmpcError(f"a loss surface needs at least 2 steps per axis, got {steps}")
    device = resolve_device(device)
    home, was_training = device_of(model), model.training
    params = list(model.parameters())
    origin = [p.detach().clone() for p in params]
    d1, d2 = filter_normalized_directions(model, 2, seed)
    coords = torch.linspace(-span, span, steps, dtype=torch.float64)
    loss = [[0.0] * steps for _ in range(steps)]
    acc = [[0.0] * steps for _ in range(steps)]
    try:
        model.to(device).eval()
        origin = [o.to(device) for o in origin]
        d1 = [d.to(device) for d in d1]
        d2 = [d.to(device) for d in d2]
        grid = [(i, j) for i in range(steps) for j in range(steps)]
        data = TensorDataset(images, labels)
        with torch.no_grad():
            for i, j in tqdm(grid, desc=desc, unit="point", disable=not progress, leave=False):
                a, b = float(coords[j]), float(coords[i])
                for p, o, u, v in zip(params, origin, d1, d2):
                    p.copy_(o + a * u + b * v)
                pred = predict(model, data, device=device, batch_size=batch_size)
                loss[i][j] = pred.mean_loss()
                acc[i][j] = pred.top1_accuracy()
    finally:
        with torch.no_grad():
            for p, o in zip(params, origin):
                p.copy_(o.to(p.device))
        model.to(home).train(was_training)
    mid = steps // 2
    return {"coords": [float(c) for c in coords], "loss": loss, "accuracy": acc,
            "center_loss": loss[mid][mid] if steps % 2 else None}


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum ref^2 / sum (test - ref)^2) in dB (inf for identical)."""
    ref, err = reference.double(), (test.double() - reference.double())
    noise = float((err * err).sum())
    signal = float((ref * ref).sum())
    if not math.isfinite(noise) or not math.isfinite(signal):
        raise DfmpcError("the outputs contain NaN or inf; no signal-to-noise ratio")
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def logits_of(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The float64 logits of ``images`` on the CPU, in batches (through the one evaluation loop; no labels needed)."""
    data = TensorDataset(images, torch.zeros(images.shape[0], dtype=torch.long))
    return predict(model, data, device="cpu", batch_size=batch_size, keep_logits=True).logits.double()


def run_with_input_hooks(model: nn.Module, images: torch.Tensor, hooks: dict, batch_size: int = 64) -> None:
    """Run ``model`` over ``images`` in batches, without gradients, calling ``hooks[name](input)`` with the input
    of every named layer (forward pre-hooks, removed afterwards)."""
    layers = dict(model.named_modules())
    handles = [layers[n].register_forward_pre_hook(lambda m, inputs, f=f: f(inputs[0].detach())) for n, f in hooks.items()]
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                model(images[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()


def channel_means(model: nn.Module, images: torch.Tensor, of: dict, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """For every layer named in ``of``: the mean over images and pixels of each channel of ``of[name](input)``,
    where ``input`` is what that layer receives in ``model`` (float64; accumulated batch by batch, so no layer's
    inputs are ever held for all images at once)."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(of, 0)

    def accumulate(name):
        def hook(x):
            y = of[name](x).double()
            flat = y.transpose(0, 1).reshape(y.shape[1], -1)  # channels first, then images and pixels
            sums[name] = sums.get(name, 0) + flat.sum(dim=1)
            counts[name] += flat.shape[1]
        return hook

    run_with_input_hooks(model, images, {n: accumulate(n) for n in of}, batch_size)
    return {name: sums[name] / counts[name] for name in sums}


def measured_input_means(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The mean of every input channel (feature, for a Linear) of every Conv2d / Linear layer on ``images``."""
    return channel_means(model, images, {n: (lambda x: x) for n in _weight_layers(model)}, batch_size)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation of two vectors; None where either is constant (or has a single entry)."""
    if a.numel() < 2 or not (float(a.std()) > 0 and float(b.std()) > 0):
        return None
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])
