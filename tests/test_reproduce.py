"""dfmpc.analysis (the measurements) and dfmpc.reproduce (the experiments, their JSON and the CLI command)."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dfmpc
from dfmpc import analysis, reproduce
from dfmpc.cifar_resnet import CifarResNet
from dfmpc.cli import main
from dfmpc.errors import DfmpcError
from dfmpc.evaluate import evaluate


def _trained_looking_resnet(seed=0):
    """A ResNet-20 with random weights and non-trivial BN statistics (so that quantization matters)."""
    torch.manual_seed(seed)
    model = CifarResNet(depth=20, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster (and dfmpc reproduce --quick runs single-threaded too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(40, 3, 32, 32, generator=g), torch.randint(0, 10, (40,), generator=g))


# ----------------------------------------------------------------------------------------------- analysis

def test_predict_gives_the_same_accuracy_as_evaluate(tiny_data):
    model = _trained_looking_resnet()
    pred = analysis.predict(model, tiny_data, device="cpu", batch_size=16)
    ref = evaluate(model, tiny_data, batch_size=7, device="cpu", progress=False)
    assert pred["top5"].shape == (40, 5) and pred["loss"].shape == (40,)
    assert analysis.top1(pred) == pytest.approx(ref["top1"])
    assert analysis.top5(pred) == pytest.approx(ref["top5"])
    assert analysis.agreement(pred, pred) == 100.0
    other = {**pred, "top5": (pred["top5"] + 1) % 10}
    assert analysis.agreement(other, pred) == 0.0


def test_feature_errors_zero_for_a_copy_and_local_equals_accumulated_at_the_first_change(tiny_data):
    model = _trained_looking_resnet()
    images = torch.stack([tiny_data[i][0] for i in range(8)])
    same = analysis.feature_errors(model, _trained_looking_resnet(), images, device="cpu")
    assert len(same) == 20 and all(r["accumulated"] == 0 and r["local"] == 0 for r in same)
    # change one layer in the middle: nothing before it moves; at it, local == accumulated
    changed = _trained_looking_resnet()
    changed.layer2[0].conv1.weight.data.mul_(1.5)
    rows = analysis.feature_errors(model, changed, images, batch_size=3, device="cpu")
    names = [r["name"] for r in rows]
    k = names.index("layer2.0.conv1")
    assert names[0] == "conv1" and names[-1] == "linear"
    assert all(r["accumulated"] == 0 for r in rows[:k])
    assert rows[k]["local"] == pytest.approx(0.5, rel=1e-5)  # 1.5 W x - W x = 0.5 W x
    assert rows[k]["accumulated"] == pytest.approx(rows[k]["local"], rel=1e-5)
    assert all(r["local"] == 0 for i, r in enumerate(rows) if i != k)  # the others are unchanged layers
    assert rows[-1]["accumulated"] > 0


def test_weight_fit_bounds():
    w = torch.randn(6, 4, 3, 3)
    fit = analysis.weight_fit(w, 2 * w)
    assert fit["rel_error"] == pytest.approx(1.0) and fit["best_scale_rel_error"] == pytest.approx(0.0, abs=1e-7)
    # a filter bank orthogonal to w cannot be rescaled into it
    q = torch.randn(6, 36)
    a = w.reshape(6, -1)
    q = q - (q * a).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a
    fit = analysis.weight_fit(w, q.reshape(w.shape))
    assert fit["best_scale_rel_error"] == pytest.approx(1.0, abs=1e-6) and fit["cos_mean"] == pytest.approx(0, abs=1e-6)
    # ternary: the optimum over a per-channel scale is never worse than the quantizer's own scale
    t = dfmpc.ternary_quantize(w).dequantize()
    fit = analysis.weight_fit(w, t)
    assert 0 < fit["best_scale_rel_error"] <= fit["rel_error"] < 1
    with pytest.raises(DfmpcError):
        analysis.weight_fit(torch.zeros(2, 3), torch.ones(2, 3))


def test_weight_histogram_counts_everything():
    w = torch.linspace(-1, 1, 101)
    h = analysis.weight_histogram(w, bins=10)
    assert sum(h["counts"]) == 101 and len(h["edges"]) == 11 and h["mean"] == pytest.approx(0, abs=1e-8)
    assert h["distinct"] == 101 and h["edges"][0] == -1.0 and h["edges"][-1] == 1.0


def test_filter_normalized_directions():
    model = _trained_looking_resnet()
    d1, d2 = analysis.filter_normalized_directions(model, 2, seed=3)
    again, _ = analysis.filter_normalized_directions(model, 2, seed=3)
    for p, u, v, w in zip(model.parameters(), d1, d2, again):
        assert u.shape == p.shape and torch.equal(u, w)
        if p.dim() <= 1:
            assert not u.any()
        else:
            norms_d = u.reshape(u.shape[0], -1).norm(dim=1)
            norms_p = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(norms_d, norms_p, rtol=1e-5, atol=1e-7)
            assert not torch.equal(u, v)


def test_loss_surface_centre_is_the_model_and_weights_are_restored(tiny_data):
    model = _trained_looking_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = analysis.batch_of(tiny_data, 16)
    surf = analysis.loss_surface(model, images, labels, steps=3, span=0.5, batch_size=5, device="cpu")
    with torch.no_grad():
        centre = nn.functional.cross_entropy(model(images), labels).item()
    assert surf["coords"] == [-0.5, 0.0, 0.5]
    assert len(surf["loss"]) == 3 and all(len(r) == 3 for r in surf["loss"])
    assert surf["loss"][1][1] == pytest.approx(centre, rel=1e-5) and surf["center_loss"] == surf["loss"][1][1]
    assert surf["loss"][0][0] != pytest.approx(centre, rel=1e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(DfmpcError):
        analysis.loss_surface(model, images, labels, steps=1)


# ----------------------------------------------------------------------------------------------- reproduce

@pytest.mark.parametrize("bits,method,unpaired", [("2/6", "dfmpc", "high"), ("3/6", "dfmpc", "low"),
                                                   ("4/4", "original", "high"), ("2/6", "original", "fp32")])
def test_planned_size_equals_the_reported_size(bits, method, unpaired):
    model = _trained_looking_resnet()
    _, report = dfmpc.quantize(model, bits, method=method, unpaired=unpaired)
    assert reproduce.planned_size_mb(model, bits, method, unpaired=unpaired) == pytest.approx(report.size_mb, rel=1e-12)


def test_settings_overrides_and_paper_tables():
    quick = reproduce.settings_for("diagnosis", "quick")
    assert quick["sweep_images"] == 400
    forced = reproduce.settings_for("diagnosis", "quick", 7)
    assert all(forced[k] == 7 for k in ("layer_images", "sweep_images", "pair_images", "pair_error_images"))
    assert reproduce.settings_for("table1", "quick", "all")["models"][0][2] is None
    assert reproduce.settings_for("table1", "full")["models"][0][2] is None
    with pytest.raises(DfmpcError):
        reproduce.settings_for("table1", "quick", 0)
    with pytest.raises(DfmpcError):
        reproduce.settings_for("table9", "quick")
    with pytest.raises(DfmpcError):
        reproduce.settings_for("table1", "slow")
    # the paper's numbers as printed in its Tables 1-4
    assert reproduce.PAPER["table1"]["ResNet56"] == {"fp32": 93.88, "original": 38.03, "dfmpc": 91.05}
    assert ("ResNet18", "DF-MPC", "2/6", 5.48, 66.46) in reproduce.PAPER["table3"]
    assert ("MobileNetV2", "DF-MPC", "6", 2.50, 71.29) in reproduce.PAPER["table4"]
    assert len(reproduce.PAPER["table3"]) == 12 and len(reproduce.PAPER["table4"]) == 9


def _check_envelope(result, name, limit=8):
    assert result["experiment"] == name and result["schema"] == reproduce.SCHEMA
    assert result["mode"] == "quick" and result["seed"] == 0 and result["limit_override"] == limit
    assert result["device"]["device"] == "cpu" and result["device"]["threads"] == 1
    assert {"dfmpc", "torch", "torchvision", "pytorchcv"} <= set(result["versions"])
    assert result["command"].startswith("dfmpc reproduce --quick")
    json.dumps(result)  # JSON-able as it is


def test_run_all_writes_one_json_per_experiment(tmp_path, shared):
    paths = reproduce.run_all("quick", tmp_path, limit=8, only=["table1", "fig4", "fig3"], progress=False, jobs=1,
                              command="dfmpc reproduce --quick --limit 8")
    assert sorted(p.name for p in paths.values()) == ["fig3.json", "fig4.json", "table1.json"]
    t1 = json.loads((tmp_path / "table1.json").read_text())
    _check_envelope(t1, "table1")
    (data,) = [d for d in t1["data"] if d["dataset"] == "cifar10"]
    assert data["jpeg"] and data["offline_copy"] and not data["comparable_to_paper"]
    assert data["images"] == 8 and data["available"] == 10000 and data["limit"] == 8
    assert data["path"].endswith("cifar10/test_jpeg")
    rows = {r["model"] or r["paper_model"]: r for r in t1["results"]["rows"]}
    assert rows["ResNet18"]["status"] == rows["VGG16"]["status"] == "not measured" and rows["VGG16"]["reason"]
    r56 = rows["resnet56_cifar10_a"]
    assert r56["status"] == "measured" and r56["paper_model"] == "ResNet56"
    res = r56["results"]
    assert set(res) == {"fp32", "original", "dfmpc"}
    assert res["dfmpc"]["settings"]["lambda1"] == 0.5 and res["dfmpc"]["settings"]["lambda2"] == 0.0
    assert res["original"]["size_mb"] < res["dfmpc"]["size_mb"] < res["fp32"]["size_mb"] / 4  # c costs a little
    assert res["dfmpc"]["pairs"] == 27 and res["original"]["images"] == 8
    assert all(0 <= res[k]["top1"] <= res[k]["top5"] <= 100 for k in res)
    assert t1["paper"]["ResNet56"]["original"] == 38.03
    # the same run through load_result, and its one-line description
    loaded = reproduce.load_result("table1", tmp_path)
    assert loaded["computed_now"] is False and loaded["results"] == t1["results"]
    assert reproduce.describe(loaded) == ("dfmpc reproduce --quick --limit 8 (experiment table1, seed 0; read from "
                                          "its JSON file)")
    f4 = json.loads((tmp_path / "fig4.json").read_text())
    _check_envelope(f4, "fig4")
    layer = f4["results"]["layers"]["layer1.2.conv2"]
    assert layer["before"]["distinct"] <= 64 < layer["after"]["distinct"]  # 6 bits, then rescaled channels
    assert sum(layer["before"]["counts"]) == sum(layer["after"]["counts"]) == 16 * 16 * 9
    assert f4["results"]["high_layer_count"] == 27
    f3 = json.loads((tmp_path / "fig3.json").read_text())
    sweep = f3["results"]["sweeps"]["2/6"]
    assert [r["lambda1"] for r in sweep["lambda1"]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert [r["lambda2"] for r in sweep["lambda2"]] == [0.0, 0.002, 0.004, 0.006, 0.008, 0.01]
    # lambda1 = 0.5, lambda2 = 0 is in both sweeps: the same model, the same images, the same accuracy
    assert sweep["lambda1"][4]["top1"] == sweep["lambda2"][0]["top1"]


def test_diagnosis_and_fig5_tiny(shared):
    diag = reproduce.run_experiment("diagnosis", "quick", limit=8, command="dfmpc reproduce --quick --limit 8")
    _check_envelope(diag, "diagnosis")
    res = diag["results"]
    errs = res["layers"]["errors"]["original 2/6"]
    assert errs[0]["name"] == "conv1" and errs[-1]["name"] == "linear" and len(errs) == 56  # 1 + 54 + 1
    assert {r["role"] for r in errs} == {"low", "high", "unpaired"}
    low = [r for r in errs if r["role"] == "low"]
    assert all(r["local"] > 0.1 for r in low)  # a ternary layer is far from its full-precision output
    assert len(res["pairs"]["rows"]) == 9 and res["pairs"]["rows"][0]["low"] == "layer1.0.conv1"
    assert len(res["bits"]["rows"]) == 8
    fit = {(f["model"], f["low_bits"], f["granularity"]): f for f in res["weight_fit"]}
    for key, f in fit.items():
        assert 0 < f["best_scale_rel_error_mean"] <= f["rel_error_mean"], key
    # more bits, smaller weight error
    assert fit[("resnet20_cifar10_a", 4, "tensor")]["rel_error_mean"] < fit[("resnet20_cifar10_a", 2, "tensor")]["rel_error_mean"]
    fig5 = reproduce.run_experiment("fig5", "quick", limit=8, command="dfmpc reproduce --quick --limit 8")
    surfaces = fig5["results"]["surfaces"]
    assert set(surfaces) == {"fp32", "original", "dfmpc"}
    steps = fig5["results"]["steps"]
    assert all(len(s["loss"]) == steps and all(math.isfinite(v) for row in s["loss"] for v in row)
               for s in surfaces.values())
    assert fig5["data"][0]["images"] == 8


def test_load_result_refuses_other_files(tmp_path):
    (tmp_path / "fig4.json").write_text(json.dumps({"experiment": "fig3", "schema": reproduce.SCHEMA}))
    with pytest.raises(DfmpcError, match="not a schema"):
        reproduce.load_result("fig4", tmp_path)
    with pytest.raises(DfmpcError, match="not found"):
        reproduce.load_result("table1", tmp_path, compute=False)


@pytest.mark.parametrize("argv,needle", [
    (["reproduce", "--limit", "5", "--images", "all"], "not both"),
    (["reproduce", "--images", "some"], "--images takes 'all'"),
    (["reproduce", "--limit", "0"], "positive"),
    (["reproduce", "--only", "table1,table9"], "unknown experiment"),
    (["reproduce", "--threads", "0", "--only", "fig4"], "--threads"),
])
def test_reproduce_cli_errors(capsys, tmp_path, argv, needle):
    code = main(argv + ["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1


def test_reproduce_cli_quick_subset(capsys, tmp_path, shared):
    code = main(["reproduce", "--quick", "--only", "fig4", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "fig4.json").read_text())
    assert result["command"] == f"dfmpc reproduce --quick --out {tmp_path} --only fig4"
    assert "fig4" in capsys.readouterr().err


@pytest.mark.slow
def test_every_experiment_runs_tiny(tmp_path, shared):
    paths = reproduce.run_all("quick", tmp_path, limit=4, progress=False, command="dfmpc reproduce --quick --limit 4")
    assert set(paths) == set(reproduce.EXPERIMENTS)
    for name, path in paths.items():
        _check_envelope(json.loads(path.read_text()), name, limit=4)
    t34 = json.loads(paths["table34"].read_text())["results"]
    sizes = {(r["model"], r["method"]): r for r in t34["sizes"]}
    assert sizes[("ResNet18", "Full-precision")]["size_mb"] == pytest.approx(44.59, abs=0.005)  # the paper's figure
    assert sizes[("MobileNetV2", "Full-precision")]["size_mb"] == pytest.approx(13.37, abs=0.005)
    assert t34["standin"]["status"] == "measured"


def test_data_label_and_md_table():
    rec = {"dataset": "cifar10", "offline_copy": True, "jpeg": True, "images": 400, "available": 10000, "fallback": None}
    assert reproduce.data_label(rec) == "CIFAR-10 test, JPEG copy, 400 of 10,000"
    real = {"dataset": "imagenet", "offline_copy": False, "jpeg": True, "images": 50000, "available": 50000,
            "fallback": None}
    assert reproduce.data_label(real) == "ImageNet val, all 50,000"
    assert reproduce.data_label({**rec, "fallback": "no internet"}).endswith("(fallback: the real set was unavailable)")
    assert reproduce.data_label(None) == "weights only (no images)"
    assert reproduce.md_table(["a", "b"], [[1, "x|y"]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]
