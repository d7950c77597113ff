r"""What the BatchNorm statistics say about a layer's input: data-free per-channel moments, and what they give.

A trained network carries a record of its activations: every BatchNorm's running mean mu_j and
running variance sigma_j^2 are the mean and variance of channel j of its input over the training
data. The BN's output z_j = gamma_j (x_j - mu_j) / sqrt(sigma_j^2 + eps) + beta_j therefore has mean
beta_j and variance gamma_j^2 sigma_j^2 / (sigma_j^2 + eps). With one further assumption -- z_j is
Gaussian -- the moments after an activation follow:

* ReLU:  E[relu z] = m Phi(a) + s phi(a),  E[relu(z)^2] = (m^2 + s^2) Phi(a) + m s phi(a),  a = m / s
  (z ~ N(m, s^2); Phi, phi: standard normal CDF and density);
* ReLU6 / Hardtanh(lo, hi): clip(z, 0, h) = relu(z) - relu(z - h), clip^2 = relu(z)^2 - relu(z-h)^2
  - 2 h relu(z - h), so the clipped moments are differences of rectified ones;
* LeakyReLU(a): relu(z) - a relu(-z), whose two parts never overlap;
* any other elementwise activation f (SiLU, GELU, sigmoid, ...): E f(z) and E f(z)^2 by Gauss-Hermite
  quadrature (:func:`activation_moments`).

:mod:`dfmpc.propagation` carries these moments through a whole network's graph. Here also:
:class:`BatchNormStats` (what one BN records), :func:`expected_output_shift` (the expected change of a
layer's output when its weight W is replaced by W + D: E[D (*) x]_o = sum_{i,k} D_{o,i,k} mu_i, border
pixels treated like interior ones) and :func:`weighted_output_energy`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DfmpcError

__all__ = ["BatchNormStats", "ChannelMoments", "relu_moments", "clip_moments", "leaky_relu_moments", "activation_moments",
           "per_input_channel", "expected_output_shift", "weighted_output_energy"]

_SQRT_2PI = math.sqrt(2 * math.pi)


@dataclass(frozen=True)
class BatchNormStats:
    """The running statistics and affine parameters of the BN after layer l (eval mode)."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    @classmethod
    def from_module(cls, bn: nn.Module) -> BatchNormStats:
        if bn.running_mean is None or bn.running_var is None:
            raise DfmpcError(f"{type(bn).__name__} has no running statistics (track_running_stats=False); "
                             "DF-MPC needs them: build the model with track_running_stats=True")
        n = bn.running_mean.numel()
        weight = bn.weight.detach() if bn.weight is not None else torch.ones(n)
        bias = bn.bias.detach() if bn.bias is not None else torch.zeros(n)
        return cls(bn.running_mean.detach(), bn.running_var.detach(), weight, bias, float(bn.eps))

    @property
    def scale(self) -> torch.Tensor:
        """s_j = gamma_j / sqrt(sigma_j^2 + eps)."""
        return self.weight / torch.sqrt(self.var + self.eps)

    def relative_shift_sq(self) -> torch.Tensor:
        """t_j = b_bar_j^2 / (mu_j^2 + sigma_j^2 + eps), with b_bar_j = beta_j / s_j - mu_j (0 where s_j = 0)."""
        s = self.scale
        safe_s = torch.where(s != 0, s, torch.ones_like(s))
        b_bar = torch.where(s != 0, self.bias / safe_s - self.mean, torch.zeros_like(s))
        return b_bar**2 / (self.mean**2 + self.var + self.eps)


@dataclass(frozen=True)
class ChannelMoments:
    """Per-channel mean and variance of an activation (1-D float64 tensors of length C)."""

    mean: torch.Tensor
    var: torch.Tensor

    @property
    def second(self) -> torch.Tensor:
        """E[x^2] = var + mean^2."""
        return self.var + self.mean**2


def _phi(a: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * a * a) / _SQRT_2PI


def _relu_raw(m: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[relu z] and E[relu(z)^2] for z ~ N(m, v) (v = 0 allowed: z is the constant m)."""
    m, v = m.double(), v.double().clamp(min=0)
    s = v.sqrt()
    positive = s > 0
    safe_s = torch.where(positive, s, torch.ones_like(s))
    a = m / safe_s
    cdf, pdf = torch.special.ndtr(a), _phi(a)
    first = torch.where(positive, m * cdf + s * pdf, m.clamp(min=0))
    second = torch.where(positive, (m * m + v) * cdf + m * s * pdf, m.clamp(min=0) ** 2)
    return first, second


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of relu(z) for z ~ N(mean, var), elementwise (float64)."""
    first, second = _relu_raw(mean, var)
    return first, (second - first**2).clamp(min=0)


def clip_moments(mean: torch.Tensor, var: torch.Tensor, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of clip(z, lo, hi) for z ~ N(mean, var), lo < hi finite (ReLU6: 0, 6); the bounds may
    be tensors that broadcast with ``mean`` (one clip range per channel)."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
    if not bool((lo < hi).all()):
        raise DfmpcError(f"clip bounds must satisfy lo < hi, got {lo.tolist()}, {hi.tolist()}")
    h = hi - lo
    m = mean.double() - lo
    r1, r2 = _relu_raw(m, var)
    t1, t2 = _relu_raw(m - h, var)
    first = r1 - t1
    second = r2 - t2 - 2 * h * t1
    return first + lo, (second - first**2).clamp(min=0)


def leaky_relu_moments(mean: torch.Tensor, var: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of leaky_relu(z) = relu(z) - slope relu(-z) for z ~ N(mean, var): the two parts are
    never both non-zero, so E[f^2] = E[relu(z)^2] + slope^2 E[relu(-z)^2]."""
    p1, p2 = _relu_raw(mean, var)
    n1, n2 = _relu_raw(-mean.double(), var)
    first = p1 - slope * n1
    return first, (p2 + slope**2 * n2 - first**2).clamp(min=0)


_HERMITE_POINTS = 64


def activation_moments(f, mean: torch.Tensor, var: torch.Tensor, points: int = _HERMITE_POINTS
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of f(z) for z ~ N(mean, var), elementwise, for any elementwise function f.

    Gauss-Hermite quadrature: E g(z) = sum_i w_i g(mean + sqrt(var) x_i) / sqrt(2 pi) with the ``points``
    nodes x_i and weights w_i of the probabilists' Hermite polynomials; exact for polynomials of degree
    below 2 * points, and within 1e-6 of Monte Carlo for the smooth activations (SiLU, GELU, sigmoid, tanh).
    """
    import numpy as np

    x, w = np.polynomial.hermite_e.hermegauss(points)
    x = torch.tensor(x, dtype=torch.float64)
    w = torch.tensor(w, dtype=torch.float64) / math.sqrt(2 * math.pi)
    m, s = mean.double()[..., None], var.double().clamp(min=0).sqrt()[..., None]
    values = f(m + s * x).double()
    first = (values * w).sum(-1)
    second = (values**2 * w).sum(-1)
    return first, (second - first**2).clamp(min=0)


def per_input_channel(layer: nn.Module, vec: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-channel vector to the weight's shape (grouped convolutions included)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return vec.reshape(1, -1)
    groups = layer.groups
    out_per_group, in_per_group = w.shape[0] // groups, w.shape[1]
    group_of_output = torch.arange(w.shape[0]) // out_per_group
    index = group_of_output[:, None] * in_per_group + torch.arange(in_per_group)[None, :]
    return vec[index].reshape(w.shape[0], in_per_group, *([1] * (w.dim() - 2)))


def expected_output_shift(layer: nn.Module, delta: torch.Tensor, moments: ChannelMoments) -> torch.Tensor:
    """E[(delta (*) x)_o] = sum_{i,k} delta_{o,i,k} mu_i for every output channel o (float64)."""
    mu = per_input_channel(layer, moments.mean.double())
    return (delta.double() * mu).reshape(delta.shape[0], -1).sum(dim=1)


def weighted_output_energy(layer: nn.Module, weight: torch.Tensor, moments: ChannelMoments,
                           centred: bool = True) -> torch.Tensor:
    """sum_{i,k} v_i w_{o,i,k}^2 per output channel: Var[(w (*) x)_o] for independent inputs of variance v_i.

    ``centred=False`` uses E[x_i^2] instead of Var[x_i].
    """
    v = moments.var if centred else moments.second
    vb = per_input_channel(layer, v.double())
    return (weight.double() ** 2 * vb).reshape(weight.shape[0], -1).sum(dim=1)
