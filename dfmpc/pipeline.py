"""The steps every front end takes, written once: the evaluation images with the record of what they are, and a
quantized model measured against fp32 on them. ``dfmpc quantize`` (:mod:`dfmpc.cli_quantize`) and the experiments'
session (:class:`dfmpc.experiments.session.Session`, which the book's chapters use) both call these; they differ
only in what they cache and in which rows they print or record."""
from __future__ import annotations

from .api import quantize
from .data import data_folder, data_record, load_dataset
from .evaluate import predict

__all__ = ["CACHE_LIMIT", "evaluation_data", "quantize_and_predict"]

CACHE_LIMIT = 12000  # data sets up to this many images are decoded once and kept in memory as tensors


def evaluation_data(dataset: str, spec, directory, images, seed: int, split: str | None, *, progress: bool = False,
                    skip_unreadable: bool = False, fallback=None, cache: bool | None = None):
    """``images`` images of ``dataset``'s ``split`` half ("dev", "test"; None: the whole set; ``images`` None or
    "all": every image) from ``directory`` (None: the offline copy, else a download), preprocessed for ``spec``'s
    model; and the record of what they are (:func:`dfmpc.data.data_record`, plus "in_memory" and,
    with ``skip_unreadable``, the files skipped). ``cache``: decode once and keep in memory (default: when at most
    :data:`CACHE_LIMIT` images); ``fallback``: why these are not the images asked for, if they are not."""
    load = dict(name=dataset, data_dir=directory, transform=spec.eval_transform(), progress=progress,
                skip_unreadable=skip_unreadable)
    limit = None if images == "all" else images
    available = len(load_dataset(split=split, **load))  # the file list only: nothing is decoded
    if cache is None:
        cache = min(limit or available, available) <= CACHE_LIMIT
    data = load_dataset(limit=limit, seed=seed, cache=cache, split=split, **load)
    record = data_record(dataset, data_folder(dataset, directory), available, len(data), images, seed, fallback,
                         split)
    record["in_memory"] = cache
    if skip_unreadable:
        record["unreadable_skipped"] = list(getattr(data, "skipped", []))
    return data, record


def quantize_and_predict(model, data, method: str, bits: str, settings: dict, *, device, batch_size: int,
                         progress: bool = False, desc: str | None = None, num_workers: int = 0, prepare=None):
    """(quantized copy, report, predictions on ``data``) of ``model`` quantized by ``method`` at ``bits`` with
    ``settings``; ``prepare``: what to do to the quantized copy before it runs (e.g. a channels-last copy), if
    anything."""
    qmodel, report = quantize(model, bits=bits, method=method, **settings)
    net = qmodel if prepare is None else prepare(qmodel)
    pred = predict(net, data, device=device, batch_size=batch_size, progress=progress,
                   desc=desc or f"{method} {bits}", num_workers=num_workers)
    return qmodel, report, pred
