"""Random weights that behave like a trained network's: BatchNorm statistics calibrated on real images.

A freshly initialised network's BatchNorm layers record mean 0 and variance 1, which says nothing about
the activations that actually reach them, and data-free methods read exactly those statistics. One
train-mode pass over a few real images makes every BN record the mean and variance of its input on them
(``momentum=None``: a plain average over the pass), after which the model in eval mode is a consistent
network: its BN statistics describe real inputs, as a trained model's do. That is what the project uses to
run every method on every listed architecture where no pretrained weights can be had offline
(``dfmpc quantize --random-weights``, the coverage experiment, the tests). Such a model measures whether
and how faithfully a method runs on an architecture, never accuracy.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import DfmpcError
from .graph import BATCH_NORMS

__all__ = ["randomize_batch_norm_affine", "calibrate_batch_norms", "random_calibrated"]


def randomize_batch_norm_affine(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters, gamma ~ U(0.5, 1.5) and beta ~ U(-0.5, 0.5) (in place).

    A fresh network has gamma = 1 and beta = 0 everywhere, so every channel after a BN looks alike; trained
    networks' channels differ, and the data-free methods act on those differences.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.weight is not None):
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(bn.bias.shape, generator=gen) - 0.5)
    return model


def calibrate_batch_norms(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Set every BatchNorm's running statistics to those of its input on ``images`` (in place; returns ``model``).

    Only the BatchNorm layers run in train mode (dropout and the rest stay in eval mode); their affine
    parameters are not touched. The model comes back in eval mode.
    """
    if images.dim() < 2 or images.shape[0] < 2:
        raise DfmpcError("calibrating BatchNorm statistics needs a batch of at least 2 images")
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    if not bns:
        raise DfmpcError(f"{type(model).__name__} has no BatchNorm layer to calibrate")
    model.eval()
    saved = []
    for bn in bns:
        if not bn.track_running_stats:
            raise DfmpcError(f"{type(bn).__name__} without running statistics cannot be calibrated")
        saved.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the whole pass
        bn.train()
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                model(images[start:start + batch_size])
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum
        model.eval()
    return model


def random_calibrated(model: nn.Module, images: torch.Tensor, seed: int = 0) -> nn.Module:
    """``model`` (randomly initialised) with random BN affine parameters and BN statistics calibrated on ``images``."""
    return calibrate_batch_norms(randomize_batch_norm_affine(model, seed), images)
