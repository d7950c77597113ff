r"""The coupled gain: how much the layer after a quantized one averages away its noise (dfmpc+ step 2, the book's
derivation of why dfmpc+ uses the unbiased gain c = 1 / a rather than DF-MPC's least-squares one).

A quantized channel's output is x^_j = a_j x_j + n_j (slope a_j, noise n_j of variance r_j); the next layer mixes the
channels with weights ``w_next`` (T, C). :func:`coupled_objective` is the next layer's squared output error for
per-channel gains c; :func:`coupled_gain` its minimiser in closed form (the tests check it against autograd).
"""
from __future__ import annotations

import torch

__all__ = ["coupled_objective", "coupled_gain"]


def coupled_objective(c: torch.Tensor, slope: torch.Tensor, noise: torch.Tensor, w_next: torch.Tensor,
                      rho: float) -> torch.Tensor:
    r"""J(c) = sum_t E[(sum_j w_tj (c_j x^_j - x_j))^2] for x^_j = a_j x_j + n_j (:mod:`dfmpc.methods.dfmpc_plus`, step 2).

    x: unit-variance channels with common correlation ``rho``; n_j independent noise of variance r_j
    (``noise``); a_j = ``slope``; ``w_next`` (T, C): how the next layer mixes the channels.
    """
    u = c * slope - 1
    d = (w_next**2).sum(dim=0)
    g = w_next.T @ w_next
    return (1 - rho) * (d * u * u).sum() + rho * u @ g @ u + (d * c * c * noise).sum()


def coupled_gain(slope: torch.Tensor, noise: torch.Tensor, w_next: torch.Tensor, rho: float) -> torch.Tensor:
    r"""The minimiser of :func:`coupled_objective` in closed form.

    With u = c a - 1, D_j = sum_t w_tj^2, G = w_next^T w_next and H = (1 - rho) diag(D) + rho G, setting
    the gradient to zero gives (diag(a^2) H + diag(D r)) u = -D r, and c = (1 + u) / a. For rho = 0 this
    is DF-MPC's least-squares c_j = a_j / (a_j^2 + r_j) for every channel on its own; the more the next
    layer adds the channels coherently (rho G large against D r), the closer c comes to 1 / a.
    """
    a, r = slope.double(), noise.double()
    w = w_next.double()
    d = (w**2).sum(dim=0)
    # a channel the next layer does not read (D_j = 0) does not enter J: it keeps c = 1 / a
    live = d > d.max() * 1e-12
    u = torch.zeros_like(a)
    if live.any():
        wl, dl, al, rl = w[:, live], d[live], a[live], r[live]
        h = (1 - rho) * torch.diag(dl) + rho * (wl.T @ wl)
        u[live] = torch.linalg.lstsq(torch.diag(al * al) @ h + torch.diag(dl * rl), -(dl * rl)[:, None]).solution[:, 0]
    return (1 + u) / a
