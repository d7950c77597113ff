"""The command line: what it says about the data and weights, the JSON schema, the saved model, the listings,
a start-up without torch, and one-line errors with exit status 2 for every documented edge."""
import json
import subprocess
import sys
import urllib.error

import pytest
import torch

import dfmpc
from dfmpc.catalog import METHOD_DESCRIPTIONS, MODELS
from dfmpc.cli import main
from dfmpc.experiments.provenance import code_version
from dfmpc.methods import METHODS
from dfmpc.models import load_model

WEIGHTS20 = "data/cifar10/weights/he2016_option_a/resnet20-12fca82f.th"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _row(out: str, name: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [name])


# --------------------------------------------------------------------------- listings

def test_models_table_says_what_is_here(capsys, monkeypatch, tmp_path, shared):
    monkeypatch.setenv("DFMPC_SHARED", str(shared))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no downloaded CIFAR-100 and no pytorchcv weights
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"")
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert out.split("\n")[0].split() == ["model", "data", "set", "source", "input", "parameters", "fp32", "MB",
                                          "weights", "data"]
    assert _row(out, "resnet20_cifar10_a") == ["resnet20_cifar10_a", "cifar10", "he2016_option_a", "32", "269,722",
                                               "1.03", "offline", "copy", "offline", "copy", "(JPEG)"]
    assert " ".join(_row(out, "chenyaofo_resnet56_cifar100")[-4:]) == "offline copy needs download"
    assert " ".join(_row(out, "resnet18")[-5:-3]) == "needs download"
    assert " ".join(_row(out, "tv_resnet18")[-4:]) == "cached offline copy (subset)"
    assert " ".join(_row(out, "resnet32_cifar10_a")[-5:]) == "needs download offline copy (JPEG)"
    monkeypatch.setenv("DFMPC_SHARED", "none")  # the offline copies are gone: the table follows
    code, out, _ = run(capsys, "models")
    assert " ".join(_row(out, "resnet20_cifar10_a")[-4:]) == "needs download needs download"
    assert " ".join(_row(out, "resnet50")[-2:]) == "needs --data-dir"


def test_the_static_tables_match_the_code():
    assert METHOD_DESCRIPTIONS == {name: cls.description for name, cls in METHODS.items()}
    assert list(MODELS) == sorted(MODELS)
    # parameter counts, data sets and sizes: checked against each built model in test_models_data.py
    spec = load_model("resnet20_cifar10_a", pretrained=False)
    assert MODELS["resnet20_cifar10_a"].parameters == sum(p.numel() for p in spec[0].parameters())


def test_listings_answer_without_importing_torch():
    code = ("import sys\nfrom dfmpc.cli import main\n"
            "assert main(['models']) == 0 and main(['methods']) == 0\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "import dfmpc\nassert dfmpc.DfmpcError and 'quantize' in dir(dfmpc)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'pytorchcv', 'numpy'))\n"
            "print(heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_imports_its_names_on_first_use():
    assert set(dfmpc.__all__) <= set(dir(dfmpc))
    for name in dfmpc.__all__:
        assert getattr(dfmpc, name) is not None
    assert dfmpc.METHODS is METHODS and dfmpc.experiments.EXPERIMENTS
    with pytest.raises(AttributeError):
        dfmpc.no_such_name  # noqa: B018


# --------------------------------------------------------------------------- quantize

def test_quantize_explains_itself_and_saves_the_most_accurate(capsys, tmp_path, shared):
    out_json, saved = tmp_path / "r.json", tmp_path / "out" / "q.dfmpc"
    data_dir = shared / "data/cifar10/test_jpeg"
    code, out, _ = run(capsys, "quantize", "--model", "resnet20_cifar10_a", "--weights", str(shared / WEIGHTS20),
                       "--dataset", "cifar10", "--data-dir", str(data_dir), "--bits", "2/6,4/6",
                       "--lambda1", "0,0.5", "--images", "200", "--no-progress", "--json", str(out_json),
                       "--save", str(saved))
    assert code == 0
    data = json.loads(out_json.read_text())
    assert {"model", "weights", "dataset", "data_dir", "images", "data", "cold_quantize_seconds", "results"} <= set(data)
    assert data["images"] == 200 and data["model"] == "resnet20_cifar10_a"
    assert data["commit"] == code_version()["commit"] and len(data["commit"]) == 40  # which code made it
    rows = data["results"]
    assert [r["method"] for r in rows] == ["fp32"] + ["original", "dfmpc", "dfmpc", "dfmpc+"] * 2
    for r in rows:
        assert set(r) == {"method", "bits", "lambda1", "lambda2", "size_mb", "top1", "top5", "agreement", "quantize_seconds"}
        assert 0 <= r["agreement"] <= 100
        assert 0 <= r["top1"] <= r["top5"] <= 100
    assert rows[0]["top1"] > 60  # full precision on real images (81 % on all 10,000)
    assert rows[2]["lambda1"] == 0 and rows[3]["lambda1"] == 0.5
    assert rows[1]["size_mb"] < rows[0]["size_mb"] / 4
    assert data["warmup"]["method"] == "original" and data["cold_quantize_seconds"] > 0
    # what was measured on what, in words
    assert str(shared / WEIGHTS20) in out and str(data_dir) in out and "out of 10,000 images" in out
    assert "JPEG copy: relative comparisons only" in out and data["data"]["offline_copy"] is True
    assert "top-1 %" in out and "dfmpc+" in out and "warm-up" in out
    # the saved model is the most accurate one measured, and loads back bit-identical to a fresh quantization
    best = max(rows[1:], key=lambda r: r["top1"])
    assert data["saved"]["method"] == best["method"] and data["saved"]["bits"] == best["bits"]
    assert f"saved {best['method']} {best['bits']}" in out and "most accurate of the 8" in out
    info = dfmpc.packed.read_info(saved)
    assert (info["model"], info["method"], info["bits"]) == ("resnet20_cifar10_a", best["method"], best["bits"])
    assert info["provenance"]["top1"] == round(best["top1"], 2) and info["provenance"]["weights"] == WEIGHTS20.split("/")[-1]
    model, _ = load_model("resnet20_cifar10_a", weights=shared / WEIGHTS20)
    settings = {k: best[k] for k in ("lambda1", "lambda2") if best[k] is not None}
    qmodel, report = dfmpc.quantize(model, best["bits"], method=best["method"], **settings)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(dfmpc.load_quantized(saved)(x), qmodel(x))
    assert data["saved"]["bytes"] == saved.stat().st_size
    assert abs(saved.stat().st_size / 2**20 / report.size_mb - 1) < 0.05


def test_save_method_picks_the_model_to_save(capsys, tmp_path, shared):
    saved = tmp_path / "q.dfmpc"
    code, out, _ = run(capsys, "quantize", "--model", "resnet20_cifar10_a", "--weights", str(shared / WEIGHTS20),
                       "--method", "original,dfmpc", "--images", "32", "--no-progress", "--save", str(saved),
                       "--save-method", "original")
    assert code == 0 and "saved original 2/6" in out and "the only original model measured" in out
    assert dfmpc.packed.read_info(saved)["method"] == "original"


def test_benchmark_times_quantization_and_records_the_code(capsys, tmp_path, shared):
    out_json = tmp_path / "b.json"
    code, out, _ = run(capsys, "benchmark", "--models", "resnet20_cifar10_a", "--repeat", "2", "--threads", "1",
                       "--json", str(out_json))
    data = json.loads(out_json.read_text())
    assert code == 0 and "median s" in out and "resnet20_cifar10_a" in out
    (row,) = data["rows"]
    assert row["repeat"] == 2 and row["threads"] == 1 and row["pairs"] == 9 and row["parameters"] == 269_722
    assert 0 < row["min_s"] <= row["median_s"] < 30  # 0.14 s measured here on one thread
    assert data["commit"] == code_version()["commit"] and data["torch"] == torch.__version__


def test_split_evaluates_one_fixed_half_and_says_so(capsys, tmp_path, shared):
    out_json = tmp_path / "r.json"
    code, out, _ = run(capsys, "quantize", "--model", "resnet20_cifar10_a", "--weights", str(shared / WEIGHTS20),
                       "--method", "original", "--split", "test", "--images", "32", "--no-progress", "--json", str(out_json))
    record = json.loads(out_json.read_text())["data"]
    assert code == 0 and "random subset of the test half (odd positions), seed 0, out of 5,000 images" in out
    assert record["split"] == "test" and record["available"] == 5000 and record["images"] == 32


def test_without_meaningful_labels_the_saved_model_is_the_most_faithful(capsys, tmp_path, shared):
    saved = tmp_path / "q.dfmpc"
    code, out, _ = run(capsys, "quantize", "--model", "resnet20_cifar10_a", "--random-weights", "--method",
                       "original,dfmpc+", "--images", "32", "--no-progress", "--save", str(saved))
    assert code == 0 and "most faithful to fp32 of the 2" in out and "agreement with fp32" in out
    assert dfmpc.packed.read_info(saved)["provenance"]["weights"].startswith("random")


@pytest.mark.parametrize("argv,needle", [
    (["quantize", "--model", "no_such_net"], "unknown model"),
    (["quantize", "--model", "resnet20_cifar10_a", "--bits", "1/6"], "out of range"),
    (["quantize", "--model", "resnet20_cifar10_a", "--bits", "6/2"], "out of range"),
    (["quantize", "--model", "resnet20_cifar10_a", "--bits", "2-6"], "LOW/HIGH"),
    (["quantize", "--model", "resnet20_cifar10_a", "--lambda1", "-0.5"], "lambda1"),
    (["quantize", "--model", "resnet20_cifar10_a", "--lambda2", "-1"], "lambda2"),
    (["quantize", "--model", "resnet20_cifar10_a", "--weights", "/no/such/file.th"], "does not exist"),
    (["quantize", "--model", "resnet20_cifar10_a", "--weights", "/tmp"], "is a folder"),
    (["quantize", "--model", "resnet20_cifar10_a", "--data-dir", "/no/such/dir"], "is not a folder"),
    (["quantize", "--model", "resnet20_cifar10_a", "--method", ""], "names no method"),
    (["quantize", "--model", "resnet20_cifar10_a", "--method", " , "], "names no method"),
    (["quantize", "--model", "resnet20_cifar10_a", "--method", "magic"], "unknown method"),
    (["quantize", "--model", "resnet20_cifar10_a", "--images", "0"], "--images takes a positive number"),
    (["quantize", "--model", "resnet20_cifar10_a", "--device", "foo"], "unknown device"),
    (["quantize", "--model", "resnet20_cifar10_a", "--batch-size", "0"], "--batch-size"),
    (["quantize", "--model", "resnet20_cifar10_a", "--threads", "0"], "--threads"),
    (["quantize", "--model", "resnet20_cifar10_a", "--json", "/tmp"], "is a folder"),
    (["quantize", "--model", "resnet20_cifar10_a", "--json", "/proc/x.json"], "cannot be written"),
    (["quantize", "--model", "resnet20_cifar10_a", "--save", "/proc/x.pt"], "cannot be written"),
    (["quantize", "--model", "resnet20_cifar10_a", "--save", "/tmp"], "is a folder"),
    (["quantize", "--model", "resnet20_cifar10_a", "--save-method", "dfmpc"], "add --save"),
    (["quantize", "--model", "resnet20_cifar10_a", "--save", "/tmp/x.dfmpc", "--save-method", "omse"], "not among"),
    (["quantize", "--model", "resnet20_cifar10_a", "--save", "/tmp/x.dfmpc", "--save-method", "dfmpc,original"],
     "one method"),
    (["quantize", "--model", "resnet20_cifar10_a", "--dataset", "svhn"], "unknown dataset"),
    (["benchmark", "--repeat", "0"], "--repeat"),
    (["benchmark", "--models", ","], "names no model"),
    (["benchmark", "--device", "foo"], "unknown device"),
    (["benchmark", "--bits", "9/9"], "out of range"),
    (["benchmark", "--json", "/proc/x.json"], "cannot be written"),
    (["experiments", "fig4", "--out", "/proc/x"], "cannot be written"),
    (["experiments", "fig4", "--out", "/etc/hostname"], "is a file"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle, shared, monkeypatch):
    monkeypatch.setenv("DFMPC_SHARED", str(shared))
    # nothing is loaded before the arguments are checked: output paths fail before any evaluation
    import dfmpc.experiments.timing as timing
    import dfmpc.models

    for module in (dfmpc.models, timing):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"), raising=False)
    if "no_such_net" in argv:
        monkeypatch.undo()
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dfmpc: error:") and needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["quantize"], "--model"),
    (["quantize", "--model", "resnet20_cifar10_a", "--batch-size", "many"], "invalid int value"),
    (["quantize", "--model", "resnet20_cifar10_a", "--granularity", "row"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_malformed_arguments_are_one_line_too(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err and "--help" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys):
    code, _, err = run(capsys, "quantize", "--model", "resnet20_cifar10_a", "--device", "cuda")
    assert code == 2 and err.count("\n") == 1 and "no CUDA device" in err


def test_weights_that_do_not_fit(capsys, shared):
    wrong = shared / "data/cifar100/weights/chenyaofo/cifar100_resnet56-f2eff4c8.pt"
    code, _, err = run(capsys, "quantize", "--model", "resnet20_cifar10_a", "--weights", str(wrong))
    assert code == 2 and "does not fit" in err


def test_offline_downloads_end_in_one_complete_line(capsys, monkeypatch, tmp_path):
    """requests' offline message runs to hundreds of characters of host and path; the line must not be cut mid-URL."""
    import pytorchcv.models.common.model_store as store
    import torchvision.datasets

    long = ("HTTPSConnectionPool(host='github.com', port=443): Max retries exceeded with url: /osmr/imgclsmob/releases/"
            "download/v0.0.2/resnet18-0952-0817d058.pth.zip (Caused by NameResolutionError(...))")

    class ConnectionError(OSError):
        pass

    def offline(*args, **kwargs):
        raise ConnectionError(long)

    monkeypatch.setattr(store, "download_model", offline)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = run(capsys, "quantize", "--model", "resnet18", "--images", "8")
    assert code == 2 and err.count("\n") == 1 and "url:" not in err and "--weights PATH" in err
    assert err.rstrip().endswith("random weights")

    def no_cifar100(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", no_cifar100)
    code, _, err = run(capsys, "quantize", "--model", "chenyaofo_resnet56_cifar100", "--images", "8")
    assert code == 2 and err.count("\n") == 1 and "cifar100" in err and "--data-dir" in err
