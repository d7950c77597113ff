"""Every method on every listed architecture, and the moment propagation it relies on.

The models have random weights whose BatchNorm statistics were calibrated by one train-mode pass over a few
real images of ../shared (dfmpc.calibration), so that their BN statistics describe real inputs. One model
per family runs with `pytest -m coverage` (CI does); every listed model with `pytest -m slow`.
"""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfmpc
from dfmpc.calibration import calibrate_batch_norms, random_calibrated
from dfmpc.catalog import MODELS
from dfmpc.cli import main
from dfmpc.data import load_dataset
from dfmpc.errors import DfmpcError
from dfmpc.experiments import coverage
from dfmpc.experiments.measure import measured_input_means, sqnr_db
from dfmpc.methods import METHODS
from dfmpc.methods.dfq import input_channel_absmax
from dfmpc.models import list_models, load_model
from dfmpc.moments import activation_moments, leaky_relu_moments
from dfmpc.propagation import input_moments

BITS = ("2/6", "3/6")
# zeroq's distillation, shortened: the path is the same, the images are not the point here (on a CPU, 100 steps on
# VGG-16 would take half an hour); tests/test_zeroq.py checks what the distillation achieves
QUICK_SETTINGS = {"zeroq": {"images": 2, "steps": 2, "grid": 2, "fine": 1}}
SMALL_FAMILIES = ("resnet20_cifar10_a", "chenyaofo_resnet56_cifar100", "resnet20_cifar10")


def _ci_cases():
    """What CI runs (`pytest -m coverage`): every method on one model per family at 2/6, and at 3/6 on the CIFAR
    families; zeroq's output-error search on VGG-16 (four minutes on one thread) is left to `pytest -m slow`, which
    runs every case of every listed model."""
    for name in coverage.REPRESENTATIVES:
        for method in METHODS:
            for bits in BITS:
                if bits == "2/6" or name in SMALL_FAMILIES:
                    if not (method == "zeroq" and MODELS[name].parameters > 20_000_000):
                        yield name, method, bits


@functools.lru_cache(maxsize=2)
def _calibrated(name: str):
    """(random calibrated model, 4 other real images); cached: the methods and bit widths of one model share it."""
    torch.manual_seed(0)
    model, spec = load_model(name, pretrained=False)
    dataset = "imagenet" if spec.dataset == "imagenet" else "cifar10"  # no CIFAR-100 test set offline
    images = load_dataset(dataset, transform=spec.eval_transform(), limit=12, seed=0, cache=True, progress=False)
    x = images.tensors[0]
    return random_calibrated(model, x[:8]), x[8:]


def _runs(name: str, method: str, bits: str, save_to=None):
    """Quantize; with ``save_to`` (a file) also save the result packed and check that it loads back bit-identical."""
    model, images = _calibrated(name)
    before = copy.deepcopy(model.state_dict())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, report = dfmpc.quantize(model, bits, method=method, **QUICK_SETTINGS.get(method, {}))
        with torch.no_grad():
            ref, out = model(images), q(images)
            if save_to is not None:
                dfmpc.save_quantized(q, report, save_to, model_name=name)
                assert torch.equal(dfmpc.load_quantized(save_to)(images), out), f"{name} {method}: not bit-identical"
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(out).all(), f"{name} {method} {bits}: non-finite outputs"
    assert out.shape == ref.shape and math.isfinite(sqnr_db(ref, out))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model was modified"
    assert report.method == method and report.bits == bits


@pytest.mark.coverage
@pytest.mark.parametrize("name, method, bits", list(_ci_cases()))
def test_every_method_runs_on_one_model_per_family(shared, tmp_path, name, method, bits):
    # saved and loaded back: the methods that change more than the weights' codes (DFQ's folded BNs and new
    # modules, OCS's split layers, the compensation multiplied into weights, new biases, re-estimated BNs), at 2/6,
    # on all but the VGGs (a minute more)
    round_trip = (bits == "2/6" and method in ("dfq", "dfmpc", "dfmpc+", "ocs", "zeroq")
                  and MODELS[name].parameters < 20_000_000)
    _runs(name, method, bits, save_to=tmp_path / "q.dfmpc" if round_trip else None)


@pytest.mark.slow
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list_models())
def test_every_method_runs_on_every_listed_model(shared, name, method, bits):
    _runs(name, method, bits)


def test_every_listed_model_has_a_family_and_every_family_a_representative():
    families = {coverage.family(name) for name in list_models()}
    assert families == {coverage.family(name) for name in coverage.REPRESENTATIVES}
    assert len(coverage.REPRESENTATIVES) == len(families) == len(coverage.FAMILIES)
    assert set(coverage.SETTINGS["full"]["models"]) == set(list_models())
    with pytest.raises(DfmpcError, match="no family"):
        coverage.family("alexnet")


# --------------------------------------------------------------------------- calibration

def test_calibration_records_the_statistics_of_real_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 2, 1),
                        nn.BatchNorm2d(2))
    x = torch.randn(16, 3, 8, 8) * 2 + 1
    calibrate_batch_norms(net, x)
    assert not net.training and net[1].momentum == 0.1 and not net[3].training
    with torch.no_grad():
        h = net[0](x)
    assert torch.allclose(net[1].running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(net[1].running_var, h.var(dim=(0, 2, 3)), rtol=1e-4)
    random_calibrated(net, x, seed=3)
    assert net[1].weight.min() >= 0.5 and net[1].bias.abs().max() <= 0.5 and not torch.all(net[1].weight == 1)
    with pytest.raises(DfmpcError, match="at least 2 images"):
        calibrate_batch_norms(net, x[:1])
    with pytest.raises(DfmpcError, match="no BatchNorm"):
        calibrate_batch_norms(nn.Linear(3, 2), torch.randn(4, 3))


# --------------------------------------------------------------------------- moment rules, each against a measurement

def _measure(net: nn.Module, first: nn.Module, n: int = 4000, size: int = 8):
    """Gaussian inputs N(0, 1) per channel (the propagation's assumption for the network input), measured means."""
    x = torch.randn(n, first.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    return measured_input_means(net.eval(), x)


class _Body(nn.Module):
    def __init__(self, between):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.between = between
        self.head = nn.Conv2d(6, 4, 1) if not isinstance(between, nn.Flatten) else nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        return self.head(self.between(self.bn(self.conv(x))))


@pytest.mark.parametrize("between", [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.SiLU(), nn.GELU(), nn.Sigmoid(),
                                     nn.Tanh(), nn.Hardswish(), nn.ELU(), nn.Sequential(nn.ReLU(), nn.AvgPool2d(2)),
                                     nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, 1)), nn.Dropout(0.3),
                                     nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())],
                         ids=["relu", "relu6", "leaky", "silu", "gelu", "sigmoid", "tanh", "hardswish", "elu",
                              "avgpool", "maxpool", "dropout", "flatten-linear"])
def test_each_rule_predicts_the_measured_input_means(between):
    net = _Body(between).eval()
    with torch.no_grad():  # a BN whose recorded statistics are those of its input here: conv of N(0, 1) pixels
        w = net.conv.weight
        net.bn.running_mean.copy_(net.conv.bias)
        net.bn.running_var.copy_((w * w).sum(dim=(1, 2, 3)))
        net.bn.weight.copy_(torch.linspace(0.5, 2.0, 6))
        net.bn.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    if isinstance(between, nn.Flatten) or (isinstance(between, nn.Sequential) and isinstance(between[-1], nn.Flatten)):
        net.head = nn.Linear(6 * 16, 4)
    predicted = input_moments(net)["head"].mean
    measured = measured_input_means(net, torch.randn(2000, 3, 16, 16, generator=torch.Generator().manual_seed(1)))["head"]
    assert predicted.shape == measured.shape
    if isinstance(between, nn.Sequential) and isinstance(between[1], nn.MaxPool2d):
        # max pooling keeps the input mean: a lower bound (the max is at least every pixel of its window)
        assert torch.all(predicted <= measured + 0.01) and torch.all(measured > predicted), (predicted, measured)
        return
    # within 6 %: border pixels (zero padding) are where the rules approximate; interior-dominated here
    assert ((predicted - measured).norm() / measured.norm()).item() < 0.06, (predicted, measured)


def test_leaky_and_quadrature_moments_match_monte_carlo():
    g = torch.Generator().manual_seed(2)
    m, v = torch.tensor([-1.0, 0.0, 0.7, 2.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64)
    z = m + v.sqrt() * torch.randn(400000, 4, generator=g, dtype=torch.float64)
    for f, moments in ((lambda t: F.leaky_relu(t, 0.2), leaky_relu_moments(m, v, 0.2)),
                       (F.silu, activation_moments(F.silu, m, v)), (torch.tanh, activation_moments(torch.tanh, m, v))):
        assert torch.allclose(moments[0], f(z).mean(0), atol=6e-3)
        assert torch.allclose(moments[1], f(z).var(0), atol=1e-2, rtol=2e-2)
    # the quadrature is exact for a polynomial of low degree: E z^2 = m^2 + v
    assert torch.allclose(activation_moments(lambda t: t * t, m, v)[0], m * m + v)


def test_concatenation_and_channel_padding_carry_every_channel():
    class Dense(nn.Module):  # DenseNet-like: concatenation; option-A shortcut: channel padding
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.b = nn.Conv2d(3 + 4 + 2, 2, 1)

        def forward(self, x):
            y = torch.cat([x, torch.relu(self.bn(self.a(x)))], dim=1)
            return self.b(F.pad(y, (0, 0, 0, 0, 1, 1)))

    net = Dense().eval()
    with torch.no_grad():
        net.bn.bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    mom = input_moments(net)["b"]
    assert mom.mean.numel() == 9 and mom.mean[0] == 0 and mom.var[0] == 0 and mom.mean[-1] == 0  # padded channels
    assert torch.equal(mom.mean[1:4], torch.zeros(3, dtype=torch.float64))  # the network input, mean 0
    assert (mom.mean[4:8] > 0).all() and mom.mean[6] > mom.mean[4] > mom.mean[7] > mom.mean[5]  # relu of the BN shifts


@pytest.mark.parametrize("op", [nn.Softmax(dim=1), nn.LayerNorm([4, 4]), nn.Upsample(scale_factor=2)],
                         ids=["softmax", "layernorm", "upsample"])
def test_an_op_without_a_rule_is_named_in_a_clear_error(op):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), op, nn.Conv2d(4, 2, 1)).eval()
    with pytest.raises(DfmpcError, match=rf"through {type(op).__name__} '2' \(graph node"):
        input_moments(net)
    with pytest.raises(DfmpcError, match=type(op).__name__):
        dfmpc.quantize(net, "2/6", method="dfq")
    dfmpc.quantize(net, "2/6", method="original")  # methods that need no moments still run


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_input_channel_absmax_is_the_max_over_the_weights_that_read_each_channel(groups):
    conv = nn.Conv2d(8, 4 * groups // groups * 4, 3, groups=groups)
    w = conv.weight.detach().abs()
    out_per_group, in_per_group = w.shape[0] // groups, w.shape[1]
    brute = torch.stack([w[(j // in_per_group) * out_per_group:(j // in_per_group + 1) * out_per_group,
                           j % in_per_group].max() for j in range(8)])
    assert torch.equal(input_channel_absmax(conv), brute)
    lin = nn.Linear(5, 3)
    assert torch.equal(input_channel_absmax(lin), lin.weight.detach().abs().amax(dim=0))


# --------------------------------------------------------------------------- from the command line

def test_a_model_without_offline_weights_runs_every_method_from_the_command_line(capsys, shared):
    code = main(["quantize", "--model", "resnet20_cifar100", "--random-weights", "--dataset", "cifar10",
                 "--method", "all", "--images", "16", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, err
    assert "random weights" in out and all(m in out for m in METHODS)
    assert main(["quantize", "--model", "resnet20_cifar10_a", "--random-weights", "--weights", "x.th"]) == 2
    assert "not both" in capsys.readouterr().err
