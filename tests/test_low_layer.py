"""Which layer of a pair takes the low bit width (dfmpc.low_layer, dfmpc+'s ``low_layer``): the error measure against
a least-squares minimiser, the choice against the errors and the size rule, and what the report says."""
import pytest
import torch
from torch import nn

import dfmpc
from dfmpc.errors import DfmpcError
from dfmpc.low_layer import LOW_LAYERS, relative_error
from dfmpc.methods.dfmpc_plus import DFMPCPlus


def test_relative_error_is_what_the_best_gain_of_every_channel_leaves():
    """e = sum_o min_g |W_o - g Q_o|^2 / sum_o |W_o|^2, the minimum found by least squares channel by channel; a
    channel without codes loses all of its energy, and codes equal to the filters up to a gain lose nothing."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    q = torch.randint(-1, 2, (6, 4, 3, 3)).float() * torch.rand(6, 1, 1, 1)
    q[2] = 0
    left = 0.0
    for o in range(6):
        a, b = q[o].reshape(-1, 1).double(), w[o].reshape(-1, 1).double()
        gain = torch.linalg.lstsq(a, b).solution if a.abs().sum() > 0 else torch.zeros(1, 1, dtype=torch.float64)
        left += float(((b - a @ gain) ** 2).sum())
    assert relative_error(w, q) == pytest.approx(left / float((w.double() ** 2).sum()), rel=1e-10)
    assert relative_error(w, 3 * w) == pytest.approx(0.0, abs=1e-12)
    assert relative_error(w, torch.zeros_like(w)) == pytest.approx(1.0)
    assert relative_error(torch.zeros_like(w), q) == 0.0


def _pair(second_out: int) -> nn.Module:
    """conv (8 -> 16, 3x3) -> BN -> ReLU -> conv (16 -> second_out, 3x3) -> BN. The second conv's filters are
    ternary already (its 2-bit codes lose nothing), the first's are Gaussian; the second has fewer weights than the
    first for second_out < 8 and more for second_out > 8."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, second_out, 3, bias=False), nn.BatchNorm2d(second_out)).eval()
    with torch.no_grad():
        net[3].weight.copy_(torch.randint(-1, 2, net[3].weight.shape).float() * 0.1)
        for bn in (net[1], net[4]):
            bn.running_var.uniform_(0.5, 1.5)
            bn.running_mean.normal_()
    return net


def _roles(report) -> dict:
    return {layer.name: (layer.role, layer.bits) for layer in report.layers}


@pytest.mark.parametrize("second_out, swaps", [(4, {"least-error": False, "least-error-any-size": True}),
                                               (32, {"least-error": True, "least-error-any-size": True})])
def test_the_layer_that_loses_less_takes_the_low_bits_where_the_model_does_not_grow(second_out, swaps):
    net = _pair(second_out)
    first, first_report = dfmpc.quantize(net, "2/6", method="dfmpc+")
    assert _roles(first_report) == {"0": ("low", 2), "3": ("high", 6)}  # the paper's order
    e_first = relative_error(net[0].weight, first[0].weight)  # first[0] holds its dequantized 2-bit codes
    assert e_first > 0.1
    for rule, swapped in swaps.items():
        q, report = dfmpc.quantize(net, "2/6", method="dfmpc+", low_layer=rule)
        assert report.settings["low_layer"] == rule
        assert _roles(report) == ({"0": ("high", 6), "3": ("low", 2)} if swapped else _roles(first_report)), rule
        assert report.pairs == ([("3", "0")] if swapped else [("0", "3")])
        details = {layer.name: layer.details for layer in report.layers}
        assert details["0"]["relative_error_at_low_bits"] == pytest.approx(e_first, rel=1e-9)
        assert details["3"]["relative_error_at_low_bits"] == pytest.approx(0.0, abs=1e-9)
        assert details["3"]["low"] is swapped and details["0"]["low"] is not swapped
        if rule == "least-error":
            assert report.size_mb <= first_report.size_mb  # never larger than the paper's order
        if swapped:
            assert relative_error(net[3].weight, q[3].weight) == pytest.approx(0.0, abs=1e-9)
            assert not torch.equal(q[0].weight, first[0].weight)  # layer 0 now has 6-bit codes
    assert float(net[3].weight.detach().abs().max()) == pytest.approx(0.1)  # the input model is untouched


def test_the_paper_order_is_the_default_and_an_unknown_rule_is_refused():
    assert DFMPCPlus().low_layer == "first" and LOW_LAYERS[0] == "first"
    net = _pair(32)
    _, default = dfmpc.quantize(net, "2/6", method="dfmpc+")
    _, explicit = dfmpc.quantize(net, "2/6", method="dfmpc+", low_layer="first")
    assert default.pairs == explicit.pairs == [("0", "3")]
    assert all("relative_error_at_low_bits" not in layer.details for layer in default.layers)
    with pytest.raises(DfmpcError, match="unknown low_layer 'second'; use one of first, least-error"):
        dfmpc.quantize(net, "2/6", method="dfmpc+", low_layer="second")


def test_on_resnet20_every_pair_gives_the_low_bits_to_its_second_layer(shared):
    """On the pretrained CIFAR-10 ResNet-20 the second convolution of every residual block keeps more of its filters
    as ternary codes than the first (measured: e from 0.198 to 0.252 against 0.206 to 0.285, the closest pair
    0.0077 apart), and never has fewer weights, so both rules swap every pair."""
    from dfmpc.models import load_model

    model, _ = load_model("resnet20_cifar10_a")
    _, report = dfmpc.quantize(model, "2/6", method="dfmpc+", low_layer="least-error")
    assert len(report.pairs) == 9
    details = {layer.name: layer.details for layer in report.layers}
    for low, high in report.pairs:
        assert low.endswith("conv2") and high.endswith("conv1")
        assert details[high]["relative_error_at_low_bits"] - details[low]["relative_error_at_low_bits"] > 0.005


def _three_pairs() -> nn.Module:
    """Three conv -> BN -> ReLU pairs whose second convolutions are ternary already (e = 0, so every swap lowers the
    error): pair A's second layer has 4x the weights of its first (its swap saves 13,824 bits at 2/6), pair B's a
    quarter (its swap costs 13,824), pair C's a half (costs 2,304, and lowers e more per bit than B's)."""
    torch.manual_seed(0)
    widths = [8, 16, 32, 16, 8, 16, 4]
    layers = []
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        if i % 2:
            with torch.no_grad():
                conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape).float() * 0.1)
        layers += [conv, nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def test_the_budget_rule_spends_the_bits_its_free_swaps_save_on_the_best_error_per_bit():
    net = _three_pairs()
    _, first = dfmpc.quantize(net, "2/6", method="dfmpc+")
    assert first.pairs == [("0", "3"), ("6", "9"), ("12", "15")]
    low = {}
    for rule in ("least-error", "least-error-budget", "least-error-any-size"):
        _, report = dfmpc.quantize(net, "2/6", method="dfmpc+", low_layer=rule)
        low[rule] = [a for a, _ in report.pairs]
        if rule != "least-error-any-size":
            assert report.size_mb <= first.size_mb, rule
    assert low == {"least-error": ["3", "6", "12"],  # only A's swap keeps the model from growing
                   "least-error-budget": ["3", "6", "15"],  # A's savings buy C's swap; B's no longer fits
                   "least-error-any-size": ["3", "9", "15"]}


def test_a_model_with_swapped_pairs_saves_and_loads_back_exactly(tmp_path):
    """The file records low_layer with the other settings and holds every layer's codes at the bits it got; a file
    written before the setting existed loads as the paper's order (packed_header.LATER_SETTINGS)."""
    from dfmpc.models import load_model
    from dfmpc.packed_header import LATER_SETTINGS

    torch.manual_seed(0)
    model, _ = load_model("resnet20_cifar10_a", pretrained=False)
    q, report = dfmpc.quantize(model, "2/6", method="dfmpc+", low_layer="least-error-budget")
    assert any(low.endswith("conv2") for low, _ in report.pairs)  # random weights: some pairs swap
    dfmpc.save_quantized(q, report, tmp_path / "q.dfmpc", model_name="resnet20_cifar10_a")
    loaded = dfmpc.load_quantized(tmp_path / "q.dfmpc")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), q.eval()(x))
    assert LATER_SETTINGS["low_layer"] == DFMPCPlus().low_layer == "first"


def test_the_codes_that_decided_a_pair_are_the_codes_it_gets(monkeypatch):
    """The low layer's ternary codes computed to choose it (revise_plan) are reused, not searched again: one
    correlated search per layer of a pair, and the same model as searching again."""
    from dfmpc.cifar_resnet import CifarResNet
    from dfmpc.methods import dfmpc_plus

    torch.manual_seed(0)
    model = CifarResNet(20).eval()
    calls = []
    search = dfmpc_plus.correlated_ternary
    monkeypatch.setattr(dfmpc_plus, "correlated_ternary", lambda *a, **k: calls.append(1) or search(*a, **k))
    reused, report = dfmpc.quantize(model, "2/6", "dfmpc+", low_layer="least-error")
    searched_once = len(calls)
    details = {layer.name: layer.details for layer in report.layers}
    correlated = sum(details[low].get("rho", 0.0) > 0 for low, _ in report.pairs)  # low layers with correlated codes
    assert correlated > 0
    calls.clear()
    revise = DFMPCPlus.revise_plan

    def forget(self, model, plan, run):  # the same choice, its codes dropped: every low layer is searched again
        plan = revise(self, model, plan, run)
        run.low_codes = {}
        return plan

    monkeypatch.setattr(DFMPCPlus, "revise_plan", forget)
    searched, again = dfmpc.quantize(model, "2/6", "dfmpc+", low_layer="least-error")
    assert len(calls) == searched_once + correlated and again.pairs == report.pairs
    assert all(torch.equal(a, b) for a, b in zip(reused.state_dict().values(), searched.state_dict().values()))
