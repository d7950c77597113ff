"""Building blocks the tests' small networks share (pytest puts tests/ on sys.path: `from nets import ...`)."""
import torch
from torch import nn


def random_bn(channels: int, generator: torch.Generator) -> nn.BatchNorm2d:
    """A BatchNorm with random running statistics and affine parameters (variances and scales kept >= 0.5)."""
    bn = nn.BatchNorm2d(channels)
    bn.running_mean.copy_(torch.randn(channels, generator=generator))
    bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    bn.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
    bn.bias.data.copy_(torch.randn(channels, generator=generator) * 0.5)
    return bn
