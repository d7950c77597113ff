"""Pair discovery on real architectures, the compensation's two equivalent placements, and the API contract."""
import pytest
import torch
import torchvision
from pytorchcv.model_provider import get_model
from torch import nn

import dfmpc
from dfmpc import DfmpcError, find_pairs
from dfmpc.methods.dfmpc import apply_compensation, input_channel_multiplier


def randomize_bn(model, seed=0):
    """Random-init models have identity BN statistics; give them realistic ones so BN matters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model.eval()


def test_resnet_basic_blocks_pair_conv1_with_conv2_only():
    model = get_model("resnet20_cifar10", pretrained=False)
    pairs = find_pairs(model)
    assert len(pairs) == 9  # one per basic block (Figure 2a)
    for p in pairs:
        assert p.low.endswith("body.conv1.conv") and p.high.endswith("body.conv2.conv")
        assert p.bn is not None and p.exact


def test_bottleneck_pairs_and_unpaired_layers():
    model = torchvision.models.resnet50()
    pairs = {(p.low, p.high) for p in find_pairs(model)}
    assert ("layer1.0.conv1", "layer1.0.conv2") in pairs
    assert len(pairs) == 16  # one per bottleneck (Figure 2b); conv3 feeds the residual sum
    plan = dfmpc.plan_layers(model, "2/6")
    roles = {a.name: a.role for a in plan.layers}
    assert roles["conv1"] == "unpaired" and roles["fc"] == "unpaired"
    assert roles["layer1.0.conv3"] == "unpaired" and roles["layer1.0.downsample.0"] == "unpaired"


def test_densenet_pairs_inside_dense_layers():
    pairs = find_pairs(torchvision.models.densenet121())
    assert len(pairs) == 58  # every dense layer: 1x1 conv -> BN -> ReLU -> 3x3 conv (Figure 2c)
    assert all(p.low.endswith("conv1") and p.high.endswith("conv2") for p in pairs)


def test_vgg_chains_pass_through_pooling():
    pairs = find_pairs(get_model("bn_vgg16", pretrained=False))
    found = {(p.low, p.high): p for p in pairs}
    assert len(pairs) == 7 and all(p.exact for p in pairs)  # 6 conv pairs and fc1 -> fc2; pairs do not overlap
    assert ("features.stage1.unit2.conv", "features.stage2.unit1.conv") not in found  # unit2 is already paired
    assert ("features.stage1.unit1.conv", "features.stage1.unit2.conv") in found
    through_pool = found[("features.stage3.unit3.conv", "features.stage4.unit1.conv")]  # conv -> BN -> ReLU -> pool -> conv
    assert through_pool.between[-1] == "features.stage3.pool3" and through_pool.bn == "features.stage3.unit3.bn"
    assert found[("output.fc1.fc", "output.fc2.fc")].between == ("output.fc1.activ", "output.fc1.dropout")


def test_overlapping_hand_given_pairs_are_refused():
    model = torchvision.models.resnet18()
    with pytest.raises(DfmpcError, match="layer 'layer1.0.conv2' is in two pairs"):
        dfmpc.quantize(model, "2/6", pairs=[("layer1.0.conv1", "layer1.0.conv2"), ("layer1.0.conv2", "layer1.1.conv1")])
    with pytest.raises(DfmpcError, match="in two pairs"):
        dfmpc.quantize(model, "2/6", pairs=[("layer1.0.conv1", "layer1.0.conv2"), ("layer1.0.conv1", "layer1.0.conv2")])
    _, report = dfmpc.quantize(model, "2/6", pairs=[("layer1.0.conv1", "layer1.0.conv2", "layer1.0.bn1")])
    assert report.pairs == [("layer1.0.conv1", "layer1.0.conv2")]


def test_mobilenetv2_pairs_are_inexact_and_depthwise_multiplier_scales_whole_filters():
    model = torchvision.models.mobilenet_v2()
    pairs = find_pairs(model)
    relu6 = [p for p in pairs if any(isinstance(dict(model.named_modules()).get(b), nn.ReLU6) for b in p.between)]
    assert relu6 and not any(p.exact for p in relu6)  # ReLU6 is not positively homogeneous
    # the linear bottleneck: project 1x1 -> BN -> next block's expand 1x1, no activation: exact
    assert any(p.exact and p.between == (p.bn,) for p in pairs)
    dw = nn.Conv2d(8, 8, 3, groups=8)
    c = torch.arange(1.0, 9.0)
    assert torch.equal(input_channel_multiplier(dw, c).flatten(), c)
    grouped = nn.Conv2d(8, 4, 3, groups=2)  # inputs 0-3 -> outputs 0-1, inputs 4-7 -> outputs 2-3
    m = input_channel_multiplier(grouped, c)[..., 0, 0]
    assert torch.equal(m, torch.tensor([[1.0, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [5, 6, 7, 8]]))


def test_scaling_next_layer_inputs_equals_scaling_the_bn_of_layer_l_on_a_real_block():
    model = randomize_bn(get_model("resnet20_cifar10", pretrained=False))
    pair = find_pairs(model)[4]
    c = torch.rand(dict(model.named_modules())[pair.low].out_channels) * 2
    x = torch.randn(4, 3, 32, 32)
    a, b = (randomize_bn(get_model("resnet20_cifar10", pretrained=False)) for _ in range(2))
    a.load_state_dict(model.state_dict()), b.load_state_dict(model.state_dict())
    with torch.no_grad():
        apply_compensation(a, pair, c, "next")
        apply_compensation(b, pair, c, "bn")
        assert torch.allclose(a(x), b(x), atol=1e-5)
        assert not torch.allclose(a(x), model(x), atol=1e-3)  # c really changed the network


def test_fold_modes_agree_through_the_api():
    model = randomize_bn(get_model("resnet20_cifar10", pretrained=False))
    x = torch.randn(4, 3, 32, 32)
    q_next, r_next = dfmpc.quantize(model, "2/6", fold="next")
    q_bn, r_bn = dfmpc.quantize(model, "2/6", fold="bn")
    with torch.no_grad():
        assert torch.allclose(q_next(x), q_bn(x), atol=1e-4)
    assert r_bn.size_mb < r_next.size_mb  # folded into BN, c costs no storage


def test_quantize_never_modifies_the_input_and_uses_the_planned_grids():
    model = randomize_bn(get_model("resnet20_cifar10", pretrained=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel, report = dfmpc.quantize(model, bits="2/6", lambda1=0.5, lambda2=0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert qmodel is not model
    modules = dict(qmodel.named_modules())
    by_role = {lr.name: lr for lr in report.layers}
    for name, lr in by_role.items():
        w = modules[name].weight.detach()
        if lr.role == "low":
            assert w.unique().numel() <= 3  # ternary: {-alpha, 0, alpha}
        elif lr.role == "high":
            c = report.compensation[name]
            unscaled = (w / c.reshape(1, -1, 1, 1))[:, c > 0]
            level = (unscaled / unscaled.abs().max() + 1) * (2**6 - 1) / 2  # Eq. 6 codes, 0..63
            assert (level - level.round()).abs().max() < 1e-3  # 6-bit grid times c_j (Eq. 7)
    assert report.size_mb < report.fp32_size_mb / 4
    assert {lr.role for lr in report.layers} == {"low", "high", "unpaired"}
    assert "low" in report.table() and report.to_dict()["bits"] == "2/6"


def test_inplace_modifies_the_model():
    model = randomize_bn(get_model("resnet20_cifar10", pretrained=False))
    qmodel, _ = dfmpc.quantize(model, "2/6", inplace=True)
    assert qmodel is model


def test_policies_for_unpaired_layers_and_keep_fp32():
    model = get_model("resnet20_cifar10", pretrained=False)
    first, last = "features.init_block.conv", "output"
    _, rep = dfmpc.quantize(model, "2/6", keep_fp32=("first", "last"))
    roles = {lr.name: (lr.role, lr.bits) for lr in rep.layers}
    assert roles[first] == ("fp32", 32) and roles[last] == ("fp32", 32)
    _, rep_fp = dfmpc.quantize(model, "2/6", unpaired="fp32")
    _, rep_low = dfmpc.quantize(model, "2/6", unpaired="low")
    assert rep_low.size_mb < rep.size_mb < rep_fp.size_mb


def test_size_matches_the_paper_convention_for_resnet18():
    # The paper's Table 3 lists ResNet-18 full precision as 44.59 MB and 6-bit as 8.36 MB.
    model = get_model("resnet18", pretrained=False)
    assert round(dfmpc.fp32_size_mb(model), 2) == 44.59
    _, rep = dfmpc.quantize(model, "6/6", method="original")
    assert abs(rep.size_mb - 44.59 * 6 / 32) < 0.05


class NoPairs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_bad_inputs_raise_clear_errors():
    model = get_model("resnet20_cifar10", pretrained=False)
    with pytest.raises(DfmpcError, match="nothing to compensate"):
        dfmpc.quantize(NoPairs(), "2/6")
    dfmpc.quantize(NoPairs(), "2/6", method="original")  # direct quantization needs no pair
    with pytest.raises(DfmpcError, match="out of range"):
        dfmpc.quantize(model, "1/6")
    with pytest.raises(DfmpcError, match="out of range"):
        dfmpc.quantize(model, "6/4")
    with pytest.raises(DfmpcError, match="LOW/HIGH"):
        dfmpc.quantize(model, "two/six")
    with pytest.raises(DfmpcError, match="lambda1"):
        dfmpc.quantize(model, "2/6", lambda1=-1)
    with pytest.raises(DfmpcError, match="unknown method"):
        dfmpc.quantize(model, "2/6", method="magic")
    with pytest.raises(DfmpcError, match="setting"):
        dfmpc.quantize(model, "2/6", method="original", lambda1=0.5)
    bad = get_model("resnet20_cifar10", pretrained=False)
    with torch.no_grad():
        next(bad.parameters())[0] = float("nan")
    with pytest.raises(DfmpcError, match="NaN"):
        dfmpc.quantize(bad, "2/6")
    with pytest.raises(DfmpcError, match="Module"):
        dfmpc.quantize("resnet20", "2/6")


def test_untraceable_model_error_and_explicit_pairs():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return self.b(torch.relu(self.bn(self.a(x))))

    model = Dynamic().eval()
    with pytest.raises(DfmpcError, match="pairs"):
        dfmpc.quantize(model, "2/6")
    from dfmpc.graph import pairs_from_names
    q1, rep = dfmpc.quantize(model, "2/6", pairs=pairs_from_names(model, [("a", "b", "bn")]))
    assert rep.pairs == [("a", "b")]
    q2, _ = dfmpc.quantize(model, "2/6", pairs=[("a", "b", "bn")])  # plain names work too
    assert all(torch.equal(x, y) for x, y in zip(q1.state_dict().values(), q2.state_dict().values()))
    with pytest.raises(DfmpcError, match="not a Conv2d"):
        dfmpc.quantize(model, "2/6", pairs=[("a", "nope")])


def test_deterministic_run_to_run():
    model = randomize_bn(get_model("resnet20_cifar10", pretrained=False))
    q1, _ = dfmpc.quantize(model, "2/6")
    q2, _ = dfmpc.quantize(model, "2/6")
    assert all(torch.equal(a, b) for a, b in zip(q1.state_dict().values(), q2.state_dict().values()))


def test_fold_equivalence_on_a_pretrained_block_with_real_images(shared):
    """On a pretrained option-A ResNet-20 and real CIFAR-10 images: c in layer l+1 (Eq. 7) == c in BN_l."""
    from dfmpc.data import load_dataset
    from dfmpc.models import load_model

    weights = shared / "data/cifar10/weights/he2016_option_a/resnet20-12fca82f.th"
    model, spec = load_model("resnet20_cifar10_a", weights=str(weights))
    images = torch.stack([load_dataset("cifar10", shared / "data/cifar10/test_jpeg", spec.eval_transform(), limit=16)[i][0]
                          for i in range(16)])
    q_next, rep = dfmpc.quantize(model, "2/6", lambda1=0.5, fold="next")
    q_bn, _ = dfmpc.quantize(model, "2/6", lambda1=0.5, fold="bn")
    with torch.no_grad():
        out_next, out_bn = q_next(images), q_bn(images)
    assert torch.allclose(out_next, out_bn, atol=1e-4 * out_next.abs().max())
    assert any(abs(lr.c_mean - 1) > 1e-3 for lr in rep.layers if lr.c_mean is not None)  # c is not trivially 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantize_a_model_that_lives_on_the_gpu():
    model = randomize_bn(get_model("resnet20_cifar10", pretrained=False))
    q_cpu, _ = dfmpc.quantize(model, "2/6")
    q_gpu, _ = dfmpc.quantize(model.cuda(), "2/6")
    for (k, a), b in zip(q_cpu.state_dict().items(), q_gpu.state_dict().values()):
        assert b.is_cuda and torch.allclose(a, b.cpu(), atol=1e-6), k
