"""The experiments package: measurements, settings, the runner and its JSON, the comparison, the book's results."""
import copy
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dfmpc
from dfmpc import experiments
from dfmpc.cifar_resnet import CifarResNet
from dfmpc.cli import main
from dfmpc.errors import DfmpcError
from dfmpc.evaluate import evaluate, predict
from dfmpc.experiments import book, compare, deviations, measure, pair_roles, paper, table34
from dfmpc.methods import METHODS, setting_defaults

ROOT = Path(__file__).resolve().parents[1]


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
    """Small tensors: one thread is faster (and the quick preset runs single-threaded too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(40, 3, 32, 32, generator=g), torch.randint(0, 10, (40,), generator=g))


# ----------------------------------------------------------------------------------------------- the one loop

def test_predictions_give_what_evaluate_gives_and_agreement(tiny_data):
    model = _trained_looking_resnet()
    pred = predict(model, tiny_data, device="cpu", batch_size=16)
    ref = evaluate(model, tiny_data, batch_size=7, device="cpu", progress=False)
    assert pred.top5.shape == (40, 5) and pred.loss.shape == (40,) and len(pred) == 40
    assert pred.top1_accuracy() == pytest.approx(ref["top1"]) and pred.top5_accuracy() == pytest.approx(ref["top5"])
    with torch.no_grad():
        logits = model(torch.stack([x for x, _ in tiny_data]))
        labels = torch.tensor([int(y) for _, y in tiny_data])
    assert ref["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert pred.top1_accuracy() == pytest.approx(100 * (logits.argmax(1) == labels).double().mean().item())
    assert pred.agreement(pred) == 100.0
    other = dfmpc.evaluate.Predictions((pred.top5 + 1) % 10, pred.labels, pred.loss)
    assert other.agreement(pred) == 0.0
    with pytest.raises(DfmpcError, match="same images"):
        other.agreement(dfmpc.evaluate.Predictions(pred.top5[:3], pred.labels[:3], pred.loss[:3]))


# ----------------------------------------------------------------------------------------------- analysis

def test_feature_errors_zero_for_a_copy_and_local_equals_accumulated_at_the_first_change(tiny_data):
    model = _trained_looking_resnet()
    images = torch.stack([tiny_data[i][0] for i in range(8)])
    same = measure.feature_errors(model, _trained_looking_resnet(), images, device="cpu")
    assert len(same) == 20 and all(r["accumulated"] == 0 and r["local"] == 0 for r in same)
    # change one layer in the middle: nothing before it moves; at it, local == accumulated
    changed = _trained_looking_resnet()
    changed.layer2[0].conv1.weight.data.mul_(1.5)
    rows = measure.feature_errors(model, changed, images, batch_size=3, device="cpu")
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
    fit = measure.weight_fit(w, 2 * w)
    assert fit["rel_error"] == pytest.approx(1.0) and fit["best_scale_rel_error"] == pytest.approx(0.0, abs=1e-7)
    # a filter bank orthogonal to w cannot be rescaled into it
    q = torch.randn(6, 36)
    a = w.reshape(6, -1)
    q = q - (q * a).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a
    fit = measure.weight_fit(w, q.reshape(w.shape))
    assert fit["best_scale_rel_error"] == pytest.approx(1.0, abs=1e-6) and fit["cos_mean"] == pytest.approx(0, abs=1e-6)
    # ternary: the optimum over a per-channel scale is never worse than the quantizer's own scale
    t = dfmpc.ternary_quantize(w).dequantize()
    fit = measure.weight_fit(w, t)
    assert 0 < fit["best_scale_rel_error"] <= fit["rel_error"] < 1
    with pytest.raises(DfmpcError):
        measure.weight_fit(torch.zeros(2, 3), torch.ones(2, 3))


def test_weight_histogram_counts_everything():
    w = torch.linspace(-1, 1, 101)
    h = measure.weight_histogram(w, bins=10)
    assert sum(h["counts"]) == 101 and len(h["edges"]) == 11 and h["mean"] == pytest.approx(0, abs=1e-8)
    assert h["distinct"] == 101 and h["edges"][0] == -1.0 and h["edges"][-1] == 1.0


def test_filter_normalized_directions():
    model = _trained_looking_resnet()
    d1, d2 = measure.filter_normalized_directions(model, 2, seed=3)
    again, _ = measure.filter_normalized_directions(model, 2, seed=3)
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
    images, labels = measure.batch_of(tiny_data, 16)
    surf = measure.loss_surface(model, images, labels, steps=3, span=0.5, batch_size=5, device="cpu")
    with torch.no_grad():
        centre = nn.functional.cross_entropy(model(images), labels).item()
    assert surf["coords"] == [-0.5, 0.0, 0.5]
    assert len(surf["loss"]) == 3 and all(len(r) == 3 for r in surf["loss"])
    assert surf["loss"][1][1] == pytest.approx(centre, rel=1e-5) and surf["center_loss"] == surf["loss"][1][1]
    assert surf["loss"][0][0] != pytest.approx(centre, rel=1e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(DfmpcError):
        measure.loss_surface(model, images, labels, steps=1)


# ----------------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("bits,method,unpaired", [("2/6", "dfmpc", "high"), ("3/6", "dfmpc", "low"),
                                                   ("4/4", "original", "high"), ("2/6", "original", "fp32")])
def test_planned_size_equals_the_reported_size(bits, method, unpaired):
    model = _trained_looking_resnet()
    _, report = dfmpc.quantize(model, bits, method=method, unpaired=unpaired)
    assert table34.planned_size_mb(model, bits, method, unpaired=unpaired) == pytest.approx(report.size_mb, rel=1e-12)


def test_settings_image_counts_overrides_and_paper_tables():
    quick = experiments.settings_for("diagnosis", "quick")
    assert quick["sweep_images"] == 400
    forced = experiments.settings_for("diagnosis", "quick", 7)
    assert all(forced[k] == 7 for k in ("layer_images", "sweep_images", "pair_images", "pair_error_images"))
    assert forced["sweep_bits"] == quick["sweep_bits"]  # only image counts change
    assert [m["images"] for m in experiments.settings_for("table1", "quick", "all")["models"]] == [None, None]
    assert all(m["images"] is None for m in experiments.settings_for("table1", "full")["models"])
    # --set: typed like the preset's value; lists are comma-separated
    cfg = experiments.settings_for("compare", "quick", overrides={"models": "resnet20_cifar10_a,resnet56_cifar10_a",
                                                                  "images": "50", "bits": "2/6"})
    assert cfg["models"] == ["resnet20_cifar10_a", "resnet56_cifar10_a"] and cfg["images"] == 50 and cfg["bits"] == ["2/6"]
    assert experiments.settings_for("compare", "quick", overrides={"images": "all"})["images"] is None
    for bad, needle in (({"nope": "1"}, "no setting 'nope'"), ({"images": "many"}, "takes a number")):
        with pytest.raises(DfmpcError, match=needle):
            experiments.settings_for("compare", "quick", overrides=bad)
    for args, needle in ((("table1", "quick", 0), "positive"), (("table9", "quick"), "unknown experiment"),
                         (("table1", "slow"), "unknown preset")):
        with pytest.raises(DfmpcError, match=needle):
            experiments.settings_for(*args)
    # every experiment has both presets, and the book says which one it shows
    for name, module in experiments.EXPERIMENTS.items():
        assert set(module.SETTINGS) == set(experiments.PRESETS) and module.NAME == name and module.TITLE
        assert experiments.BOOK_PRESETS[name] in experiments.PRESETS
    # the paper's numbers as printed in its Tables 1-4
    assert paper.PAPER["table1"]["ResNet56"] == {"fp32": 93.88, "original": 38.03, "dfmpc": 91.05}
    assert ("ResNet18", "DF-MPC", "2/6", 5.48, 66.46) in paper.PAPER["table3"]
    assert ("MobileNetV2", "DF-MPC", "6", 2.50, 71.29) in paper.PAPER["table4"]
    assert len(paper.PAPER["table3"]) == 12 and len(paper.PAPER["table4"]) == 9


# ----------------------------------------------------------------------------------------------- runs

def _check_envelope(result, name, images=8):
    assert result["experiment"] == name and result["schema"] == experiments.SCHEMA
    assert result["preset"] == "quick" and result["seed"] == 0 and result["images_override"] == images
    assert result["device"]["device"] == "cpu" and result["device"]["threads"] == 1
    assert {"dfmpc", "torch", "torchvision", "pytorchcv"} <= set(result["versions"])
    assert result["title"] == experiments.EXPERIMENTS[name].TITLE
    json.dumps(result)  # JSON-able as it is


def test_run_experiments_writes_one_json_per_experiment(tmp_path, shared):
    paths = experiments.run_experiments(["table1", "fig4", "fig3"], "quick", tmp_path, images=8, jobs=1,
                                        command="dfmpc experiments table1 fig4 fig3 --images 8")
    assert sorted(p.name for p in paths.values()) == ["fig3.json", "fig4.json", "table1.json"]
    t1 = json.loads((tmp_path / "table1.json").read_text())
    _check_envelope(t1, "table1")
    assert t1["command"] == "dfmpc experiments table1 fig4 fig3 --images 8"
    (data,) = [d for d in t1["data"] if d["dataset"] == "cifar10"]
    assert data["jpeg"] and data["offline_copy"] and not data["comparable_to_paper"]
    assert data["images"] == 8 and data["available"] == 5000 and data["limit"] == 8 and data["split"] == "test"
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
    loaded = experiments.load_result("table1", tmp_path)
    assert loaded == t1
    assert experiments.describe(loaded) == ("dfmpc experiments table1 --quick --images 8 (seed 0; committed in "
                                            "book/data/table1.json)")
    assert "command: dfmpc experiments table1" in book.provenance(loaded)
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


def test_a_run_is_reproducible(tmp_path, shared):
    """Deterministic by default: the same experiment twice gives the same results, to the last digit."""
    a = experiments.run_experiment("fig3", "quick", images=6, overrides={"bits": "3/6", "lambda2": "0"})
    b = experiments.run_experiment("fig3", "quick", images=6, overrides={"bits": "3/6", "lambda2": "0"})
    assert a["results"] == b["results"] and a["settings"]["bits"] == ["3/6"]


def test_diagnosis_and_fig5_tiny(shared):
    diag = experiments.run_experiment("diagnosis", "quick", images=8)
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
    r20 = "resnet20_cifar10_a"
    assert fit[(r20, 4, "tensor")]["rel_error_mean"] < fit[(r20, 2, "tensor")]["rel_error_mean"]
    fig5 = experiments.run_experiment("fig5", "quick", images=8)
    surfaces = fig5["results"]["surfaces"]
    assert set(surfaces) == {"fp32", "original", "dfmpc"}
    steps = fig5["results"]["steps"]
    assert all(len(s["loss"]) == steps and all(math.isfinite(v) for row in s["loss"] for v in row)
               for s in surfaces.values())
    assert fig5["data"][0]["images"] == 8


def test_the_diagnosis_placement_rows_change_the_compensation_not_the_k_bit_codes():
    """Section 5 of the diagnosis compares where c acts on the same codes: every dfmpc+ row has original's k-bit codes
    and scales; its ternary codes (dfmpc+'s MSE-optimal ones) differ from the paper's threshold on a few per cent."""
    from dfmpc.experiments.diagnosis import PLACEMENT_VARIANTS

    torch.manual_seed(0)
    model = CifarResNet(20).eval()
    for bits in ("2/6", "3/6"):
        _, reference = dfmpc.quantize(model, bits, "original")
        for label, (method, settings) in PLACEMENT_VARIANTS.items():
            if method != "dfmpc+":
                continue
            _, report = dfmpc.quantize(model, bits, method, **settings)
            for name, q in report.quantized.items():
                ref = reference.quantized[name]
                if q.bits == 2:
                    assert (q.codes != ref.codes).float().mean() < 0.08, (label, name)  # 3-5 % measured here
                else:
                    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scale, ref.scale), (label, bits, name)


def test_compare_has_every_cell_and_its_views_read_them(shared):
    data = experiments.run_experiment("compare", "quick", images=40, overrides={
        "methods": "original,dfmpc+", "bits": "4/6,2/6", "ablation_bits": "2/6"})
    res = data["results"]
    assert res["models"][0]["images"] == 40 and data["seed"] == 0 and "torch" in data["versions"]
    assert [(r["method"], r["bits"]) for r in res["rows"]] == [("original", "4/6"), ("dfmpc+", "4/6"),
                                                               ("original", "2/6"), ("dfmpc+", "2/6")]
    assert all(r["size_mb"] > 0 and r["quantize_seconds"] > 0 and 0 <= r["agreement_with_fp32"] <= 100
               for r in res["rows"])
    assert [r["variant"] for r in res["ablation"]] == list(compare.ABLATION)
    assert "resnet20_cifar10_a" in compare.format_table(data) and "no mean correction" in compare.format_ablation(data)
    assert compare.figure(data, "resnet20_cifar10_a", "2/6", "original") == res["rows"][2]["top1"]
    assert compare.figure(data, "resnet20_cifar10_a", "4/6", "dfmpc+", "size_mb") == res["rows"][1]["size_mb"]
    # the protocol: the table on the test half, the ablation (which decides) on the development half
    assert res["models"][0]["data"]["split"] == "test" and res["ablation_fp32"][0]["data"]["split"] == "dev"
    assert res["protocol"]["development_models"] == ["resnet20_cifar10_a"]
    # the ablation's unchanged variant is the dfmpc+ cell's quantization (same model), on other images
    assert compare.figure(data, "resnet20_cifar10_a", "2/6", variant="dfmpc+", field="size_mb") == compare.figure(
        data, "resnet20_cifar10_a", "2/6", "dfmpc+", "size_mb")
    assert all(r["top1_se"] > 0 for r in res["rows"]) and "standard error" in compare.format_table(data)
    with pytest.raises(DfmpcError, match="no result for resnet20_cifar10_a at 3/6"):
        compare.figure(data, "resnet20_cifar10_a", "3/6", "original")
    with pytest.raises(DfmpcError, match="unknown method"):
        experiments.run_experiment("compare", "quick", images=4, overrides={"methods": "magic"})


def test_load_result_refuses_other_files(tmp_path):
    (tmp_path / "fig4.json").write_text(json.dumps({"experiment": "fig3", "schema": experiments.SCHEMA}))
    with pytest.raises(DfmpcError, match="not a schema"):
        experiments.load_result("fig4", tmp_path)
    with pytest.raises(DfmpcError, match="not found"):
        experiments.load_result("table1", tmp_path)
    (tmp_path / "fig5.json").write_text("{")
    with pytest.raises(DfmpcError, match="not valid JSON"):
        experiments.load_result("fig5", tmp_path)


@pytest.mark.parametrize("argv,needle", [
    (["experiments", "--images", "some"], "--images takes a positive number or 'all'"),
    (["experiments", "--images", "0"], "positive"),
    (["experiments", "table1", "table9"], "unknown experiment"),
    (["experiments", "fig4", "--threads", "0"], "--threads"),
    (["experiments", "fig4", "--device", "foo"], "unknown device"),
    (["experiments", "fig4", "--set", "nope"], "KEY=VALUE"),
    (["experiments", "fig4", "--set", "bins=many"], "takes a number"),
    (["experiments", "fig4", "--data-dir", "/no/such"], "DATASET=DIR"),
    (["experiments", "fig4", "--data-dir", "svhn=/tmp"], "unknown data set"),
    (["experiments", "fig4", "--jobs", "0"], "--jobs"),
])
def test_experiments_cli_errors(capsys, tmp_path, argv, needle):
    code = main(argv + ["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_experiments_cli_runs_one_and_lists_all(capsys, tmp_path, shared):
    assert main(["experiments", "--list"]) == 0
    listed = capsys.readouterr().out.split("\n")
    assert [line.split()[0] for line in listed if line] == list(experiments.EXPERIMENTS)
    code = main(["experiments", "fig4", "--quick", "--out", str(tmp_path), "--no-progress", "--set", "bins=16"])
    assert code == 0
    result = json.loads((tmp_path / "fig4.json").read_text())
    assert result["command"] == f"dfmpc experiments fig4 --quick --out {tmp_path} --no-progress --set bins=16"
    assert len(result["results"]["layers"]["layer1.2.conv2"]["fp32"]["counts"]) == 16
    assert "fig4" in capsys.readouterr().err


@pytest.mark.slow
def test_every_experiment_runs_tiny(tmp_path, shared):
    paths = experiments.run_experiments(None, "quick", tmp_path, images=4)
    assert set(paths) == set(experiments.EXPERIMENTS)
    for name, path in paths.items():
        _check_envelope(json.loads(path.read_text()), name, images=4)
    t34 = json.loads(paths["table34"].read_text())["results"]
    sizes = {(r["model"], r["method"]): r for r in t34["sizes"]}
    assert sizes[("ResNet18", "Full-precision")]["size_mb"] == pytest.approx(44.59, abs=0.005)  # the paper's figure
    assert sizes[("MobileNetV2", "Full-precision")]["size_mb"] == pytest.approx(13.37, abs=0.005)
    assert t34["standin"]["status"] == "measured"


def test_data_label_and_md_table():
    rec = {"dataset": "cifar10", "offline_copy": True, "jpeg": True, "images": 400, "available": 10000, "fallback": None}
    assert experiments.data_label(rec) == "CIFAR-10 test, JPEG copy, 400 of 10,000"
    real = {"dataset": "imagenet", "offline_copy": False, "jpeg": True, "images": 50000, "available": 50000,
            "fallback": None}
    assert experiments.data_label(real) == "ImageNet val, all 50,000"
    assert experiments.data_label({**rec, "fallback": "no internet"}).endswith("(fallback: the real set was unavailable)")
    assert experiments.data_label(None) == "weights only (no images)"
    assert experiments.md_table(["a", "b"], [[1, "x|y"]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]


# ----------------------------------------------------------------------------------------------- the book's data

BOOK = {name: experiments.load_result(name, ROOT / "book" / "data") for name in experiments.EXPERIMENTS
        if (ROOT / "book" / "data" / f"{name}.json").is_file()}


def test_every_result_the_book_shows_is_committed_with_its_provenance():
    assert set(BOOK) == set(experiments.EXPERIMENTS), "run: dfmpc experiments --book"
    for name, result in BOOK.items():
        assert result["preset"] == experiments.BOOK_PRESETS[name], name
        assert result["command"].startswith("dfmpc experiments") and result["created"] and result["versions"]["dfmpc"]
        expected = experiments.settings_for(name, result["preset"], result["images_override"],
                                            experiments.BOOK_OVERRIDES[name])
        assert result["settings"] == expected, (
            f"book/data/{name}.json was made with other settings than the code's {result['preset']} preset; "
            "rerun dfmpc experiments --book")
        for record in result["data"]:
            assert record["offline_copy"] and record["path"] is not None, (name, record)


def test_every_result_records_the_clean_commit_of_its_code():
    # main_command.json is the README's main command with --json: its commit is at the top, not under "versions"
    main = json.loads((ROOT / "book" / "data" / "main_command.json").read_text())
    # a result whose rows of one method were rerun since (--rerun-method) records that run's code beside its own
    rerun = {f"{n} ({m}'s rows)": v["versions"] for n, r in BOOK.items() for m, v in r.get("method_versions", {}).items()}
    for name, version in {**{n: r["versions"] for n, r in BOOK.items()}, **rerun, "main_command": main}.items():
        assert re.fullmatch(r"[0-9a-f]{40}", version.get("commit") or ""), f"book/data/{name}.json records no commit"
        assert version["dirty"] is False, f"book/data/{name}.json was made by uncommitted code: rerun from a clean clone"


def test_the_books_comparison_is_whole_and_consistent():
    """book/data/compare.json (the book's full table) has every model x bits x method cell once, on the test half;
    the ablation ran on the development half of the development models only, its unchanged dfmpc+ row being the
    dfmpc+ cell's quantization."""
    data = BOOK["compare"]
    cfg = data["settings"]
    assert cfg["images"] is None and all(e["images"] == e["data"]["available"] for e in data["results"]["models"])
    cells = [(r["model"], r["bits"], r["method"]) for r in data["results"]["rows"]]
    assert sorted(cells) == sorted(itertools.product(cfg["models"], cfg["bits"], METHODS))
    assert [e["model"] for e in data["results"]["models"]] == cfg["models"]
    assert all(e["data"]["split"] == "test" for e in data["results"]["models"])
    assert {e["model"] for e in data["results"]["ablation_fp32"]} == set(compare.DEVELOPMENT_MODELS)
    assert all(e["data"]["split"] == "dev" for e in data["results"]["ablation_fp32"])
    for model, bits in {(r["model"], r["bits"]) for r in data["results"]["ablation"]}:
        assert model in compare.DEVELOPMENT_MODELS  # nothing is decided on the confirmation models
        assert compare.figure(data, model, bits, variant="dfmpc+", field="size_mb") == compare.figure(
            data, model, bits, "dfmpc+", "size_mb")


def _same_run(a: dict, b: dict, method: str) -> bool:
    """Two results' settings of ``method`` describe the same run: equal where both record a setting, and a setting
    only one records (added to the method after the other result ran, e.g. SQuant's and dfmpc+'s ``grid``) at its
    default, which is what the other one ran."""
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in setting_defaults(method).items()}
    both = {**a, **b}
    return all(a[k] == b[k] for k in a.keys() & b.keys()) and all(both[k] == defaults[k] for k in a.keys() ^ b.keys())


def test_the_books_deviations_measure_each_competitor_at_its_authors_settings():
    """book/data/deviations.json: the development half only; "ours" is exactly what the test-half table ran (the
    settings of its row in compare.json), "the authors'" differs from it in the listed settings only."""
    data = BOOK["deviations"]
    res = data["results"]
    assert data["settings"]["split"] == "dev" and [r["split"] for r in data["data"]] == ["dev"]
    assert res["images"] == data["data"][0]["available"] == 5000
    table = {(r["method"], r["bits"]): {k: v for k, v in r["settings"].items() if k != "keep_fp32"}  # measure() drops it
             for r in BOOK["compare"]["results"]["rows"] if r["model"] == res["model"]}
    listed = {(e["method"], e["setting"]): e for e in deviations.DEVIATIONS}
    assert {(d["method"], d["setting"]) for d in res["deviations"]} == set(listed)
    for d in res["deviations"]:
        for c in d["cells"]:
            assert _same_run(c["ours"]["settings"], table[(d["method"], c["bits"])], d["method"])
            assert listed[(d["method"], d["setting"])]["authors_settings"] is not None
            changed = {k: v for k, v in c["authors"]["settings"].items() if c["ours"]["settings"][k] != v}
            assert changed == d["authors_settings"], (d["method"], d["setting"], changed)
    steps = [c["authors"]["settings"]["steps"] for d in res["deviations"] if d["setting"] == "distillation iterations"
             for c in d["cells"]]
    assert steps == [500] * len(res["bits"])  # the authors' distill_data.py


def test_the_books_full_strength_zeroq_differs_from_the_table_only_in_its_distillation():
    """book/data/zeroq_authors.json: the test half of models of the table with labelled test images; ZeroQ's
    settings are those of its row in compare.json but for the authors' 500 iterations on 32 images; dfmpc+ (the
    same code, the same images) gives the table's figures exactly."""
    from dfmpc.experiments import zeroq_authors

    res = BOOK["zeroq_authors"]["results"]
    table = BOOK["compare"]["results"]
    models = BOOK["zeroq_authors"]["settings"]["models"]
    labelled = {e["model"]: e for e in table["models"] if e["metric"] == "top1"}
    assert [e["model"] for e in res["models"]] == models and set(models) <= set(labelled)
    assert res["bits"] == ["2/6", "3/6", "4/6"]
    for entry in res["models"]:
        ref = labelled[entry["model"]]
        assert entry["data"] == ref["data"] and entry["data"]["split"] == "test"
        assert [entry["fp32"][k] for k in ("top1", "top5", "images")] == [ref["fp32"][k] for k in ("top1", "top5", "images")]
    assert sorted((r["model"], r["bits"], r["method"]) for r in res["rows"]) == sorted(
        itertools.product(models, res["bits"], ("dfmpc+", "zeroq")))
    rows = {(r["model"], r["bits"], r["method"]): r for r in table["rows"]}
    for r in res["rows"]:
        ref = rows[(r["model"], r["bits"], r["method"])]
        if r["method"] == "dfmpc+":
            assert r["top1"] == ref["top1"] and _same_run(r["settings"], ref["settings"], "dfmpc+"), (r["model"], r["bits"])
        else:
            changed = {k: v for k, v in r["settings"].items() if ref["settings"][k] != v}
            assert changed == {"steps": 500, "images": 32} == {"steps": zeroq_authors.AUTHORS["zeroq_steps"],
                                                                "images": zeroq_authors.AUTHORS["zeroq_batch"]}
    header, cells = zeroq_authors.rows(BOOK["zeroq_authors"], BOOK["compare"])
    assert len(cells) == len(models) * 3 and all(len(c) == len(header) for c in cells)


def test_the_books_authors_settings_of_squant_and_ocs_differ_from_the_table_only_there():
    """book/data/authors_data_free.json: every model of the table on the same test half; OCS's settings are those of
    its row in compare.json but for one scale per tensor, SQuant's the same but for grid="asymmetric"; dfmpc+ (the
    same code, the same images) gives the table's figures exactly."""
    from dfmpc.experiments import authors_data_free

    res = BOOK["authors_data_free"]["results"]
    table = BOOK["compare"]["results"]
    models = BOOK["authors_data_free"]["settings"]["models"]
    assert models == BOOK["compare"]["settings"]["models"] and res["bits"] == ["2/6", "3/6", "4/6"]
    for entry, ref in zip(res["models"], table["models"]):
        assert entry["data"] == ref["data"] and entry["data"]["split"] == "test" and entry["metric"] == ref["metric"]
        assert [entry["fp32"][k] for k in ("top1", "top5", "images")] == [ref["fp32"][k] for k in ("top1", "top5", "images")]
    assert sorted((r["model"], r["bits"], r["method"]) for r in res["rows"]) == sorted(
        itertools.product(models, res["bits"], ("dfmpc+", "squant", "ocs")))
    rows = {(r["model"], r["bits"], r["method"]): r for r in table["rows"]}
    for r in res["rows"]:
        ref = rows[(r["model"], r["bits"], r["method"])]
        # a setting the table's row does not record (added to the method after it ran) counts at its default
        defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in setting_defaults(r["method"]).items()}
        changed = {k: v for k, v in r["settings"].items() if ref["settings"].get(k, defaults.get(k)) != v}
        assert changed == authors_data_free.AUTHORS.get(r["method"], {}), (r["model"], r["bits"], r["method"])
        if r["method"] == "dfmpc+":
            assert (r["top1"], r["agreement_with_fp32"]) == (ref["top1"], ref["agreement_with_fp32"])
    header, cells = authors_data_free.rows(BOOK["authors_data_free"], BOOK["compare"])
    labelled = [e for e in res["models"] if e["metric"] == "top1"]
    assert len(cells) == len(labelled) * 3 and all(len(c) == len(header) for c in cells)


def test_strongest_keeps_the_better_setting_of_each_competitor_cell_by_cell():
    """The merge judges dfmpc+ against each competitor at its stronger setting, and leaves the other cells alone."""
    from dfmpc.experiments import authors_data_free, verdict

    def result(rows):
        return {"results": {"bits": ["2/6"], "methods": {m: "" for m in ("dfmpc+", "squant", "ocs", "dfq")},
                            "models": [{"model": "m", "metric": "top1", "images": 5000}],
                            "rows": [{"model": "m", "bits": "2/6", "method": k, "top1": v} for k, v in rows.items()]}}

    table = result({"dfmpc+": 80.0, "squant": 78.0, "ocs": 70.0, "dfq": 60.0})
    authors = result({"dfmpc+": 80.0, "squant": 79.5, "ocs": 65.0})
    merged = authors_data_free.strongest(table, authors)
    got = {r["method"]: (r["top1"], r["setting"]) for r in merged["results"]["rows"]}
    assert got == {"dfmpc+": (80.0, "ours"), "squant": (79.5, "authors'"), "ocs": (70.0, "ours"), "dfq": (60.0, "ours")}
    assert [r["top1"] for r in table["results"]["rows"]] == [80.0, 78.0, 70.0, 60.0]  # the inputs are not changed
    assert verdict.standing(table, "m", "2/6").word == "ahead" and verdict.standing(merged, "m", "2/6").word == "tie"


def test_the_books_speed_times_dfmpc_plus_on_one_thread_and_judges_the_targets_by_it():
    """book/data/speed.json: dfmpc+ at 2/6 on ResNet-18, ResNet-50 and VGG-16 (BN), random weights, one CPU thread;
    seconds per million parameters from the median; the targets read from those rows."""
    from dfmpc.experiments import speed

    rows = BOOK["speed"]["results"]["rows"]
    assert [r["model"] for r in rows] == ["resnet18", "resnet50", "bn_vgg16"]
    for r in rows:
        assert (r["method"], r["bits"], r["weights"], r["threads"], r["device"]) == ("dfmpc+", "2/6", "random", 1, "cpu")
        assert r["min_s"] <= r["median_s"] and r["repeat"] == 3 and r["parameters"] > 10_000_000
        assert math.isclose(r["seconds_per_mparameter"], r["median_s"] * 1e6 / r["parameters"])
    measured = {t["target"].split(" ")[0]: t for t in speed.targets(BOOK["speed"])}
    assert measured["ResNet-18"]["measured"] == rows[0]["median_s"]
    per = [r["seconds_per_mparameter"] for r in rows]
    assert measured["seconds"]["measured"] == max(per) / min(per)


def test_speed_targets_are_met_only_under_their_bounds():
    from dfmpc.experiments import speed

    def data(r18_s, r18_per, other_per):
        return {"results": {"rows": [
            {"model": "resnet18", "bits": "2/6", "median_s": r18_s, "seconds_per_mparameter": r18_per},
            {"model": "bn_vgg16", "bits": "2/6", "median_s": 1.0, "seconds_per_mparameter": other_per}]}}

    assert [t["met"] for t in speed.targets(data(0.49, 1.0, 2.0))] == [True, True]
    assert [t["met"] for t in speed.targets(data(0.51, 1.0, 2.01))] == [False, False]
    assert [t["met"] for t in speed.targets(data(0.49, 2.01, 1.0))] == [True, False]  # the spread either way
    assert [t["shown"] for t in speed.targets(data(0.494, 1.0, 2.0))] == ["0.49 s", "2.00x"]  # the unit follows the target
    assert speed.targets({"results": {"rows": []}}) == []


def test_deviation_effects_call_a_difference_under_one_standard_error_a_tie():
    def cell(top1):
        return {"top1": top1, "top1_se": compare.standard_error(top1, 1000), "quantize_s": 0, "settings": {}}

    data = {"results": {"deviations": [{"method": "m", "setting": "s", "why": "w", "cells": [
        {"bits": "2/6", "ours": cell(50.0), "authors": cell(51.0), "dfmpc+": 60.0},    # SE 1.58: a tie
        {"bits": "3/6", "ours": cell(50.0), "authors": cell(48.0), "dfmpc+": 60.0},    # -2.00: lower
        {"bits": "4/6", "ours": cell(50.0), "authors": None, "dfmpc+": 60.0}]}]}}
    assert [(e["bits"], e["word"]) for e in deviations.effects(data)] == [("2/6", "tie"), ("3/6", "lower")]
    assert "a tie: +1.00 points" in deviations.summary(data)[0] and "lower: -2.00" in deviations.summary(data)[0]


def test_dfmpc_plus_defaults_survive_the_ablations_decision_rule():
    """No variant of the committed ablation (development half of the development models) beats the defaults
    under compare.DECISION_RULE, except those listed, with their reason, in compare.PENDING_ADOPTION; and the
    rule does adopt a variant that is better everywhere."""
    data = BOOK["compare"]
    decisions = compare.ablation_decisions(data)
    assert {d["variant"] for d in decisions} == set(compare.ABLATION) - {"dfmpc+"}
    assert all(d["cells"] == 2 * len(data["settings"]["ablation_bits"]) for d in decisions)
    assert {d["variant"] for d in decisions if d["adopted"]} == set(compare.PENDING_ADOPTION)
    better = copy.deepcopy(data)
    for r in better["results"]["ablation"]:
        if r["variant"] == "one scale per tensor":
            r["top1"] = compare.figure(data, r["model"], r["bits"], variant="dfmpc+") + 0.1
    assert next(d for d in compare.ablation_decisions(better) if d["variant"] == "one scale per tensor")["adopted"]


def test_the_books_pair_roles_ablation_extends_the_comparisons_and_is_decided_by_its_rule():
    """book/data/pair_roles.json: the cells of the comparison's ablation (development half of the development models),
    its default row the comparison's to the last digit; of the rules the decision rule adopts and that keep every
    model's size, the one with the largest mean is pair_roles.PENDING_ADOPTION; a rule that makes a model larger is
    refused, and the no-larger rules never are."""
    data, cmp = BOOK["pair_roles"], BOOK["compare"]
    assert data["settings"]["models"] == compare.DEVELOPMENT_MODELS and data["settings"]["split"] == "dev"
    assert data["settings"]["bits"] == cmp["settings"]["ablation_bits"]
    for r in data["results"]["ablation"]:
        if r["variant"] == "dfmpc+":
            for field in ("top1", "top5", "agreement_with_fp32", "size_mb"):
                assert r[field] == compare.figure(cmp, r["model"], r["bits"], variant="dfmpc+", field=field), r
    decided = {d["variant"]: d for d in pair_roles.decisions(data)}
    assert set(decided) == set(pair_roles.VARIANTS.values()) - {"dfmpc+"}
    assert {pair_roles.chosen(data)} == set(pair_roles.PENDING_ADOPTION)
    assert all(d["mean_change"] <= decided[pair_roles.chosen(data)]["mean_change"]
               for d in decided.values() if d["adopted"] and not d["refused"])
    no_larger = "least-error layer of each pair low, no larger model"
    for rule in ("least-error", "least-error-budget"):
        assert decided[pair_roles.VARIANTS[rule]]["size_change"] <= 0 and decided[pair_roles.VARIANTS[rule]]["refused"] is None
    grown = copy.deepcopy(data)  # the same rows with one cell's model larger: refused whatever its accuracy
    next(r for r in grown["results"]["ablation"] if r["variant"] == no_larger)["size_mb"] += 1.0
    assert next(d for d in pair_roles.decisions(grown) if d["variant"] == no_larger)["refused"] == pair_roles.LARGER


def test_the_books_adoption_run_combines_every_pending_choice_and_chooses_by_the_rule():
    """book/data/adoption.json: every combination of the pending choices of the comparison and of the pair roles
    on the cells of the comparison's ablation, its default row the comparison's to the last digit; what it chooses
    is adoption.ADOPT; a combination whose low-layer rule makes a model larger than the same combination in the
    paper's order is refused, and one the rule passes with a larger mean is chosen instead."""
    from dfmpc.experiments import adoption

    data, cmp = BOOK["adoption"], BOOK["compare"]
    assert data["settings"]["models"] == compare.DEVELOPMENT_MODELS and data["settings"]["split"] == "dev"
    assert data["settings"]["bits"] == cmp["settings"]["ablation_bits"]
    assert set(data["results"]["pending"]) == set(compare.PENDING_ADOPTION) | set(pair_roles.PENDING_ADOPTION)
    assert data["results"]["combinations"] == adoption.combinations()
    assert len(data["results"]["ablation"]) == 2 * 3 * 2 ** len(data["results"]["pending"])
    for r in data["results"]["ablation"]:
        if r["variant"] == "dfmpc+":
            for field in ("top1", "top5", "agreement_with_fp32", "size_mb"):
                assert r[field] == compare.figure(cmp, r["model"], r["bits"], variant="dfmpc+", field=field), r
    assert adoption.chosen(data) == adoption.ADOPT
    decided = {d["variant"]: d for d in adoption.decisions(data)}
    best = " + ".join(adoption.ADOPT)
    assert decided[best]["adopted"] and not decided[best]["refused"]
    assert all(d["mean_change"] <= decided[best]["mean_change"] for d in decided.values()
               if d["adopted"] and not d["refused"])
    # a larger model refuses the combination whatever its accuracy; a better one is chosen
    budget = pair_roles.VARIANTS["least-error-budget"]
    changed = copy.deepcopy(data)
    for r in changed["results"]["ablation"]:
        if r["variant"] == budget:
            r["top1"] = compare.figure(data, r["model"], r["bits"], variant="dfmpc+") + 5.0
    assert adoption.chosen(changed) == [budget]
    next(r for r in changed["results"]["ablation"] if r["variant"] == budget)["size_mb"] += 1.0
    assert next(d for d in adoption.decisions(changed) if d["variant"] == budget)["refused"] == pair_roles.LARGER
    assert adoption.chosen(changed) == adoption.ADOPT


def test_readme_table_quotes_the_books_comparison():
    """Every top-1 figure in the README's table is the one in book/data/compare.json, with SQuant and OCS at the
    better of that and book/data/authors_data_free.json; every bit width of it is there, the "best data-free
    baseline" column names the best of the data-free baselines (not original, dfmpc, dfmpc+ or the synthetic-data
    zeroq) and says where that is the authors' setting, and the bold figure is the best of its row."""
    from dfmpc.experiments import authors_data_free

    data = BOOK["compare"]
    strongest = authors_data_free.strongest(data, BOOK["authors_data_free"])  # the baseline column's figures
    names = {"ResNet-20": "resnet20_cifar10_a", "ResNet-56": "resnet56_cifar10_a", "EfficientNet-Lite0": "efficientnet_lite0",
             "EfficientNet-Lite2": "efficientnet_lite2"}
    others = [m for m, cls in METHODS.items() if m not in ("original", "dfmpc", "dfmpc+") and not cls.uses_synthetic_data]
    seen = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("| ") or "---" in line or "model (fp32)" in line:
            continue
        raw = [c.strip() for c in line.strip().strip("|").split("|")]
        cells = [c.strip("*") for c in raw]
        if cells[0]:
            model = names[cells[0].split(",")[0]]
            fp32 = float(cells[0].rsplit("(", 1)[1].rstrip(")"))
            assert fp32 == round(next(e["fp32"]["top1"] for e in data["results"]["models"] if e["model"] == model), 2)
        bits = cells[1]
        best_value, best_label = cells[3].split(" (")
        best_label = best_label.rstrip(")")
        best_method = best_label.split(",")[0]
        quoted = (("original", cells[2]), (best_method, best_value.strip("*")), ("zeroq", cells[4]),
                  ("dfmpc", cells[5]), ("dfmpc+", cells[6]))
        for method, value in quoted:
            assert float(value) == round(compare.figure(strongest, model, bits, method), 2), (model, bits, method)
        assert best_method == max(others, key=lambda m: compare.figure(strongest, model, bits, m))
        best_row = next(r for r in strongest["results"]["rows"]
                        if (r["model"], r["bits"], r["method"]) == (model, bits, best_method))
        assert best_label == authors_data_free.method_label(best_row), (model, bits)  # "authors' grid" where it is theirs
        top = max(float(v.strip("*")) for _, v in quoted)
        bold = [float(c.split()[0].strip("*")) for c in raw[2:] if c.startswith("**")]
        assert bold and all(b == top for b in bold), (model, bits, bold, top)
        seen.append((model, bits))
    labelled = [e["model"] for e in data["results"]["models"] if e["metric"] == "top1"]  # agreement-only not in it
    assert seen == [(m, b) for m in labelled for b in data["settings"]["bits"]]


def test_readme_coverage_sentence_quotes_the_books_coverage():
    """The README's warning about dfmpc+ at 2/6 on random weights says what book/data/coverage.json measured."""
    res = BOOK["coverage"]["results"]
    names = [e["model"] for e in res["models"]]
    sqnr = {(r["model"], r["bits"], r["method"]): r["sqnr_db"] for r in res["rows"]}

    def count(bits, pick, method):
        return sum(pick(res["methods"], key=lambda m: sqnr[(n, bits, m)]) == method for n in names)

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert (f"`dfmpc+` is the least faithful method on {count('2/6', min, 'dfmpc+')} of the {len(names)} "
            "random-weight models") in readme
    assert (f"at 3/6 it is the most faithful on {count('3/6', max, 'dfmpc+')} and OMSE on "
            f"{count('3/6', max, 'omse')}.") in readme
    words = {6: "six", 9: "nine"}  # the file holds fewer methods than the library has, and the README says how many
    assert f"for {words[len(res['methods'])]} of the {words[len(METHODS)]} methods" in readme


def test_standard_error_is_the_binomial_formula():
    """sqrt(p (1 - p) / n) in points: 50 % on 100 images is 5 points, 10 % on 10,000 is 0.3 (without the root: 0.25,
    0.0009)."""
    assert compare.standard_error(50.0, 100) == pytest.approx(5.0)
    assert compare.standard_error(10.0, 10_000) == pytest.approx(0.3)
    assert compare.standard_error(None, 10) is None and compare.standard_error(50.0, 0) is None


def test_relative_paths_name_files_from_the_data_folder(tmp_path):
    from dfmpc.experiments.provenance import relative_paths

    shared = tmp_path / "shared"
    obj = {"path": str(shared / "data" / "cifar10"), "list": [f"{shared}/w.th", "random"], "n": 3,
           "weights": "/opt/venv/lib/python3.11/site-packages/pkg/models/w.pth"}
    assert relative_paths(obj, shared) == {"path": "$DFMPC_SHARED/data/cifar10", "list": ["$DFMPC_SHARED/w.th", "random"],
                                           "n": 3, "weights": "site-packages/pkg/models/w.pth"}


def test_a_result_records_the_commit_of_its_code_and_whether_the_tree_was_dirty(tmp_path):
    """code_version reads git: the commit, dirty for a changed tracked file, not for a changed result file."""
    import shutil
    import subprocess

    from dfmpc.experiments.provenance import code_version

    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "book" / "data").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "book" / "data" / "r.json").write_text("{}\n")
    git("add", ".")
    git("commit", "-qm", "one")
    clean = code_version.__wrapped__(str(tmp_path))
    assert clean == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "book" / "data" / "r.json").write_text('{"new": 1}\n')  # a result written by a run
    assert code_version.__wrapped__(str(tmp_path))["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")  # the code changed
    assert code_version.__wrapped__(str(tmp_path)) == {"commit": clean["commit"], "dirty": True}
    assert code_version.__wrapped__(str(tmp_path / "book")) == {"commit": None, "dirty": None}  # not the root
    assert code_version.__wrapped__(str(tmp_path.parent / "nowhere")) == {"commit": None, "dirty": None}


def test_means_measured_on_distilled_images_give_each_bn_the_full_precision_output_mean():
    """synthetic_means.correct_means: after it, on the images it measured, every corrected BatchNorm's output has the
    per-channel mean of the full-precision model's, whatever the quantization did before it (a check that fails
    with the correction off, and with c left out of it)."""
    from dfmpc.cifar_resnet import CifarResNet
    from dfmpc.experiments.synthetic_means import correct_means
    from dfmpc.propagation import following_batch_norms

    torch.manual_seed(0)
    model = _trained_looking_resnet()
    x = torch.randn(16, 3, 32, 32)
    qmodel, report = dfmpc.quantize(model, "2/6", "dfmpc+", mean_correction=False)
    after = following_batch_norms(model)
    bns = [after[n] for n in report.quantized if n in after]

    def bn_output_means(net):
        found, modules = {}, dict(net.named_modules())
        def keep(module, inputs, output, name):  # returns None: a hook's result would replace the output
            found.setdefault(name, output.double().mean(dim=(0, 2, 3)))

        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: keep(m, i, o, n)) for n in bns]
        with torch.no_grad():
            net.eval()(x)
        for h in handles:
            h.remove()
        return found

    fp = bn_output_means(model)
    gap = lambda net: max(float((bn_output_means(net)[n] - fp[n]).abs().max()) for n in bns)  # noqa: E731
    assert gap(qmodel) > 0.05  # quantized without the correction: the means are off
    correct_means(qmodel, model, bns, x)
    assert gap(qmodel) < 1e-5
    assert isinstance(model, CifarResNet) and len(bns) == 19  # every convolution of ResNet-20 but the first is quantized
