"""ZeroQ's distilled data: inputs synthesised so that every BatchNorm sees the statistics it recorded in training.

Cai, Yao, Dong, Gholami, Mahoney, Keutzer, "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020, Section 3.1,
Eq. (2), and ``distill_data.py`` of the authors' code: images start as N(0, 1) noise and Adam (lr 0.5,
ReduceLROnPlateau with patience 100 and min lr 1e-4) moves them so that, at the input of every BatchNorm, each
image's per-channel mean and standard deviation over its pixels match the BN's running mean and
sqrt(running_var + 1e-6); the network input itself is matched to mean 0 and std 1 per channel. The loss is the sum
over the BNs and the input of (|mu - mu_BN|^2 + |sigma - sigma_BN|^2) / images, as in the authors' code. They hook
the first L convolutions and assume that each feeds one of the L BNs; we hook the BNs' own inputs. A BN input
without pixels (BatchNorm1d, or a 1x1 map) is matched over the batch instead. Used by :mod:`dfmpc.methods.zeroq`.
"""
from __future__ import annotations

import hashlib
import math
import sys
from collections import OrderedDict

import torch
from torch import nn

from .errors import DfmpcError
from .graph import BATCH_NORMS

__all__ = ["DistilledImageCache", "DISTILLED_IMAGES",
           "EPS", "batch_norms", "bn_statistics_loss", "distill_data", "default_input_size", "model_input_shape",
           "check_count", "hooked_pass"]

EPS = 1e-6  # added to the variances before the square root, as the authors' code


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm modules of ``model``; an error if there is none or one keeps no running statistics."""
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    if not bns:
        raise DfmpcError(f"{type(model).__name__} has no BatchNorm layer: ZeroQ distils its data from the BatchNorm "
                         "statistics, so there is nothing to distil from; use a data-free method (omse, dfq)")
    if any(bn.running_mean is None or bn.running_var is None for bn in bns):
        raise DfmpcError("a BatchNorm without running statistics (track_running_stats=False) gives ZeroQ nothing to "
                         "match; build the model with track_running_stats=True")
    return bns


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: mean and sqrt(var + EPS) over the pixels; over the batch where there are none."""
    if x.dim() > 2 and x[0, 0].numel() > 1:
        flat = x.flatten(2)
        return flat.mean(2), torch.sqrt(flat.var(2) + EPS)
    flat = x.transpose(0, 1).flatten(1)
    return flat.mean(1)[None], torch.sqrt(flat.var(1) + EPS)[None]


def _gap(stat: torch.Tensor, target) -> torch.Tensor:
    return ((stat - target) ** 2).sum() / stat.shape[0]


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's loss (Eq. 2, as the authors' code): how far the statistics of ``x`` at every BN input (and at the
    network input) are from the BN's running statistics (and from mean 0, std 1). Run the model in eval mode."""
    bns, terms = batch_norms(model), []

    def hook(bn, inputs):
        mean, std = _channel_stats(inputs[0])
        terms.append(_gap(mean, bn.running_mean) + _gap(std, torch.sqrt(bn.running_var + EPS)))

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    mean, std = _channel_stats(x)
    return sum(terms) + _gap(mean, 0.0) + _gap(std, 1.0)


def check_count(value, what: str, least: int) -> None:
    """An error unless ``value`` is an integer (not a bool) of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise DfmpcError(f"{what} must be an integer >= {least}, got {value!r}")


def distill_data(model: nn.Module, input_shape, images: int = 32, steps: int = 100, lr: float = 0.5, seed: int = 0,
                 progress: bool = False) -> torch.Tensor:
    """ZeroQ's distilled data: ``images`` inputs of shape ``input_shape`` (without the batch dimension), started
    from N(0, 1) with ``seed`` and moved by ``steps`` Adam steps on :func:`bn_statistics_loss`. Gradients go to the
    images only; the model's parameters, buffers, ``requires_grad`` flags and train/eval mode are left as they were."""
    batch_norms(model)
    check_count(images, "images", 2)
    check_count(steps, "steps", 0)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise DfmpcError(f"lr must be a positive number, got {lr!r}")
    from tqdm import tqdm  # plain text bar: tqdm.auto needs ipywidgets in notebooks

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn((images, *input_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=100, min_lr=1e-4)
    was_training, flags = model.training, [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for _ in tqdm(range(steps), desc="zeroq: distilling", unit="step", disable=not progress, leave=False,
                          file=sys.stderr):
                optimizer.zero_grad(set_to_none=True)
                loss = bn_statistics_loss(model, x)
                if not torch.isfinite(loss):
                    raise DfmpcError("the distillation loss became NaN or inf; lower lr or check the BatchNorm statistics")
                loss.backward()
                optimizer.step()
                scheduler.step(loss.item())
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
    return x.detach()


def default_input_size(model: nn.Module) -> int | None:
    """32 for a CIFAR-style network (first Conv2d of stride 1 and fewer than 1000 outputs), else 224; None
    without a Conv2d (the input is the first Linear's features)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    cifar = tuple(conv.stride) == (1, 1) and (not linears or linears[-1].out_features < 1000)
    return 32 if cifar else 224


def model_input_shape(model: nn.Module, input_size: int | None) -> tuple[int, ...]:
    """The shape of one input: (channels of the first Conv2d, size, size), size ``input_size`` or
    :func:`default_input_size`; (features,) when the first weight layer is a Linear."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        raise DfmpcError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    size = input_size if input_size is not None else default_input_size(model)
    return (first.in_channels, size, size)


class DistilledImageCache:
    """Distilled images kept for reuse, the ``size`` most recent, under a key of everything that determines them:
    the model (its class and every tensor of its state, hashed), the input shape, the number of images, the steps,
    the learning rate, the seed, and torch's thread count (the order of floating-point sums, and so the last bits of
    the images, depends on it). Each entry keeps the seconds its distillation took, which a reuse still reports."""

    def __init__(self, size: int = 4):
        self.size = size
        self._entries: OrderedDict = OrderedDict()  # key -> (images, seconds)

    @staticmethod
    def key(model: nn.Module, shape: tuple, images: int, steps: int, lr: float, seed: int) -> tuple:
        digest = hashlib.sha256(type(model).__name__.encode())
        for name, t in model.state_dict().items():
            t = t.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest(), tuple(shape), images, steps, lr, seed, torch.get_num_threads()

    def get(self, key: tuple) -> tuple[torch.Tensor, float] | None:
        """A copy of the images under ``key`` and their seconds, or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        x, seconds = self._entries[key]
        return x.clone(), seconds

    def put(self, key: tuple, x: torch.Tensor, seconds: float) -> None:
        self._entries[key] = (x.clone(), seconds)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


#: the cache ZeroQ uses (one per process; :func:`dfmpc.methods.zeroq.clear_distilled_cache` empties it)
DISTILLED_IMAGES = DistilledImageCache()


def hooked_pass(model: nn.Module, x: torch.Tensor, handles) -> None:
    """One forward pass of ``model`` over ``x`` in eval mode without gradients, for what the hooks ``handles``
    (registered on it beforehand) record or change; then the hooks are removed and the mode restored, whatever
    happened."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
