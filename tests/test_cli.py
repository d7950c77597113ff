"""The command line: JSON schema, the table, and one-line errors with exit status 2."""
import json

import pytest

from dfmpc.cli import main

WEIGHTS20 = "data/cifar10/weights/he2016_option_a/resnet20-12fca82f.th"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_and_methods_list(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "resnet56_cifar10_a" in out.split() and "resnet20_cifar10_a" in out.split()
    code, out, _ = run(capsys, "methods")
    assert code == 0 and out.startswith("original") and "dfmpc" in out


def test_quantize_writes_the_documented_json(capsys, tmp_path, shared):
    out_json = tmp_path / "r.json"
    code, out, _ = run(capsys, "quantize", "--model", "resnet20_cifar10_a", "--weights", str(shared / WEIGHTS20),
                       "--dataset", "cifar10", "--data-dir", str(shared / "data/cifar10/test_jpeg"), "--bits", "2/6,4/6",
                       "--lambda1", "0,0.5", "--images", "200", "--no-progress", "--json", str(out_json),
                       "--save", str(tmp_path / "q.pt"))
    assert code == 0
    data = json.loads(out_json.read_text())
    assert {"model", "dataset", "data_dir", "images", "results"} <= set(data)
    assert data["images"] == 200 and data["model"] == "resnet20_cifar10_a"
    rows = data["results"]
    assert [r["method"] for r in rows] == ["fp32", "original", "dfmpc", "dfmpc", "original", "dfmpc", "dfmpc"]
    for r in rows:
        assert set(r) == {"method", "bits", "lambda1", "lambda2", "size_mb", "top1", "top5", "agreement", "quantize_seconds"}
        assert 0 <= r["agreement"] <= 100
        assert 0 <= r["top1"] <= r["top5"] <= 100
    assert rows[0]["top1"] > 60  # full precision on real images (81 % on all 10,000)
    assert rows[2]["lambda1"] == 0 and rows[3]["lambda1"] == 0.5
    assert rows[1]["size_mb"] < rows[0]["size_mb"] / 4
    assert "top-1 %" in out and "dfmpc" in out
    import torch

    saved = torch.load(tmp_path / "q.pt", weights_only=True)
    assert saved["method"] == "dfmpc" and saved["bits"] == "2/6"


@pytest.mark.parametrize("argv,needle", [
    (["quantize", "--model", "no_such_net"], "unknown model"),
    (["quantize", "--model", "resnet20_cifar10_a", "--bits", "1/6"], "out of range"),
    (["quantize", "--model", "resnet20_cifar10_a", "--bits", "6/2"], "out of range"),
    (["quantize", "--model", "resnet20_cifar10_a", "--bits", "2-6"], "LOW/HIGH"),
    (["quantize", "--model", "resnet20_cifar10_a", "--lambda1", "-0.5"], "lambda1"),
    (["quantize", "--model", "resnet20_cifar10_a", "--lambda2", "-1"], "lambda2"),
    (["quantize", "--model", "resnet20_cifar10_a", "--weights", "/no/such/file.th"], "does not exist"),
    (["quantize", "--model", "resnet20_cifar10_a", "--data-dir", "/no/such/dir"], "is not a folder"),
    (["quantize", "--model", "resnet20_cifar10_a", "--method", ""], "names no method"),
    (["quantize", "--model", "resnet20_cifar10_a", "--images", "0"], "--images takes a positive number"),
    (["quantize", "--model", "resnet20_cifar10_a", "--device", "foo"], "unknown device"),
    (["quantize", "--model", "resnet20_cifar10_a", "--batch-size", "0"], "--batch-size"),
    (["quantize", "--model", "resnet20_cifar10_a", "--json", "/tmp"], "is a folder"),
    (["quantize", "--model", "resnet20_cifar10_a", "--dataset", "svhn"], "unknown dataset"),
    (["quantize", "--model", "resnet20_cifar10_a", "--method", "magic"], "unknown method"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle, shared, monkeypatch):
    monkeypatch.setenv("DFMPC_SHARED", str(shared))
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dfmpc: error:") and needle in err
    assert "Traceback" not in err


def test_weights_that_do_not_fit(capsys, shared):
    wrong = shared / "data/cifar100/weights/chenyaofo/cifar100_resnet56-f2eff4c8.pt"
    code, _, err = run(capsys, "quantize", "--model", "resnet20_cifar10_a", "--weights", str(wrong))
    assert code == 2 and "does not fit" in err
