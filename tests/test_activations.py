"""Data-free activation quantization (dfmpc.activations): ranges, the quantizer's arithmetic, fidelity, errors."""
import re

import pytest
import torch
from nets import random_bn
from torch import nn

import dfmpc
from dfmpc.activations import IMAGENET_INPUT_RANGE, ActivationQuantizer, input_range_of, quantize_activations


class Block(nn.Module):
    """conv-bn-relu6 -> conv-bn (+ input) -> relu -> pool -> linear: every kind of quantization point."""

    def __init__(self, seed=0, channels=8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv0 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn0 = random_bn(channels, g)
        self.act0 = nn.ReLU6()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = random_bn(channels, g)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 5)
        for m in (self.conv0, self.conv1, self.fc):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)

    def forward(self, x):
        h = self.act0(self.bn0(self.conv0(x)))
        h = self.relu(self.bn1(self.conv1(h)) + h)
        return self.fc(torch.flatten(self.pool(h), 1))


def _beta_gamma(bn):
    return bn.bias.detach().double(), bn.weight.detach().double().abs()


def test_dfq_ranges_equal_the_brute_force_formula_and_the_input_range_is_the_normalization():
    net = Block().eval()
    _, rows = quantize_activations(net, 8, input_range=(-2.0, 3.0))
    by_tensor = {r["tensor"]: r for r in rows}
    assert by_tensor["x"]["source"] == "input" and (by_tensor["x"]["lo"], by_tensor["x"]["hi"]) == (-2.0, 3.0)
    beta, gamma = _beta_gamma(net.bn0)  # ReLU6 after bn0: beta +- 6 gamma clipped to [0, 6], union over channels
    lo, hi = (beta - 6 * gamma).clamp(0, 6).min().item(), (beta + 6 * gamma).clamp(0, 6).max().item()
    assert by_tensor["act0"]["source"] == "bn"
    assert by_tensor["act0"]["lo"] == pytest.approx(lo) and by_tensor["act0"]["hi"] == pytest.approx(hi)
    beta, gamma = _beta_gamma(net.bn1)  # bn1 enters the residual sum: unclipped
    assert by_tensor["bn1"]["lo"] == pytest.approx((beta - 6 * gamma).min().item())
    assert by_tensor["bn1"]["hi"] == pytest.approx((beta + 6 * gamma).max().item())
    # after the sum, no BatchNorm: the propagated moments of fc's input (pool keeps the range), clipped at 0
    assert by_tensor["flatten"]["source"] == "moments" and by_tensor["flatten"]["lo"] == 0.0
    assert set(by_tensor) == {"x", "act0", "bn1", "flatten"}  # the logits are not quantized
    assert input_range_of((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) == IMAGENET_INPUT_RANGE


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizer_is_the_engines_per_tensor_asymmetric_arithmetic(bits):
    q = ActivationQuantizer(-1.3, 4.1, bits)
    x = torch.linspace(-3, 6, 2001)
    levels = 2**bits - 1
    codes = (torch.round(x / q.scale) + q.zero_point).clamp(0, levels)  # brute force: round half to even, saturate
    assert torch.equal(q(x), (codes - q.zero_point) * q.scale)
    assert q(torch.zeros(1)).item() == 0.0  # zero exactly representable
    assert 0 <= q.zero_point <= levels and len(torch.unique(q(x))) == levels + 1


def test_mse_rule_never_has_a_larger_expected_error_than_dfq_and_is_narrower_at_4_bits():
    net = Block().eval()
    _, dfq = quantize_activations(net, 4, rule="dfq")
    _, mse = quantize_activations(net, 4, rule="mse")
    for a, b in zip(dfq[1:], mse[1:]):
        assert b["hi"] - b["lo"] <= a["hi"] - a["lo"] + 1e-9


def _calibrated(net, x):
    """BatchNorm running statistics measured on ``x`` (the ranges assume the statistics describe the data)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        net.train()(x)
    return net.eval()


def test_a8_stays_close_to_fp32_activations_and_a4_further():
    x = torch.randn(64, 3, 8, 8).clamp(*IMAGENET_INPUT_RANGE)
    net = _calibrated(Block(seed=1), x)
    with torch.no_grad():
        ref = net(x)
        err = {(bits, rule): ((quantize_activations(net, bits, rule=rule)[0](x) - ref).norm() / ref.norm()).item()
               for bits in (8, 4) for rule in ("dfq", "mse")}
    # measured relative errors: A8 0.019 (dfq) / 0.014 (mse), A4 0.31 (dfq) / 0.13 (mse); thresholds 2x above
    assert err[(8, "dfq")] < 0.04 and err[(8, "mse")] < 0.03 and err[(8, "dfq")] < err[(4, "dfq")] / 5
    # where the BatchNorm statistics describe the data, the expected-error rule beats beta +- 6 gamma at 4 bits
    assert err[(4, "mse")] < 0.6 * err[(4, "dfq")]


def test_quantize_with_act_bits_leaves_the_model_alone_is_deterministic_and_reports_ranges():
    net = Block(seed=2).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 3, 8, 8)
    q1, r1 = dfmpc.quantize(net, bits="2/6", method="dfmpc+", act_bits=8)
    q2, _ = dfmpc.quantize(net, bits="2/6", method="dfmpc+", act_bits=8)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        assert torch.equal(q1(x), q2(x))
    assert r1.act_bits == 8 and [r["tensor"] for r in r1.activations] == ["x", "act0", "bn1", "flatten"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"act_bits": 1}, "act_bits must be an integer from 2 to 8"),
    ({"act_bits": 9}, "act_bits must be an integer from 2 to 8"),
    ({"act_bits": "8"}, "act_bits must be an integer from 2 to 8"),
    ({"act_bits": True}, "act_bits must be an integer from 2 to 8"),
    ({"act_bits": 8, "act_rule": "max"}, "unknown act_rule 'max'"),
    ({"act_bits": 8, "act_input_range": (1.0, 0.0)}, "low < high"),
    ({"act_bits": 8, "act_input_range": "wide"}, "act_input_range must be (low, high) numbers"),
])
def test_bad_activation_settings_are_refused_in_one_line(kwargs, needle):
    with pytest.raises(dfmpc.DfmpcError, match=re.escape(needle)) as err:
        dfmpc.quantize(Block(), bits="4/4", method="original", **kwargs)
    assert "\n" not in str(err.value)


def test_calibration_images_give_each_tensors_minimum_and_maximum_as_zeroq_does():
    net = Block(seed=8).eval()
    x = torch.randn(16, 3, 8, 8)
    _, rows = quantize_activations(net, 8, calibration=x)
    by_tensor = {r["tensor"]: r for r in rows}
    with torch.no_grad():
        act0 = net.act0(net.bn0(net.conv0(x)))
        bn1 = net.bn1(net.conv1(act0))
    assert by_tensor["act0"]["source"] == "calibration"
    assert by_tensor["act0"]["hi"] == pytest.approx(act0.max().item())
    assert (by_tensor["bn1"]["lo"], by_tensor["bn1"]["hi"]) == pytest.approx((bn1.min().item(), bn1.max().item()))
    assert by_tensor["x"]["source"] == "input"  # the input keeps its fixed range
    with pytest.raises(dfmpc.DfmpcError, match="calibration= must be a batch of images"):
        quantize_activations(net, 8, calibration=torch.zeros(3, 8, 8))
