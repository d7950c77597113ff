"""ResNets for 32x32 CIFAR images (He et al. 2016, section 4.2).

Two variants, each written so that published weight files load with ``strict=True``:

* :class:`CifarResNet` -- "option A" (identity shortcuts; where the shape changes, the
  input is subsampled by 2 and zero-padded in channels), exactly the architecture of
  GitHub akamaster/pytorch_resnet_cifar10 (attribute names ``conv1, bn1, layer1..3, linear``).
* :class:`CifarResNetB` -- 1x1-conv + BN projection shortcuts where the shape changes,
  the architecture of GitHub chenyaofo/pytorch-cifar-models (``downsample``, ``fc``).

Both are traceable by ``torch.fx.symbolic_trace``: shortcuts are modules, ReLUs are
``nn.ReLU`` modules (one per use, so hooks see each activation separately) and pooling
is ``nn.AdaptiveAvgPool2d``.  Every basic block computes
``conv1 -> bn1 -> relu1 -> conv2 -> bn2 -> (+ shortcut) -> relu2``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PadShortcut", "BasicBlock", "CifarResNet", "CifarResNetB", "blocks_per_stage"]


def blocks_per_stage(depth: int) -> int:
    """Number n of basic blocks per stage of a depth-(6n+2) CIFAR ResNet."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
    return (depth - 2) // 6


class PadShortcut(nn.Module):
    """Option-A shortcut: take every 2nd pixel and zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    ``option="A"`` stores the shortcut as ``shortcut`` (parameter-free, so absent from the
    state dict, as in akamaster's files); ``option="B"`` stores a 1x1-conv + BN projection
    as ``downsample`` (the key names of chenyaofo's files).  Where the shape is unchanged
    the shortcut is ``nn.Identity``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        reshape = stride != 1 or in_planes != planes
        if option == "A":
            # akamaster pads planes//4 on each side: 16 -> 32 -> 64 channels.
            self.shortcut = PadShortcut(planes // 4) if reshape else nn.Identity()
        elif option == "B":
            self.downsample = (
                nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
                if reshape else nn.Identity()
            )
        else:
            raise ValueError(f"shortcut option must be 'A' or 'B', got {option!r}")
        self.option = option

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.shortcut(x) if self.option == "A" else self.downsample(x)
        return self.relu2(out + identity)


class _CifarResNetBase(nn.Module):
    """Stem (3x3 conv, 16 channels) + 3 stages of n blocks (16/32/64 channels) + pooling."""

    option = "A"

    def __init__(self, depth: int):
        super().__init__()
        n = blocks_per_stage(depth)
        self.depth = depth
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self._in_planes = 16
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self._in_planes, planes, s, self.option))
            self._in_planes = planes
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # Kaiming-normal convolutions/linear as both upstream repositories do.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


class CifarResNet(_CifarResNetBase):
    """Option-A CIFAR ResNet of depth 6n+2 (akamaster/pytorch_resnet_cifar10 layout).

    ResNet-20 has 269,722 parameters, ResNet-56 853,018 (10 classes).
    """

    option = "A"

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__(depth)
        self.linear = nn.Linear(64, num_classes)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class CifarResNetB(_CifarResNetBase):
    """Projection-shortcut CIFAR ResNet of depth 6n+2 (chenyaofo/pytorch-cifar-models layout).

    ResNet-56 with 100 classes has 861,620 parameters.
    """

    option = "B"

    def __init__(self, depth: int = 56, num_classes: int = 100):
        super().__init__(depth)
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
