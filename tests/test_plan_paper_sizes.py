"""The paper's ImageNet model sizes (Tables 3-4) against our mixed-precision plan.

A systematic search (per-kind bit assignments of stem / conv1 / conv2 / conv3 / shortcut / transition /
classifier over {low, high, 8, 32} bits, alternation over the layers in execution or registration order,
within-block alternation, kernel-size rules; BN gamma/beta counted or not, running statistics counted or
not, no / per-tensor / per-channel 32-bit scales, compensation vectors counted or not, MB = 2^20 or 10^6
bytes or a ratio of the paper's FP32 size) found no reading of Figure 2 that reproduces the DF-MPC sizes
5.48 / 10.55 / 18.36 / 3.39 MB: no single rule matches two of the four models. So the plan keeps its
default and these tests pin what *is* established:

* the default plan's sizes (our pairing is unchanged);
* the convention of the paper's FP32 column (MiB for the ResNets, 10^6 bytes for DenseNet-121, and
  170.41 MB for ResNet-101 is the parameter count of pytorchcv's ``resnetd101b``, not ``resnet101``);
* why the DF-MPC sizes of ResNet-50 and ResNet-101 cannot both come from one per-layer rule: the two
  networks differ by exactly 17 identical bottleneck units, whose cost the paper's numbers fix at about
  3.46 bits per weight, which no assignment of 2 or 6 bits to the unit's three convolutions gives.
"""
from __future__ import annotations

import itertools

import pytest
from torch import nn

from dfmpc.models import load_model
from dfmpc.plan import plan_layers
from dfmpc.size import MIB, fp32_size_mb, quantized_size_mb

PAPER_DFMPC = {"resnet18": ("2/6", 5.48), "resnet50": ("2/6", 10.55), "resnet101": ("2/6", 18.36),
               "densenet121": ("3/6", 3.39)}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name, pretrained=False)[0]
        return cache[name]
    return get


def _weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize("name, high_mb, low_mb, low_share", [
    ("resnet18", 6.14, 5.81, 0.404),
    ("resnet50", 16.38, 11.68, 0.169),
    ("resnet101", 28.00, 21.18, 0.197),
    ("densenet121", 4.53, 3.91, 0.506),
])
def test_default_plan_is_unchanged(models, name, high_mb, low_mb, low_share):
    """Our plan (graph pairs low/high; unpaired high by default, or low) at its bits, c vectors not counted."""
    model, (bits, paper_mb) = models(name), PAPER_DFMPC[name]
    plan = plan_layers(model, bits)
    assert round(quantized_size_mb(model, plan.bits_by_layer()), 2) == high_mb
    assert round(quantized_size_mb(model, plan_layers(model, bits, unpaired="low").bits_by_layer()), 2) == low_mb
    assert high_mb > paper_mb and low_mb > paper_mb  # above the paper's size with either policy
    modules = dict(model.named_modules())
    low = sum(modules[a.name].weight.numel() for a in plan.layers if a.role == "low")
    assert low / sum(p.numel() for p in model.parameters()) == pytest.approx(low_share, abs=0.001)


def test_paper_fp32_column(models):
    assert round(fp32_size_mb(models("resnet18")), 2) == 44.59
    assert round(fp32_size_mb(models("resnet50")), 2) == 97.49
    # DenseNet-121: the same 4 bytes per parameter, but in decimal megabytes
    assert round(sum(p.numel() for p in models("densenet121").parameters()) * 4 / 1e6, 2) == 31.92
    # ResNet-101: 170.41 MB is pytorchcv's resnetd101b (deep 3-conv stem, 44,672,936 parameters)
    assert round(fp32_size_mb(models("resnet101")), 2) == 169.94
    from pytorchcv.model_provider import get_model  # not one of dfmpc's listed models: pytorchcv's own builder

    resnetd101b = get_model("resnetd101b", pretrained=False)
    assert sum(p.numel() for p in resnetd101b.parameters()) == 44_672_936
    assert round(fp32_size_mb(resnetd101b), 2) == 170.41


def test_resnet50_and_resnet101_sizes_exclude_any_per_layer_rule(models):
    r50, r101 = models("resnet50"), models("resnet101")
    unit = dict(r101.named_modules())["features.stage3.unit7.body"]
    convs = [m for m in unit.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in unit.modules() if isinstance(m, nn.BatchNorm2d)]
    n_weights = [c.weight.numel() for c in convs]
    n_bn = sum(p.numel() for b in bns for p in b.parameters())
    assert n_weights == [262144, 589824, 262144] and n_bn == 3072
    # ResNet-101 is ResNet-50 plus 17 of these units, nothing else
    assert sum(p.numel() for p in r101.parameters()) - sum(p.numel() for p in r50.parameters()) == 17 * (
        sum(n_weights) + n_bn)
    assert _weights(r101) - _weights(r50) == 17 * sum(n_weights)
    # The paper's sizes fix the cost of one unit (2-decimal rounding of both sizes, MiB as its FP32 column)
    lo = (18.36 - 10.55 - 0.01) * MIB / 17
    hi = (18.36 - 10.55 + 0.01) * MIB / 17
    assert 3.45 < lo / sum(n_weights) < hi / sum(n_weights) < 3.47
    # Every per-layer rule gives the 17 units the same bits: 2 or 6 bits for each conv, plus any overhead
    costs = set()
    out_channels = sum(c.out_channels for c in convs)
    for bits in itertools.product((2, 6), repeat=3):
        weights = sum(n * b for n, b in zip(n_weights, bits))
        for bn in (0, 32 * n_bn, 64 * n_bn):                      # BN not counted / gamma, beta / + running stats
            for scales in (0, 32 * 3, 32 * out_channels):         # none / per tensor / per output channel
                for c_vectors in (0, 32 * 256, 64 * 256):         # compensation vectors of 0, 1 or 2 pairs
                    costs.add(weights + bn + scales + c_vectors)
    assert not [c for c in costs if lo <= c <= hi]
    below, above = max(c for c in costs if c < lo), min(c for c in costs if c > hi)
    assert below / sum(n_weights) < 3.2 and above / sum(n_weights) > 3.8
