"""SQuant (Guo et al., ICLR 2022): flip rounding that keeps every kernel's and output channel's rounding-error sum
within half a step; checked against a plain loop over kernels and channels that follows the reference's rule."""
import copy

import pytest
import torch
from nets import random_bn
from torch import nn

import dfmpc
from dfmpc.cifar_resnet import CifarResNet
from dfmpc.errors import DfmpcError
from dfmpc.methods import METHODS
from dfmpc.methods.squant import SQuant, grid_position, squant_quantize, squant_round
from dfmpc.quantizers import quantize_weight
from dfmpc.rounding import squant_reference_grid

GRIDS = {2: (-1, 1), 3: (0, 7), 4: (0, 15), 6: (0, 63)}
SHAPES = [(4, 5, 3, 3), (3, 2, 1, 5), (6, 1, 3, 3), (5, 7), (2, 3, 1, 1)]  # conv, odd kernel, depthwise, linear, 1x1


def _weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) + 0.2)


def _errors(codes, x, lo, hi):
    """e = code - clip(x), as [O, I, K] (double)."""
    target = x.double().clamp(lo, hi)
    return (codes.double() - target).reshape(x.shape[0], x.shape[1], -1)


# --------------------------------------------------------------------------- the reference's rule as a plain loop

def _loop_squant(x, lo, hi, start, squant_k=True, squant_c=True):
    """One kernel and one channel at a time, in Python floats: SQuant-K flips round(|s|) entries of largest |e|
    towards zero and leaves one candidate (undo the last flip if it went past zero, else the next entry in line);
    SQuant-C flips round(|S|) candidates of the channel (largest current |e| first) in the direction of -S."""
    rows, cols = x.shape[0], x.shape[1]
    xs = x.double().clamp(lo, hi).reshape(rows, cols, -1).tolist()
    codes = start.double().reshape(rows, cols, -1).tolist()
    size = len(xs[0][0])

    def can(c, e, d):
        return (e < 0 and c + 1 <= hi) if d > 0 else (e > 0 and c - 1 >= lo)

    candidates = [[] for _ in range(rows)]  # per channel: (priority, slot, i, j, direction)
    for o in range(rows):
        for i in range(cols):
            err = [codes[o][i][j] - xs[o][i][j] for j in range(size)]
            if not (squant_k and size > 1):
                for j in range(size):
                    d = 1 if err[j] < 0 else -1
                    if err[j] != 0 and can(codes[o][i][j], err[j], d):
                        candidates[o].append((abs(err[j]), i * size + j, i, j, d))
                continue
            s = sum(err)
            if s == 0:
                continue
            d = 1 if s < 0 else -1
            line = sorted((j for j in range(size) if can(codes[o][i][j], err[j], d)), key=lambda j: -abs(err[j]))
            k = min(round(abs(s)), len(line))
            for j in line[:k]:
                codes[o][i][j] += d
            if k > 0 and k >= abs(s):
                j = line[k - 1]
                candidates[o].append((abs(err[j] + d), i, i, j, -d))
            elif k < len(line):
                j = line[k]
                candidates[o].append((abs(err[j]), i, i, j, d))
    if squant_c:
        for o in range(rows):
            total = sum(codes[o][i][j] - xs[o][i][j] for i in range(cols) for j in range(size))
            if total == 0:
                continue
            d = 1 if total < 0 else -1
            line = sorted((c for c in candidates[o] if c[4] == d), key=lambda c: (-c[0], c[1]))
            for _, _, i, j, _ in line[:min(round(abs(total)), len(line))]:
                codes[o][i][j] += d
    return torch.tensor(codes, dtype=torch.int64).reshape(x.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 6])
@pytest.mark.parametrize("mode", [(True, True), (True, False), (False, True)])
def test_vectorised_squant_equals_the_loop_over_kernels_and_channels(shape, bits, mode):
    for seed in range(3):
        w = _weight(shape, seed)
        x, base = grid_position(w, bits)
        lo, hi = GRIDS[bits]
        ours = squant_quantize(w, bits, "channel", *mode).codes.to(torch.int64)
        assert torch.equal(ours, _loop_squant(x, lo, hi, base.codes, *mode))


@pytest.mark.parametrize("seed", range(3))
def test_ties_exact_half_sums_and_clipping_follow_the_loop(seed):
    """x on quarter steps: equal |e| (ties to the lower index), sums of exactly k + 1/2, errors of exactly 0; and x
    beyond the grid, which is clipped first."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-12, 12, (5, 4, 3, 3), generator=g).double() / 4
    for lo, hi in [(-1, 1), (-3, 3)]:
        for mode in [(True, True), (True, False), (False, True)]:
            start = torch.round(x.clamp(lo, hi))
            assert torch.equal(squant_round(x, lo, hi, None, *mode), _loop_squant(x, lo, hi, start, *mode))


# --------------------------------------------------------------------------- the constraints and the grid

@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_constraints_hold_and_every_code_is_floor_or_ceil_of_x(bits, granularity):
    w = _weight((16, 12, 3, 3), bits)
    x, base = grid_position(w, bits, granularity)
    lo, hi = GRIDS[bits]
    target = x.double().clamp(lo, hi)
    q = squant_quantize(w, bits, granularity)
    codes = q.codes.double()
    assert torch.all((codes == target.floor()) | (codes == target.ceil()))  # never more than one step from x
    assert codes.min() >= lo and codes.max() <= hi
    assert torch.equal(q.scale, base.scale) and q.bits == bits and q.granularity == granularity  # the same grid
    nearest = _errors(base.codes, x, lo, hi)
    kernel_only = _errors(squant_quantize(w, bits, granularity, squant_c=False).codes, x, lo, hi)
    channel_only = _errors(squant_quantize(w, bits, granularity, squant_k=False).codes, x, lo, hi)
    both = _errors(q.codes, x, lo, hi)
    # SQuant-K: every kernel sum within half a step, never further from zero than rounding to nearest
    assert kernel_only.sum(-1).abs().max() <= 0.5 + 1e-9
    assert torch.all(kernel_only.sum(-1).abs() <= nearest.sum(-1).abs() + 1e-9)
    # SQuant-C alone: every channel sum within half a step, never further from zero than rounding to nearest
    assert channel_only.sum((1, 2)).abs().max() <= 0.5 + 1e-9
    assert torch.all(channel_only.sum((1, 2)).abs() <= nearest.sum((1, 2)).abs() + 1e-9)
    # both: channels within 0.5; a kernel flips at most once more in the channel step, so it stays within 1
    assert both.sum((1, 2)).abs().max() <= 0.5 + 1e-9
    assert both.sum(-1).abs().max() <= 1 + 1e-9
    assert ((both - kernel_only).abs().sum(-1) <= 1).all()
    # and it beats rounding to nearest on both sums taken over the whole tensor
    assert both.sum(-1).abs().sum() < nearest.sum(-1).abs().sum()
    assert both.sum((1, 2)).abs().sum() < nearest.sum((1, 2)).abs().sum()
    # the start is the project's quantizer: rounding to nearest (k >= 3 bits) or TWN's threshold (2 bits)
    assert torch.equal(base.codes, quantize_weight(w, bits, granularity).codes)


def test_flips_take_the_entries_of_largest_error_and_a_single_weight_kernel_skips_the_kernel_step():
    x = torch.tensor([[[0.4, 0.3, 0.2, -0.1]]], dtype=torch.float64) + 2  # e = -0.4, -0.3, -0.2, +0.1: sum -0.8
    assert squant_round(x, 0, 7, squant_c=False).tolist() == [[[3, 2, 2, 2]]]  # one flip up, of the largest |e|
    w = _weight((6, 9), 1)  # a linear layer: the kernel step changes nothing, the channel step picks among all
    for bits in (2, 4):
        assert torch.equal(squant_quantize(w, bits).codes, squant_quantize(w, bits, squant_k=False).codes)
        assert torch.equal(squant_quantize(w, bits, squant_c=False).codes, quantize_weight(w, bits, "channel").codes)


def test_rounding_a_few_channels_at_a_time_changes_nothing(monkeypatch):
    import dfmpc.methods.squant as module

    w = _weight((7, 5, 3, 3), 4)
    whole = [squant_quantize(w, bits, "channel", *mode).codes for bits in (2, 4) for mode in [(True, True), (False, True)]]
    monkeypatch.setattr(module, "CHUNK", 50)  # 50 weights: one output channel (45 weights) at a time
    assert all(torch.equal(a, squant_quantize(w, bits, "channel", *mode).codes)
               for a, (bits, mode) in zip(whole, [(b, m) for b in (2, 4) for m in [(True, True), (False, True)]]))


def test_all_zero_channels_and_empty_flips_stay_finite():
    w = _weight((4, 3, 3, 3), 0)
    w[1] = 0
    for bits in (2, 3):
        q = squant_quantize(w, bits)
        assert q.scale[1] == 0 and torch.all(q.dequantize()[1] == 0) and torch.isfinite(q.dequantize()).all()


def test_bad_input_is_refused_clearly():
    with pytest.raises(DfmpcError, match="squant_k"):
        SQuant("4/6", squant_k="yes")
    with pytest.raises(DfmpcError, match="granularity"):
        SQuant("4/6", granularity="row")
    with pytest.raises(DfmpcError, match="bits"):
        squant_quantize(torch.randn(3, 3), 9)
    with pytest.raises(DfmpcError, match="2 dims"):
        squant_quantize(torch.randn(5), 4)
    with pytest.raises(DfmpcError, match="NaN"):
        squant_quantize(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(DfmpcError, match="start must be integer"):
        squant_round(torch.full((2, 2), 0.5), 0, 3, start=torch.full((2, 2), 3.0))
    with pytest.raises(DfmpcError, match="lo < hi"):
        squant_round(torch.zeros(2, 2), 1, 1)


# --------------------------------------------------------------------------- the method on a small net

class Net(nn.Module):
    def __init__(self, seed=0, c=8):
        super().__init__()
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        self.conv0 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = random_bn(c, g)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = random_bn(c, g)
        self.conv2 = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = random_bn(c, g)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(y + x), 1), 1))


@pytest.mark.parametrize("bits", ["2/6", "3/6"])
def test_method_quantizes_every_layer_with_squant_codes_deterministically(bits):
    model = Net().eval()
    before = copy.deepcopy(model.state_dict())
    q1, report = SQuant(bits).apply(model)
    q2, _ = SQuant(bits).apply(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input model untouched
    assert report.method == "squant" and report.bits == bits
    assert report.settings == {"granularity": "channel", "unpaired": "high", "keep_fp32": [], "squant_k": True,
                               "squant_c": True, "grid": "symmetric"}
    fp = dict(model.named_modules())
    modules = dict(q1.named_modules())
    low = [lr.name for lr in report.layers if lr.role == "low"]
    assert low and all(report.quantized[n].bits == int(bits[0]) for n in low)
    for lr in report.layers:
        expected = squant_quantize(fp[lr.name].weight.detach(), lr.bits, "channel")
        assert torch.equal(report.quantized[lr.name].codes, expected.codes)
        assert torch.equal(modules[lr.name].weight, expected.dequantize())
        assert torch.equal(dict(q2.named_modules())[lr.name].weight, modules[lr.name].weight)  # deterministic
    assert any(not torch.equal(report.quantized[n].codes, quantize_weight(fp[n].weight.detach(), b, "channel").codes)
               for n, b in [(lr.name, lr.bits) for lr in report.layers])  # it did flip something
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(q1(x), q2(x))
    _, tensor_report = SQuant(bits, granularity="tensor").apply(model)
    assert all(v.scale.dim() == 0 for v in tensor_report.quantized.values())


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, SQuant.name, SQuant)  # registered by name, as the lead will in METHODS
    model = Net().eval()
    qmodel, report = SQuant("3/6", squant_c=False).apply(model)
    path = tmp_path / "net.dfmpc"
    dfmpc.save_quantized(qmodel, report, path)
    loaded = dfmpc.load_quantized(path, model=Net().eval())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


# --------------------------------------------------------------------------- real weights

def test_squant_agrees_with_fp32_at_least_as_often_as_per_channel_on_resnet20(shared):
    """The paper's claim in small: on real weights at 4/6, flip rounding keeps at least as many predictions of
    the full-precision network as rounding to nearest on the same grid (256 CIFAR-10 test images)."""
    from dfmpc.data import load_dataset
    from dfmpc.models import load_model

    model, spec = load_model("resnet20_cifar10_a")
    x = load_dataset("cifar10", transform=spec.eval_transform(), limit=256, seed=0, cache=True, progress=False).tensors[0]
    with torch.no_grad():
        ref = model(x).argmax(1)
        agreement = {name: (cls("4/6").apply(model)[0](x).argmax(1) == ref).float().mean().item()
                     for name, cls in [("squant", SQuant), ("per-channel", METHODS["per-channel"])]}
    assert agreement["squant"] >= agreement["per-channel"], agreement


# ------------------------------------------------------------------------------------- the reference's grid

def _reference_round_to_nearest(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The authors' weight quantizer as their code writes it (ZeroQ's asymmetric_linear_quantization_params with a
    signed, integral zero point, per output channel; linear_quantize, clamp, linear_dequantize)."""
    n = 2**bits - 1
    flat = w.double().reshape(len(w), -1)
    shape = (-1,) + (1,) * (w.dim() - 1)
    low, high = flat.min(1).values.view(shape), flat.max(1).values.view(shape)
    scale = n / torch.clamp(high - low, min=1e-8)
    zero_point = torch.round(scale * low) + 2**(bits - 1)
    q = torch.clamp(torch.round(scale * w.double() - zero_point), -2**(bits - 1), 2**(bits - 1) - 1)
    return ((q + zero_point) / scale).to(w.dtype)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_the_reference_grid_is_the_authors_quantizer_and_squant_flips_on_it(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 8, 3, 3) * 0.1 + 0.02
    w[0, 0, 0, 0] = 0.0
    nearest = squant_reference_grid(w, bits, squant_k=False, squant_c=False)
    torch.testing.assert_close(nearest, _reference_round_to_nearest(w, bits), rtol=1e-6, atol=1e-7)
    assert nearest[0, 0, 0, 0] == 0.0  # zero is a level of the asymmetric grid
    flipped = squant_reference_grid(w, bits)
    flat = w.double().reshape(len(w), -1)
    step = ((flat.max(1).values - flat.min(1).values) / (2**bits - 1)).view(-1, 1, 1, 1)
    offset = torch.round(flat.min(1).values.view(-1, 1, 1, 1) / step)
    # errors in grid units, from the position clipped to the grid (the extreme weights can lie up to half a step
    # outside it, as the integer offset moves the grid)
    position = (w.double() / step - offset).clamp(0, 2**bits - 1)
    error = flipped.double() / step - offset - position
    tol = 1e-4  # float32 weights, positions up to 2^8
    assert error.abs().max() < 1 + tol  # every code the floor or the ceiling of its weight
    assert error.sum(dim=(1, 2, 3)).abs().max() <= 0.5 + tol  # SQuant-C: every channel's error sum
    assert error.sum(dim=(2, 3)).abs().max() <= 1 + tol  # SQuant-K, then at most one flip per kernel in C
    assert not torch.equal(flipped, nearest)


def test_the_reference_grid_has_no_ternary_mode():
    with pytest.raises(DfmpcError, match="3 to 8 bits"):
        squant_reference_grid(torch.randn(4, 4, 3, 3), 2)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_squant_on_the_asymmetric_grid_gives_the_reference_grids_codes_with_a_zero_point(bits):
    """grid="asymmetric" stores what squant_reference_grid (the reference's arithmetic, float64) computes: the same
    codes, as codes, a float32 step and an int16 zero point per output channel, within float32 rounding."""
    torch.manual_seed(bits)
    w = torch.randn(16, 8, 3, 3) * 0.1 + 0.02
    q = squant_quantize(w, bits, grid="asymmetric")
    assert q.zero_point is not None and q.zero_point.dtype == torch.int16 and q.scale.dtype == torch.float32
    assert q.codes.min() >= 0 and q.codes.max() <= 2**bits - 1
    reference = squant_reference_grid(w, bits).double()
    torch.testing.assert_close(q.dequantize().double(), reference, rtol=0, atol=2e-7 * w.abs().max().item())
    step = q.scale.double().view(-1, 1, 1, 1)
    assert torch.equal(torch.round(reference / step), q.codes.double() - q.zero_point.double().view(-1, 1, 1, 1))
    nearest = squant_quantize(w, bits, squant_k=False, squant_c=False, grid="asymmetric")
    torch.testing.assert_close(nearest.dequantize().double(), _reference_round_to_nearest(w, bits).double(),
                               rtol=0, atol=2e-7 * w.abs().max().item())


def test_the_asymmetric_grid_leaves_ternary_layers_on_the_ternary_grid_and_needs_per_channel_scales():
    w = torch.randn(8, 4, 3, 3)
    ternary, ours = squant_quantize(w, 2, grid="asymmetric"), squant_quantize(w, 2)
    assert torch.equal(ternary.codes, ours.codes) and torch.equal(ternary.scale, ours.scale)
    assert ternary.zero_point is None
    with pytest.raises(DfmpcError, match="granularity='channel'"):
        squant_quantize(w, 4, granularity="tensor", grid="asymmetric")
    with pytest.raises(DfmpcError, match="unknown grid 'minmax'; use one of symmetric, asymmetric"):
        squant_quantize(w, 4, grid="minmax")
    with pytest.raises(DfmpcError, match="granularity='channel'"):
        SQuant("3/6", granularity="tensor", grid="asymmetric")
    with pytest.raises(DfmpcError, match="unknown grid"):
        SQuant("3/6", grid=1)


def test_squant_at_its_authors_grid_as_a_method_counts_its_zero_points_in_the_size():
    """The 3- to 8-bit layers carry one 16-bit zero point per output channel; the ternary layers none."""
    torch.manual_seed(0)
    model = CifarResNet(depth=8).eval()
    ours, ours_report = dfmpc.quantize(model, "2/6", method="squant")
    theirs, report = dfmpc.quantize(model, "2/6", method="squant", grid="asymmetric")
    assert report.settings["grid"] == "asymmetric" and ours_report.settings["grid"] == "symmetric"
    zero_points = {name: q.zero_point for name, q in report.quantized.items() if q.zero_point is not None}
    assert set(zero_points) == {name for name, q in report.quantized.items() if q.bits > 2} != set()
    counted = sum(z.numel() for z in zero_points.values()) * 16 / (8 * 2**20)
    assert report.size_mb == pytest.approx(ours_report.size_mb + counted, rel=0, abs=1e-12)
    modules = dict(theirs.named_modules())
    for name, q in report.quantized.items():
        assert torch.equal(modules[name].weight, q.dequantize()), name
