"""The closed form is the argmin of the stated objective, and every step of its derivation holds numerically."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfmpc
from dfmpc import (
    BatchNormStats,
    DfmpcError,
    compensation_objective,
    find_pairs,
    solve_compensation,
    ternary_quantize,
    uniform_quantize,
)
from dfmpc.methods.dfmpc import apply_compensation

LAMBDAS = [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (0.5, 0.01), (0.0, 0.1), (3.0, 1.0)]


def random_bn(n, gen):
    return BatchNormStats(mean=torch.randn(n, generator=gen) * 0.5, var=torch.rand(n, generator=gen) + 0.1,
                          weight=torch.randn(n, generator=gen), bias=torch.randn(n, generator=gen), eps=1e-5)


def test_relative_shift_sq_by_hand():
    """t_j = b_bar_j^2 / (mu_j^2 + sigma_j^2 + eps): mu = 2, sigma^2 = 5, gamma = 1, beta = sqrt(5), eps = 0 give
    s = 1/sqrt(5), b_bar = beta / s - mu = 3 and t = 9 / (4 + 5) = 1 (9/5 without mu^2, 9/4 without sigma^2).
    The solver and the objective both read t from here, so only a value computed by hand catches a wrong t."""
    bn = BatchNormStats(mean=torch.tensor([2.0, -1.0]), var=torch.tensor([5.0, 3.0]), weight=torch.tensor([1.0, 2.0]),
                        bias=torch.tensor([5**0.5, 0.0]), eps=0.0)
    # channel 2: s = 2/sqrt(3), b_bar = 0 - (-1) = 1, t = 1 / (1 + 3)
    assert torch.allclose(bn.relative_shift_sq().double(), torch.tensor([1.0, 0.25], dtype=torch.float64), atol=1e-6)


def brute_force_argmin(objective, n, lo=0.0, hi=4.0, steps=40001):
    """Evaluate J_j on a dense grid, then refine around the best point; independent of the closed form."""
    grid = torch.linspace(lo, hi, steps, dtype=torch.float64)
    values = torch.stack([objective(torch.full((n,), float(g), dtype=torch.float64)) for g in grid[::100]])
    best = grid[::100][values.argmin(dim=0)]
    fine = best[None, :] + torch.linspace(-0.01, 0.01, 1001, dtype=torch.float64)[:, None]
    fine = fine.clamp(min=0)
    values = torch.stack([objective(row) for row in fine])
    return fine.gather(0, values.argmin(dim=0)[None, :])[0]


def assert_argmin(c, objective, atol=2e-5):
    """c matches the brute-force minimiser wherever J_j depends on c, and is never worse anywhere.

    Where J_j is flat (a filter whose codes are all zero, with the lambdas at 0) every c is a minimiser.
    """
    c = c.double()
    brute = brute_force_argmin(objective, c.numel())
    n = c.numel()
    flat = objective(torch.zeros(n, dtype=torch.float64)) == objective(torch.full((n,), 2.0, dtype=torch.float64))
    assert torch.allclose(c[~flat], brute[~flat], atol=atol)
    assert (objective(c) <= objective(brute) + 1e-12).all()
    return flat


def check_kkt(c, objective, tol=1e-9):
    """Autograd: dJ/dc = 0 where c > 0 and dJ/dc >= 0 where c = 0 (optimality of a convex problem on c >= 0)."""
    c = c.double().clone().requires_grad_(True)
    objective(c).sum().backward()
    grad = c.grad
    inner = c.detach() > 0
    assert grad[inner].abs().max() < tol if inner.any() else True
    assert (grad[~inner] >= -1e-10).all()


@pytest.mark.parametrize("lambda1,lambda2", LAMBDAS)
@pytest.mark.parametrize("bits", [2, 3, 6])
def test_closed_form_is_argmin_on_random_layers(lambda1, lambda2, bits):
    gen = torch.Generator().manual_seed(bits)
    w = (torch.randn(24, 8, 3, 3, generator=gen) * torch.rand(24, 1, 1, 1, generator=gen)).double()
    wq = ternary_quantize(w).dequantize() if bits == 2 else uniform_quantize(w, bits).dequantize()
    bn = random_bn(24, gen)
    c = solve_compensation(w, wq, bn, lambda1, lambda2)
    objective = lambda cc: compensation_objective(cc, w, wq, bn, lambda1, lambda2)
    check_kkt(c, objective)
    flat = assert_argmin(c, objective)
    assert flat.sum() <= 3  # the check must cover (almost) every channel


def test_closed_form_is_argmin_on_a_real_layer(shared):
    from dfmpc.models import load_model

    weights = next((shared / "data/cifar10/weights/he2016_option_a").glob("resnet20-*.th"))
    model, _ = load_model("resnet20_cifar10_a", weights=str(weights))
    modules = dict(model.named_modules())
    conv, bn_mod = modules["layer2.1.conv1"], modules["layer2.1.bn1"]
    w = conv.weight.detach()
    wq = ternary_quantize(w).dequantize()
    bn = BatchNormStats.from_module(bn_mod)
    for lambda1, lambda2 in LAMBDAS:
        c = solve_compensation(w, wq, bn, lambda1, lambda2)
        objective = lambda cc: compensation_objective(cc, w, wq, bn, lambda1, lambda2)
        check_kkt(c, objective, tol=1e-5)  # c comes back in the layer's float32
        assert_argmin(c, objective)


def test_lambdas_at_zero_give_the_per_channel_least_squares_scale():
    w = torch.randn(10, 4, 3, 3)
    wq = ternary_quantize(w).dequantize()
    c = solve_compensation(w, wq, random_bn(10, torch.Generator().manual_seed(1)), 0.0, 0.0)
    flat_w, flat_q = w.reshape(10, -1), wq.reshape(10, -1)
    ls = (flat_w * flat_q).sum(1) / (flat_q * flat_q).sum(1)
    assert torch.allclose(c, ls, atol=1e-6)


def test_large_lambda1_pulls_towards_no_compensation():
    w = torch.randn(10, 4, 3, 3)
    wq = ternary_quantize(w).dequantize()
    bn = random_bn(10, torch.Generator().manual_seed(2))
    c_small = solve_compensation(w, wq, bn, 0.0, 0.0)
    c_big = solve_compensation(w, wq, bn, 1e6, 0.0)
    assert torch.allclose(c_big, torch.ones(10), atol=1e-3)
    assert (c_small - 1).abs().mean() > 1e-2


def test_edge_channels_give_finite_argmins():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    w[0] = 0  # all-zero channel
    w[1] = 1e-3 * w[1]  # tiny channel: all its ternary codes are zero at the per-tensor threshold
    bn = random_bn(6, gen)
    bn.weight[2] = 0  # dead BN channel: output is the constant beta
    wq = ternary_quantize(w).dequantize()
    assert (wq[1] == 0).all()
    for lambda1, lambda2 in LAMBDAS:
        c = solve_compensation(w, wq, bn, lambda1, lambda2)
        assert torch.isfinite(c).all() and (c >= 0).all()
        assert c[2] == 1
        objective = lambda cc: compensation_objective(cc, w, wq, bn, lambda1, lambda2)
        # where J_j does not depend on c (zero filter or zero codes, no shift or ridge), any c is optimal;
        # elsewhere the closed form must match the brute force
        assert_argmin(c, objective)
    # all lambdas at zero: J does not depend on c for the zero channels, and we leave them alone (c = 1)
    c = solve_compensation(w, wq, None, 0.0, 0.0)
    assert c[0] == 1 and c[1] == 1


def test_without_batch_norm_theta_is_dropped():
    w = torch.randn(5, 3, 3, 3)
    wq = ternary_quantize(w).dequantize()
    assert torch.allclose(solve_compensation(w, wq, None, 0.5, 0.0), solve_compensation(w, wq, None, 0.0, 0.0))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.5"])
def test_bad_lambdas_raise(bad):
    w = torch.randn(3, 3)
    with pytest.raises(DfmpcError, match="lambda1"):
        solve_compensation(w, w, None, bad, 0.0)
    with pytest.raises(DfmpcError, match="lambda2"):
        solve_compensation(w, w, None, 0.5, bad)


def test_nan_weights_raise():
    w = torch.randn(3, 3)
    wq = w.clone()
    wq[0, 0] = float("nan")
    with pytest.raises(DfmpcError, match="NaN"):
        solve_compensation(w, wq)


# --- the derivation, step by step -----------------------------------------------------------------

def conv(a, w):
    return F.conv2d(a, w, padding=w.shape[-1] // 2)


def _pair_net(seed: int, between: nn.Module, groups: int = 1) -> nn.Sequential:
    """conv(4 -> 6) -> BN -> ``between`` -> conv(6 -> 6, ``groups``): one DF-MPC pair, BN with real-looking stats."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), between,
                        nn.Conv2d(6, 6, 3, padding=1, bias=False, groups=groups)).eval()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    net[1].weight.data.uniform_(0.5, 1.5)
    net[1].bias.data.uniform_(-0.5, 0.5)
    return net


def test_eq10_decomposition_holds_for_the_layer_dfmpc_compensated():
    """Eq. (10) on a model that dfmpc.quantize compensated: the output error of layer l+1 is
    c (Q(W) - W) * A_hat + W * (c A_hat - A), per input channel j, with Q the 6-bit quantizer of Eq. (6), c the
    report's coefficients and A_hat the activations the quantized model itself feeds to layer l+1 (Eq. 7:
    c multiplies the input channels of the quantized high layer -- any other placement breaks this)."""
    net = _pair_net(0, nn.ReLU())
    q, report = dfmpc.quantize(net, "2/6", lambda1=0.5)
    c = report.compensation["3"].reshape(1, -1, 1, 1)
    assert report.pairs == [("0", "3")] and not torch.allclose(c, torch.ones_like(c))
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, a_hat = net[:3](x), q[:3](x)
        w = net[3].weight
        q_w = uniform_quantize(w, 6).dequantize()
        lhs = q[3](a_hat) - net[3](a)
        rhs = conv(c * a_hat, q_w - w) + conv(c * a_hat - a, w)
    assert torch.allclose(lhs, rhs, atol=1e-5)
    assert not torch.allclose(lhs, conv(a_hat, q_w) - conv(a, w), atol=1e-3)  # c did act


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_eq7_scaling_input_channels_of_layer_l1_equals_scaling_outputs_of_layer_l(groups):
    """Eq. (7)/(11) in dfmpc's code: c_j on input channel j of layer l+1 (``apply_compensation``, fold="next",
    through ``input_channel_multiplier``, grouped and depthwise convolutions included) gives the same output as
    c_j on output channel j of layer l after BN and ReLU (fold="bn"), because ReLU is positively homogeneous."""
    net = _pair_net(2, nn.ReLU(), groups)
    pair = find_pairs(net)[0]
    assert (pair.low, pair.high, pair.bn, pair.exact) == ("0", "3", "1", True)
    c = torch.rand(6, generator=torch.Generator().manual_seed(3)) * 2
    by_input, by_bn = copy.deepcopy(net), copy.deepcopy(net)
    with torch.no_grad():
        apply_compensation(by_input, pair, c, fold="next")
        apply_compensation(by_bn, pair, c, fold="bn")
        x = torch.randn(2, 4, 8, 8)
        assert torch.allclose(by_input(x), by_bn(x), atol=1e-5)
        # and it is input channel j of layer l+1 that c_j scales
        scaled = F.conv2d(c.reshape(1, -1, 1, 1) * net[:3](x), net[3].weight, padding=1, groups=groups)
        assert torch.allclose(by_input(x), scaled, atol=1e-5)


def test_pairs_through_relu6_are_inexact_and_refuse_the_bn_fold():
    """Step 3 needs a positively homogeneous activation. Through ReLU6 dfmpc marks the pair inexact and refuses
    fold="bn" with a clear error -- rightly: there c relu6(z) and relu6(c z) differ, the two folds disagree."""
    net = _pair_net(4, nn.ReLU6())
    net[1].bias.data.fill_(5.0)  # pre-activations near the clip at 6
    (pair,) = find_pairs(net)
    assert not pair.exact
    with pytest.raises(DfmpcError, match="positively homogeneous"):
        dfmpc.quantize(net, "2/6", fold="bn")
    c = torch.full((6,), 1.5)
    by_input, by_bn = copy.deepcopy(net), copy.deepcopy(net)
    with torch.no_grad():
        apply_compensation(by_input, pair, c, fold="next")
        by_bn[1].weight.mul_(c)
        by_bn[1].bias.mul_(c)
        x = torch.randn(2, 4, 8, 8)
        assert not torch.allclose(by_input(x), by_bn(x), atol=1e-2)


def test_the_bn_fold_without_affine_parameters_is_refused_and_next_works():
    net = _pair_net(5, nn.ReLU())
    net[1] = nn.BatchNorm2d(6, affine=False).eval()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    with pytest.raises(DfmpcError, match="no affine parameters"):
        dfmpc.quantize(net, "2/6", fold="bn")
    q, report = dfmpc.quantize(net, "2/6", fold="next")
    c = report.compensation["3"]
    assert torch.isfinite(c).all() and (c >= 0).all() and q[1].weight is None


def test_per_channel_ternary_scales_leave_every_c_at_one():
    """With one ternary scale per output channel, TWN's alpha_j is already the least-squares scale of its codes
    (a_j = g_j in the closed form), so with lambda_2 = 0 DF-MPC has nothing left to compensate: c_j = 1."""
    from dfmpc.models import load_model

    model, _ = load_model("resnet20_cifar10_a", pretrained=False)
    for lambda1 in (0.0, 0.5, 3.0):
        _, report = dfmpc.quantize(model, "2/6", lambda1=lambda1, lambda2=0.0, granularity="channel")
        cs = torch.cat(list(report.compensation.values()))
        assert cs.numel() == 3 * (16 + 32 + 64)  # one c per output channel of the 9 low layers
        assert torch.allclose(cs, torch.ones_like(cs), atol=1e-5), (lambda1, cs.min(), cs.max())
    _, report = dfmpc.quantize(model, "2/6", lambda2=0.1, granularity="channel")  # the ridge pulls below 1
    assert all((c < 1).all() for c in report.compensation.values())


def test_surrogate_equals_the_true_pre_activation_error_for_white_inputs():
    """Step 4: for zero-mean white inputs (the isotropy assumption holds exactly), the expected squared
    pre-activation error of channel j, divided by s_j^2 E[X_j^2], is J_j(c) with lambda_1 = 1, lambda_2 = 0;
    and after the ReLU the true error stays below it."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(6, 16, 3, 3, generator=gen)
    wq = ternary_quantize(w).dequantize()
    a = torch.randn(64, 16, 34, 34, generator=gen)
    x, x_hat = F.conv2d(a, w)[:, :, 1:-1, 1:-1], F.conv2d(a, wq)[:, :, 1:-1, 1:-1]  # interior pixels
    mu, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))
    bn = BatchNormStats(mean=mu, var=var, weight=torch.rand(6, generator=gen) + 0.5,
                        bias=torch.randn(6, generator=gen), eps=1e-5)
    s, b = bn.scale.reshape(1, -1, 1, 1), (bn.bias - bn.scale * mu).reshape(1, -1, 1, 1)
    z, z_hat = s * x + b, s * x_hat + b
    c = torch.linspace(0.5, 1.5, 6)
    cc = c.reshape(1, -1, 1, 1)
    true_pre = ((cc * z_hat - z) ** 2).mean(dim=(0, 2, 3)) / (bn.scale**2 * (mu**2 + var + bn.eps))
    surrogate = compensation_objective(c, w, wq, bn, lambda1=1.0, lambda2=0.0).float()
    assert torch.allclose(true_pre, surrogate, rtol=0.03)
    true_post = ((cc * F.relu(z_hat) - F.relu(z)) ** 2).mean(dim=(0, 2, 3)) / (bn.scale**2 * (mu**2 + var + bn.eps))
    assert (true_post <= true_pre).all()
