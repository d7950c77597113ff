"""Top-1 / top-5 accuracy of a classifier on a data set."""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import DfmpcError

__all__ = ["evaluate"]


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str | torch.device | None = None,
             progress: bool = True, desc: str = "eval", num_workers: int = 0) -> dict:
    """Accuracy of ``model`` on ``dataset`` of ``(image tensor, label)`` pairs, in dataset order.

    Runs in eval mode under ``torch.inference_mode`` on ``device`` (default: CUDA if
    available, else CPU).  The model is moved there for the run and afterwards moved back to
    its original device and train/eval mode, so the caller's model is left as it was.
    With fewer than 5 classes, top-5 counts the top-``num_classes`` (i.e. 100 %).

    Returns ``{"top1": %, "top5": %, "n": images, "seconds": wall time}``.
    """
    from tqdm import tqdm  # plain text bar: tqdm.auto needs ipywidgets in notebooks

    if len(dataset) == 0:
        raise DfmpcError("the evaluation data set is empty; check --data-dir and --limit")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    home, was_training = _device_of(model), model.training
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    correct1 = correct5 = n = 0
    start = time.perf_counter()
    try:
        model.to(device).eval()
        with torch.inference_mode():
            for images, labels in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
                images = images.to(device, non_blocking=True)
                labels = torch.as_tensor(labels).to(device, non_blocking=True)
                logits = model(images)
                k = min(5, logits.shape[1])
                hits = logits.topk(k, dim=1).indices == labels[:, None]
                correct1 += hits[:, 0].sum().item()
                correct5 += hits.any(dim=1).sum().item()
                n += labels.numel()
    finally:
        model.to(home).train(was_training)
    seconds = time.perf_counter() - start
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n, "seconds": seconds}
