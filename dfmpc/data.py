"""Evaluation data sets: CIFAR-10/100 test sets and ImageNet validation images.

``load_dataset`` reads

* CIFAR-10/100 from a folder of class folders of images (class folders sorted by name give
  the label order, e.g. shared/data/cifar10/test_jpeg), or else torchvision's CIFAR test set
  (downloaded into ``data_dir`` when ``download=True``);
* ImageNet from a folder ``<wnid>/*.JPEG`` whose labels are the line numbers of the wnids in
  ``synset_words.txt`` -- not the enumeration of the folders present, which is wrong as soon
  as a class is missing (the shared subset has 725 of the 1,000 classes).

Development and test halves (``split=``): every evaluation set is cut in two fixed halves by position in its
list (class folders sorted by name, files sorted by name within a class; torchvision's CIFAR test set in its
stored order): images at even positions 0, 2, 4, ... form the development half ``"dev"``, those at odd
positions the test half ``"test"``. Both halves cover every class about equally. Design choices and
hyperparameters are decided on ``"dev"``; headline numbers are reported on ``"test"``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import DfmpcError, UnreadableImageError
from .paths import DATASETS, default_data_dir, download_dir, repository_root, shared_dir

__all__ = ["SPLITS", "split_positions",
           "load_dataset", "data_folder", "download_dir", "default_data_dir", "shared_dir", "repository_root",
           "ImageListDataset", "DATASETS", "data_record"]

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")
#: the halves of every evaluation set: name -> the parity of the positions it takes
SPLITS = {"dev": 0, "test": 1}


def split_positions(size: int, split: str | None) -> list[int]:
    """Positions of the images of ``split`` ("dev": even, "test": odd, None or "all": every one) in a set of ``size``."""
    if split is None or split == "all":
        return list(range(size))
    if split not in SPLITS:
        raise DfmpcError(f"unknown split {split!r}; use 'dev' (the development half), 'test' (the test half) or 'all'")
    return list(range(SPLITS[split], size, 2))


class ImageListDataset(Dataset):
    """Images given as ``(path, label)`` pairs, decoded to RGB on access (like ImageFolder)."""

    def __init__(self, samples: list[tuple[str, int]], transform=None, classes: list[str] | None = None):
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # truncated, corrupt, huge
            reason = (str(e).splitlines() or [type(e).__name__])[0][:80]
            raise UnreadableImageError(path, reason) from None
        return (self.transform(img) if self.transform is not None else img), label


def data_folder(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder :func:`load_dataset` reads data set ``name`` from: ``data_dir``, else the offline copy, else
    (CIFAR) the download folder."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    folder = default_data_dir(name)
    if folder is not None:
        return folder
    if name == "imagenet":
        raise DfmpcError("ImageNet cannot be downloaded; pass --data-dir with a folder of <wnid>/*.JPEG images "
                         "(or point DFMPC_SHARED at the offline data folder)")
    return download_dir(name)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, transform=None, limit: int | None = None,
                 seed: int = 0, download: bool = True, cache: bool = False,
                 synsets: str | os.PathLike | None = None, progress: bool = True, split: str | None = None,
                 skip_unreadable: bool = False) -> Dataset:
    """Evaluation split of ``name`` ("cifar10", "cifar100", "imagenet") yielding ``(image, label)``.

    ``data_dir``: see the module docstring; None -> :func:`default_data_dir`, else (CIFAR only)
    ``~/.cache/dfmpc/<name>`` for torchvision's download.  ``transform`` is applied to each PIL image.
    ``limit=N``: a random subset of N images chosen by a permutation seeded with ``seed`` (the
    folders are sorted by class, so the first N would be a few classes only); N >= size -> all.
    ``cache=True``: decode and transform every image once and keep the tensors in memory
    (``transform`` defaults to ``ToTensor`` then).  ``synsets``: ImageNet class list, default
    ``synset_words.txt`` in ``data_dir`` or its parent.  ``progress``: show the caching progress bar.
    ``split``: "dev" or "test" for one half of the set (module docstring), taken before ``limit``;
    None or "all" for the whole set. An image that cannot be decoded raises :class:`UnreadableImageError` naming
    it; with ``cache=True`` and ``skip_unreadable=True`` it is left out instead, and the returned data set lists
    the files left out in its attribute ``skipped``.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise DfmpcError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if limit is not None and limit < 1:
        raise DfmpcError(f"--limit must be a positive number of images, got {limit}")
    if cache and transform is None:
        from torchvision.transforms import ToTensor

        transform = ToTensor()

    root = data_folder(key, data_dir)
    if data_dir is None and key != "imagenet" and root == download_dir(key):
        root.mkdir(parents=True, exist_ok=True)
    if not root.is_dir():
        raise DfmpcError(f"data folder {str(root)!r} does not exist; pass --data-dir with a local copy of {key}")

    if key == "imagenet":
        dataset = _imagenet(root, transform, synsets)
    elif _class_folders(root):
        dataset = _cifar_folder(root, key, transform)
    else:
        dataset = _cifar_torchvision(root, key, transform, download)

    positions = split_positions(len(dataset), split)
    if limit is not None and limit < len(positions):
        order = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))
        positions = [positions[i] for i in order[:limit].tolist()]
    if len(positions) < len(dataset):
        dataset = Subset(dataset, positions)
    return _cache(dataset, key, progress, skip_unreadable) if cache else dataset


def _class_folders(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that contain images (sorted by name)."""
    return sorted(d for d in root.iterdir() if d.is_dir() and _images(d))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXTENSIONS and p.is_file())


def _cifar_folder(root: Path, key: str, transform) -> ImageListDataset:
    folders = _class_folders(root)
    if len(folders) != DATASETS[key]:
        raise DfmpcError(f"{str(root)!r} has {len(folders)} class folders of images but {key} has "
                         f"{DATASETS[key]} classes; pass the --data-dir of {key}")
    samples = [(str(p), label) for label, d in enumerate(folders) for p in _images(d)]
    return ImageListDataset(samples, transform, [d.name for d in folders])


def _cifar_torchvision(root: Path, key: str, transform, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if key == "cifar10" else CIFAR100
    try:
        return cls(root=str(root), train=False, download=download, transform=transform)
    except RuntimeError as e:  # "Dataset not found or corrupted." when download=False
        raise DfmpcError(f"no {key} test set in {str(root)!r} ({e}); pass --data-dir with a local copy") from None
    except Exception as e:  # offline download: URLError and the like
        raise DfmpcError(f"cannot download {key} into {str(root)!r} ({type(e).__name__}); without internet "
                         "pass --data-dir with a local copy (class folders of images or torchvision's files)") from None


def _read_synsets(root: Path, synsets) -> list[str]:
    candidates = [Path(synsets).expanduser()] if synsets else [root / "synset_words.txt",
                                                               root.parent / "synset_words.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DfmpcError(f"ImageNet class list {' or '.join(map(str, candidates))} not found; pass --synsets "
                         "with synset_words.txt (one wnid per line in class-index order)")
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(wnids) != 1000:
        raise DfmpcError(f"{str(path)!r} lists {len(wnids)} classes, expected 1000 ImageNet wnids")
    return wnids


def _imagenet(root: Path, transform, synsets) -> ImageListDataset:
    wnids = _read_synsets(root, synsets)
    index = {w: i for i, w in enumerate(wnids)}
    folders = _class_folders(root)
    if not folders:
        raise DfmpcError(f"no <wnid>/ image folders in {str(root)!r}; pass --data-dir with ImageNet validation images")
    unknown = [d.name for d in folders if d.name not in index]
    if unknown:
        raise DfmpcError(f"folder {unknown[0]!r} in {str(root)!r} is not an ImageNet wnid of the class list; "
                         "pass --data-dir with <wnid>/*.JPEG folders")
    samples = [(str(p), index[d.name]) for d in folders for p in _images(d)]
    return ImageListDataset(samples, transform, wnids)


def _cache(dataset: Dataset, key: str, progress: bool = True, skip_unreadable: bool = False) -> TensorDataset:
    """Decode and transform every image once; keep images and labels as two tensors (and the unreadable files
    left out, with ``skip_unreadable``, in the attribute ``skipped``)."""
    from tqdm import tqdm  # plain text bar: tqdm.auto needs ipywidgets in notebooks

    images, labels, skipped = [], [], []
    for index in tqdm(range(len(dataset)), desc=f"caching {key}", unit="img", leave=False, disable=not progress):
        try:
            img, label = dataset[index]
        except UnreadableImageError as e:
            if not skip_unreadable:
                raise
            skipped.append(e.path)
            continue
        if not isinstance(img, torch.Tensor):
            raise DfmpcError("cache=True needs a transform that returns tensors")
        images.append(img)
        labels.append(int(label))
    if not images:
        raise DfmpcError(f"the {key} data set is empty" + (f" ({len(skipped)} unreadable images skipped)" if skipped else ""))
    cached = TensorDataset(torch.stack(images), torch.tensor(labels))
    cached.skipped = skipped
    return cached


def data_record(dataset: str, directory, available: int, used: int, images, seed: int, fallback,
                split: str | None = None) -> dict:
    """What a measurement was made on: the set, the folder, whether it is the lossy offline copy, how many images,
    and which half (``split``: "dev", "test" or None for the whole set; see :mod:`dfmpc.data`); ``available``
    counts the images of that half."""
    shared = default_data_dir(dataset)
    offline = bool(directory and shared and Path(directory).resolve() == shared.resolve())
    jpeg = dataset == "imagenet" or bool(directory and Path(directory).is_dir() and any(Path(directory).rglob("*.jp*g")))
    if offline and dataset == "cifar10":
        desc = "offline copy of the CIFAR-10 test set, stored as JPEG quality 75 (lossy: about 10 points below " \
               "published accuracies); for relative comparisons only"
    elif offline and dataset == "imagenet":
        desc = "offline subset of 1,300 ILSVRC2012 validation images (725 classes, pre-scaled to 227x227); easier " \
               "than the full validation set (+6 to +7 points); for relative comparisons only"
    elif dataset == "imagenet":
        desc = "ImageNet validation images from a local folder"
    else:
        desc = f"{dataset} test set (torchvision files, lossless)" if not jpeg else f"{dataset} images from a local folder"
    return {"dataset": dataset, "path": str(directory) if directory else None, "offline_copy": offline,
            "jpeg": jpeg, "images": used, "available": available, "limit": images, "split": split or "all",
            "selection": _selection(used, available, images, seed, split),
            "comparable_to_paper": not offline and not (jpeg and dataset != "imagenet"),
            "description": desc, "fallback": fallback}


def _selection(used: int, available: int, images, seed: int, split: str | None) -> str:
    if not split or split == "all":
        return "all" if used >= available else f"random subset, seed {seed}"
    half = {"dev": "development half (even positions)", "test": "test half (odd positions)"}[split]
    return half if used >= available else f"random subset of the {half}, seed {seed}"
