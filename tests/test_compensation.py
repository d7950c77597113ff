"""The closed form is the argmin of the stated objective, and every step of its derivation holds numerically."""
import pytest
import torch
import torch.nn.functional as F

from dfmpc import BatchNormStats, DfmpcError, compensation_objective, solve_compensation, ternary_quantize, uniform_quantize

LAMBDAS = [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (0.5, 0.01), (0.0, 0.1), (3.0, 1.0)]


def random_bn(n, gen):
    return BatchNormStats(mean=torch.randn(n, generator=gen) * 0.5, var=torch.rand(n, generator=gen) + 0.1,
                          weight=torch.randn(n, generator=gen), bias=torch.randn(n, generator=gen), eps=1e-5)


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

    model, _ = load_model("resnet20_cifar10_a", weights=str(next((shared / "data/cifar10/weights/he2016_option_a").glob("resnet20-*.th"))))
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


def test_eq10_decomposition_is_an_identity():
    """c Q(W) * A_hat - W * A = c (Q(W) - W) * A_hat + W * (c A_hat - A), per input channel j (Eq. 10)."""
    gen = torch.Generator().manual_seed(4)
    w_next = torch.randn(6, 1, 3, 3, generator=gen)
    q_next = uniform_quantize(w_next, 6).dequantize()
    a, a_hat = torch.randn(2, 1, 8, 8, generator=gen), torch.randn(2, 1, 8, 8, generator=gen)
    c = 0.7
    lhs = conv(a_hat, c * q_next) - conv(a, w_next)
    rhs = c * conv(a_hat, q_next - w_next) + conv(c * a_hat - a, w_next)
    assert torch.allclose(lhs, rhs, atol=1e-5)


def test_eq11_and_channel_regrouping():
    """Eq. (11): output channel j of layer l is the sum over input channels m of W_{j,m} * A_m, and
    Eq. (8): layer l+1's output t is the sum over its input channels j -- convolution is linear."""
    gen = torch.Generator().manual_seed(5)
    a_prev = torch.randn(2, 4, 8, 8, generator=gen)
    w = torch.randn(5, 4, 3, 3, generator=gen)
    x = conv(a_prev, w)
    by_channel = sum(conv(a_prev[:, m : m + 1], w[:, m : m + 1]) for m in range(4))
    assert torch.allclose(x, by_channel, atol=1e-5)
    # c_j times the ternary filter j == c_j times its output channel
    c = torch.rand(5, generator=gen)
    assert torch.allclose(conv(a_prev, c.reshape(5, 1, 1, 1) * w), c.reshape(1, 5, 1, 1) * x, atol=1e-5)


def test_relu_homogeneity_and_lipschitz_bound():
    """c f(z_hat) = f(c z_hat) for c >= 0, and |c f(z_hat) - f(z)| <= |c z_hat - z| (step 3)."""
    gen = torch.Generator().manual_seed(6)
    z, z_hat = torch.randn(10000, generator=gen), torch.randn(10000, generator=gen)
    for c in (0.0, 0.3, 1.0, 2.5):
        assert torch.allclose(c * F.relu(z_hat), F.relu(c * z_hat))
        assert ((c * F.relu(z_hat) - F.relu(z)).abs() <= (c * z_hat - z).abs() + 1e-7).all()


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
