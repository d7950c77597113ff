r"""The closed-form DF-MPC compensation for one (low-bit layer l, high-bit layer l+1) pair.

The paper (Chen et al. 2023) stops after Eq. (11); its closed form and the definitions of
Gamma, Theta, lambda_1 and lambda_2 are missing from our copy. This module implements our
derivation; the book chapter "The closed form" gives it step by step and the tests check every
step numerically.

Setting (paper Eq. 1-2, 7-8). Layer l has weights W (output channel j: filter W_j) and its
quantized version W_hat (codes times scale, :mod:`dfmpc.quantizers`). It is followed by a batch
normalization (running mean mu_j, running variance sigma_j^2, affine gamma_j, beta_j, epsilon) and a
positively homogeneous activation f (ReLU: f(c z) = c f(z) for c >= 0). Layer l+1 is quantized to
k bits and its input channel j is multiplied by c_j >= 0 (Eq. 7).

Derivation in four steps (Eq. 10-11 plus our data-free assumptions):

1. Eq. (10) splits the error of output channel t of layer l+1 into
   c_j (Q(W^{l+1}_{t,j}) - W^{l+1}_{t,j}) (*) A_hat_j   +   W^{l+1}_{t,j} (*) (c_j A_hat_j - A_j).
2. Assumption 1 (one-to-one channel compensation) treats every channel j on its own.
3. BN and ReLU put back: with s_j = gamma_j / sqrt(sigma_j^2 + eps) and the shift
   b_j = beta_j - s_j mu_j, A_j = f(s_j X_j + b_j) with X_j = W_j (*) A^{l-1} (Eq. 11). Because f is
   positively homogeneous and 1-Lipschitz,
   |c_j A_hat_j - A_j| <= |s_j| |(c_j W_hat_j - W_j) (*) A^{l-1} + (c_j - 1) b_bar_j|,
   with b_bar_j = b_j / s_j = beta_j / s_j - mu_j, the BN shift measured in units of X_j.
4. Data-free: the input A^{l-1} is unknown. We assume its second moments are isotropic, so that
   E[(V (*) A^{l-1})^2] = ||V||^2 E[X_j^2] / ||W_j||^2 for every filter V, and that the residual
   (c W_hat_j - W_j) (*) A^{l-1} has zero mean; E[X_j^2] = mu_j^2 + sigma_j^2 is recorded by the
   BN running statistics. Dividing by E[X_j^2] gives two dimensionless terms. The first term of
   Eq. (10) carries the 6-bit error Q - W, which is small and whose size depends on the unknown
   A_hat_j: it is kept as a plain ridge lambda_2 c_j^2 (the paper's ||c||^2 term).

The data-free surrogate of Eq. (9) that we minimise, separately for every channel j, is

    J_j(c) = ||Gamma_j(c)||^2 + lambda_1 ||Theta_j(c)||^2 + lambda_2 c^2,        c >= 0,

    Gamma_j(c) = (c W_hat_j - W_j) / ||W_j||                 (the low-bit filter's residual)
    Theta_j(c) = (c - 1) b_bar_j / sqrt(mu_j^2 + sigma_j^2 + eps)   (the BN shift that c also scales)

Steps 3-4 give lambda_1 = 1; the paper found lambda_1 = 0.5, lambda_2 = 0 best (Section 5.1).
J_j is a convex quadratic in the scalar c, so its minimiser over c >= 0 is

    c_j = max(0, (a_j + lambda_1 t_j) / (g_j + lambda_1 t_j + lambda_2)),
    a_j = <W_hat_j, W_j> / ||W_j||^2,   g_j = ||W_hat_j||^2 / ||W_j||^2,
    t_j = b_bar_j^2 / (mu_j^2 + sigma_j^2 + eps).

With lambda_1 = lambda_2 = 0 this is the per-channel least-squares scale a_j / g_j; lambda_1 pulls
c_j towards 1 (no compensation) in proportion to how much the BN shift would be distorted.

Conventions for degenerate channels (chosen so that no NaN can come out):
* ||W_j|| = 0 (all-zero filter): Gamma_j is taken as 0, the filter carries no signal.
* gamma_j = 0 (the channel's output is the constant beta_j, whatever the weights): there
  J_j(c) = (c - 1)^2, since any c != 1 only rescales that constant; so c_j = 1.
* no BN between the layers: Theta_j = 0 (no statistics to normalise the shift with).
* denominator 0 (e.g. all-zero codes and lambdas at 0): J_j does not depend on c; c_j = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import DfmpcError
from .moments import BatchNormStats

__all__ = ["BatchNormStats", "CompensationTerms", "check_lambdas", "compensation_terms", "compensation_objective",
           "solve_compensation"]


def check_lambdas(lambda1: float, lambda2: float) -> None:
    for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise DfmpcError(f"{name} must be a finite non-negative number, got {value!r}")


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).double()


@dataclass(frozen=True)
class CompensationTerms:
    """Per-channel coefficients of J_j(c) = g c^2 - 2 a c + r + lambda_1 t (c-1)^2 + lambda_2 c^2.

    ``r`` is 1 for a non-zero filter and 0 for an all-zero one; ``dead`` marks gamma_j = 0.
    """

    a: torch.Tensor
    g: torch.Tensor
    r: torch.Tensor
    t: torch.Tensor
    dead: torch.Tensor


def compensation_terms(w_low: torch.Tensor, w_low_q: torch.Tensor, bn: BatchNormStats | None = None) -> CompensationTerms:
    """The data a_j, g_j, t_j of the surrogate (see the module docstring), in float64."""
    if w_low.shape != w_low_q.shape:
        raise DfmpcError(f"weight shapes differ: full precision {tuple(w_low.shape)} vs quantized {tuple(w_low_q.shape)}")
    for name, w in (("full-precision", w_low), ("quantized", w_low_q)):
        if not torch.isfinite(w).all():
            raise DfmpcError(f"the {name} weight of the low-bit layer contains NaN or inf; check the model's weights")
    w, wq = _flat(w_low), _flat(w_low_q)
    norm_sq = (w * w).sum(dim=1)
    nonzero = norm_sq > 0
    safe = torch.where(nonzero, norm_sq, torch.ones_like(norm_sq))
    a = torch.where(nonzero, (wq * w).sum(dim=1) / safe, torch.zeros_like(norm_sq))
    g = torch.where(nonzero, (wq * wq).sum(dim=1) / safe, torch.zeros_like(norm_sq))
    r = nonzero.double()
    n = w.shape[0]
    if bn is None:
        t = torch.zeros(n, dtype=torch.float64, device=w.device)
        dead = torch.zeros(n, dtype=torch.bool, device=w.device)
    else:
        if bn.mean.numel() != n:
            raise DfmpcError(f"batch norm has {bn.mean.numel()} channels but the low-bit layer has {n} output channels")
        if not all(torch.isfinite(x).all() for x in (bn.mean, bn.var, bn.weight, bn.bias)):
            raise DfmpcError("batch norm statistics contain NaN or inf; check the model's buffers")
        t = bn.relative_shift_sq().double().to(w.device)
        dead = (bn.weight == 0).to(w.device)
    return CompensationTerms(a=a, g=g, r=r, t=t, dead=dead)


def compensation_objective(c: torch.Tensor, w_low: torch.Tensor, w_low_q: torch.Tensor, bn: BatchNormStats | None = None,
                           lambda1: float = 0.5, lambda2: float = 0.0) -> torch.Tensor:
    """J_j(c_j) for every channel j, computed from its definition (Gamma, Theta, ridge), not from a, g, t.

    Differentiable in ``c`` (used by the tests to check the closed form against autograd).
    """
    check_lambdas(lambda1, lambda2)
    w, wq = _flat(w_low), _flat(w_low_q)
    c = c.double()
    norm = w.norm(dim=1, keepdim=True)
    gamma = torch.where(norm > 0, (c[:, None] * wq - w) / torch.where(norm > 0, norm, torch.ones_like(norm)),
                        torch.zeros_like(w))
    j = (gamma**2).sum(dim=1) + lambda2 * c**2
    if bn is not None:
        theta_sq = (c - 1) ** 2 * bn.relative_shift_sq().double().to(c.device)
        j = j + lambda1 * theta_sq
        j = torch.where((bn.weight == 0).to(c.device), (c - 1) ** 2, j)
    return j


def solve_compensation(w_low: torch.Tensor, w_low_q: torch.Tensor, bn: BatchNormStats | None = None,
                       lambda1: float = 0.5, lambda2: float = 0.0) -> torch.Tensor:
    """Closed-form minimiser c >= 0 of the data-free surrogate J_j (module docstring), one value per channel.

    Args:
        w_low: full-precision weight of the low-bit layer l, output channels first.
        w_low_q: its dequantized low-bit version (same shape).
        bn: statistics of the batch norm between layer l and layer l+1, or None.
        lambda1: weight of ||Theta||^2 (pull towards c = 1 where the BN shift matters).
        lambda2: weight of the ridge ||c||^2 (from the high-bit error term of Eq. 10).

    Returns:
        float tensor of shape (C,), the coefficients c_j of Eq. (7), in the dtype of ``w_low``.
    """
    check_lambdas(lambda1, lambda2)
    terms = compensation_terms(w_low, w_low_q, bn)
    num = terms.a + lambda1 * terms.t
    den = terms.g + lambda1 * terms.t + lambda2
    c = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
    c = torch.where(terms.dead, torch.ones_like(c), c).clamp(min=0.0)
    return c.to(w_low.dtype)
