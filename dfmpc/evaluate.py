"""The one evaluation loop of dfmpc: run a classifier over a data set and keep what every metric needs.

:func:`predict` makes one pass and returns :class:`Predictions` (the top-5 classes, the label and the
cross-entropy of every image), from which top-1 / top-5 accuracy, the mean loss and the agreement of two
models all follow without another pass. :func:`evaluate` is the summary that ``dfmpc quantize`` prints.
The experiments (:mod:`dfmpc.experiments`) and the command line use these two functions and no other loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import DfmpcError

__all__ = ["Predictions", "predict", "evaluate", "resolve_device", "device_of"]


@dataclass(frozen=True)
class Predictions:
    """Per-image results of one pass: ``top5`` (N x k class indices, k = min(5, classes)), ``labels`` (N)
    and ``loss`` (N cross-entropies), all on the CPU; ``logits`` (N x classes) only when asked for."""

    top5: torch.Tensor
    labels: torch.Tensor
    loss: torch.Tensor
    logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def top1_accuracy(self) -> float:
        """Top-1 accuracy in %."""
        return 100.0 * (self.top5[:, 0] == self.labels).double().mean().item()

    def top5_accuracy(self) -> float:
        """Top-5 accuracy in % (top-``classes`` with fewer than five classes)."""
        return 100.0 * (self.top5 == self.labels[:, None]).any(dim=1).double().mean().item()

    def mean_loss(self) -> float:
        return float(self.loss.double().mean())

    def agreement(self, reference: Predictions) -> float:
        """% of images on which two models predict the same top-1 class (not an accuracy: no labels involved)."""
        if len(self) != len(reference):
            raise DfmpcError("agreement needs predictions on the same images")
        return 100.0 * (self.top5[:, 0] == reference.top5[:, 0]).double().mean().item()

    def scores(self) -> dict:
        """``{"top1", "top5", "loss", "images"}``: what the experiments record for every model."""
        return {"top1": self.top1_accuracy(), "top5": self.top5_accuracy(), "loss": self.mean_loss(),
                "images": len(self)}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device` (default: CUDA if available, else CPU), with one-line errors."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DfmpcError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DfmpcError(f"device {str(device)!r} was asked for but torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DfmpcError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters (or buffers) are; the CPU for a model without either."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def predict(model: nn.Module, dataset: Dataset, device=None, batch_size: int = 256, progress: bool = False,
            desc: str = "predict", num_workers: int = 0, keep_logits: bool = False) -> Predictions:
    """Run ``model`` over ``dataset`` of ``(image, label)`` pairs, in order, in eval mode without gradients.

    The model is moved to ``device`` (default: CUDA if available) for the pass and then back to its own
    device and train/eval mode, so the caller's model is left as it was. ``num_workers`` loader processes
    decode images that are not already tensors in memory. ``keep_logits`` also returns every logit.
    """
    from tqdm import tqdm  # plain text bar: tqdm.auto needs ipywidgets in notebooks

    if len(dataset) == 0:
        raise DfmpcError("the evaluation data set is empty; check the data folder and --images")
    if batch_size < 1:
        raise DfmpcError(f"batch size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    home, was_training = device_of(model), model.training
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    tops, labels, losses, logits_all = [], [], [], []
    try:
        model.to(dev).eval()
        with torch.inference_mode():
            for x, y in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
                x, y = x.to(dev, non_blocking=True), torch.as_tensor(y).to(dev, non_blocking=True)
                logits = model(x).float()
                tops.append(logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu())
                losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
                labels.append(y.cpu())
                if keep_logits:
                    logits_all.append(logits.cpu())
    finally:
        model.to(home).train(was_training)
    return Predictions(torch.cat(tops), torch.cat(labels), torch.cat(losses),
                       torch.cat(logits_all) if keep_logits else None)


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device=None, progress: bool = True,
             desc: str = "eval", num_workers: int = 0) -> dict:
    """Accuracy of ``model`` on ``dataset``: ``{"top1": %, "top5": %, "loss", "images", "seconds"}``
    (one :func:`predict` pass; ``seconds`` is its wall time)."""
    start = time.perf_counter()
    pred = predict(model, dataset, device, batch_size, progress, desc, num_workers)
    return {**pred.scores(), "seconds": time.perf_counter() - start}
