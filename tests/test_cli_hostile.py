"""The command line under hostile input: unknown names, non-finite and huge numbers, corrupt images, and a fuzz test
that feeds random flags and values to the parser and to every check that runs before any work: exit 0 or 2, at
most two lines on stderr, never a traceback."""
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dfmpc.cli import main
from dfmpc.data import load_dataset


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,needle", [
    (["quantize", "--model", "efficientnet_lite9"], "unknown model 'efficientnet_lite9'; did you mean efficientnet_lite"),
    (["quantize", "--model", "resnet600002_cifar10_a"], "unknown model 'resnet600002_cifar10_a'"),
    (["quantize", "--model", "resnet20_cifar10_a", "--lambda1", "inf"], "--lambda1 must be a finite non-negative"),
    (["quantize", "--model", "resnet20_cifar10_a", "--lambda2", "1e400"], "--lambda2 must be a finite non-negative"),
    (["quantize", "--model", "resnet20_cifar10_a", "--lambda1", "nan"], "--lambda1 must be a finite non-negative"),
    (["quantize", "--model", "resnet20_cifar10_a", "--seed", "-1"], "--seed must be from 0"),
    (["quantize", "--model", "resnet20_cifar10_a", "--seed", "99999999999999999999"], "--seed must be from 0"),
    (["quantize", "--model", "resnet20_cifar10_a", "--batch-size", "999999999999"], "--batch-size must be at most"),
    (["quantize", "--model", "resnet20_cifar10_a", "--threads", "100000"], "--threads must be at most"),
    (["quantize", "--model", "resnet20_cifar10_a", "--images", "99999999999999"], "--images takes a positive number"),
    (["benchmark", "--models", "resnet18,tv_vit_h_14"], "unknown model 'tv_vit_h_14'"),
    (["experiments", "fig3", "--set", "images=inf"], "takes a number"),
    (["experiments", "fig5", "--set", "span=inf"], "takes a finite number"),
    (["experiments", "fig4", "--jobs", "1000"], "--jobs must be at most"),
])
def test_hostile_flags_end_in_one_line(capsys, argv, needle, monkeypatch):
    import dfmpc.experiments as experiments
    import dfmpc.models

    monkeypatch.setattr(dfmpc.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(experiments, "run_experiments", lambda *a, **k: pytest.fail("an experiment ran"))
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_non_finite_set_values_are_refused_before_any_work(capsys, monkeypatch):
    import dfmpc.experiments as experiments
    from dfmpc.experiments.runner import settings_for

    float_key = next(k for k, v in settings_for("fig5").items() if isinstance(v, float) and not isinstance(v, bool))
    monkeypatch.setattr(experiments, "run_experiments", lambda *a, **k: pytest.fail("an experiment ran"))
    for value in ("inf", "-inf", "nan", "1e400"):
        code, _, err = run(capsys, "experiments", "fig5", "--set", f"{float_key}={value}")
        assert code == 2 and err.count("\n") == 1 and "finite" in err, err


def _cifar_folder(root, corrupt: bool):
    """Ten class folders of two small images each, and one truncated JPEG if ``corrupt``."""
    for c in range(10):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (25 * c, 10 * i, 128)).save(folder / f"{i}.png")
    if corrupt:
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, "JPEG")
        (root / "class3" / "broken.jpg").write_bytes(buffer.getvalue()[:200])  # cut inside the image data
    return root


def test_a_corrupt_image_names_its_file_or_is_skipped_and_counted(capsys, tmp_path):
    folder = _cifar_folder(tmp_path / "data", corrupt=True)
    argv = ["quantize", "--model", "resnet20_cifar10_a", "--random-weights", "--data-dir", str(folder),
            "--method", "original", "--no-progress", "--images", "all"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and "broken.jpg" in err and "--skip-unreadable" in err, err
    code, out, err = run(capsys, *argv, "--skip-unreadable")
    assert code == 0, err
    assert "20 images from" in out and "1 unreadable images skipped" in out and "broken.jpg" in out


def test_load_dataset_says_which_images_it_skipped(tmp_path):
    folder = _cifar_folder(tmp_path / "data", corrupt=True)
    data = load_dataset("cifar10", folder, cache=True, progress=False, skip_unreadable=True)
    assert len(data) == 20 and [p.split("/")[-1] for p in data.skipped] == ["broken.jpg"]
    clean = load_dataset("cifar10", _cifar_folder(tmp_path / "clean", corrupt=False), cache=True, progress=False)
    assert len(clean) == 20 and clean.skipped == []


# ------------------------------------------------------------------------------------------- fuzzing the flags

class WorkStarted(Exception):
    """Raised where the real work would begin: every check before it passed."""


def _stop(*args, **kwargs):
    raise WorkStarted


_NUMBERS = st.sampled_from(["0", "1", "-1", "2", "7", "inf", "-inf", "nan", "1e400", "-0", "0.5", "1e-300",
                            "9" * 30, "0x10", "", " ", "all", "none", "true"])
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_VALUES = {
    "--model": st.sampled_from(["resnet20_cifar10_a", "resnet600002_cifar10_a", "efficientnet_lite9", "tv_vit_h_14",
                                "", "RESNET20_CIFAR10_A", "../etc/passwd"]) | _TEXT,
    "--bits": st.sampled_from(["2/6", "2/9999", "9/9", "6/2", "2/6,3/6", "x", "", "-2/6", "2/6/8"]) | _TEXT,
    "--method": st.sampled_from(["all", "dfmpc+", "zeroq", "", " , ", "dfmpc,magic"]) | _TEXT,
    "--lambda1": _NUMBERS | _TEXT, "--lambda2": _NUMBERS, "--images": _NUMBERS, "--seed": _NUMBERS,
    "--batch-size": _NUMBERS, "--threads": _NUMBERS, "--repeat": _NUMBERS, "--jobs": _NUMBERS,
    "--dataset": st.sampled_from(["cifar10", "cifar100", "imagenet", "svhn", ""]),
    "--split": st.sampled_from(["dev", "test", "all", "train"]), "--granularity": st.sampled_from(["tensor", "row"]),
    "--device": st.sampled_from(["cpu", "cuda", "cuda:7", "foo", "", "mps"]),
    "--weights": st.sampled_from(["/no/such.th", "/tmp", "/dev/null", "/etc/hostname"]),
    "--data-dir": st.sampled_from(["/no/such/dir", "cifar10=/tmp", "svhn=/tmp", "=", "/etc/hostname"]),
    "--json": st.sampled_from(["out.json", "/proc/x.json", ".", "/etc", ""]),
    "--save": st.sampled_from(["q.dfmpc", "/proc/q.dfmpc", "."]),
    "--save-method": st.sampled_from(["dfmpc", "omse", "dfmpc,original"]),
    "--out": st.sampled_from(["results", "/proc/x", "/etc/hostname"]),
    "--set": st.sampled_from(["images=inf", "images=1e400", "nothing", "=1", "models=x", "images=-5"]) | _TEXT,
    "--models": st.sampled_from(["resnet18", ",", "tv_vit_h_14", "resnet600002_cifar10_a"]) | _TEXT,
}
_FLAGS = {"quantize": ["--model", "--bits", "--method", "--lambda1", "--lambda2", "--images", "--seed", "--batch-size",
                       "--threads", "--dataset", "--split", "--granularity", "--device", "--weights", "--data-dir",
                       "--json", "--save", "--save-method", "--random-weights", "--skip-unreadable", "--no-progress"],
          "benchmark": ["--models", "--bits", "--repeat", "--device", "--threads", "--json", "--startup"],
          "experiments": ["--set", "--images", "--seed", "--batch-size", "--threads", "--jobs", "--device", "--out",
                          "--data-dir", "--quick", "--full", "--book", "--list", "--rerun-method"],
          "models": [], "methods": []}


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_the_command_line(capsys, monkeypatch, tmp_path, data):
    import dfmpc.cli_quantize
    import dfmpc.experiments
    import dfmpc.experiments.timing

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dfmpc.cli_quantize, "_model_and_data", _stop)
    monkeypatch.setattr(dfmpc.experiments, "run_experiments", _stop)
    monkeypatch.setattr(dfmpc.experiments.timing, "benchmark", _stop)
    monkeypatch.setattr(dfmpc.experiments.timing, "startup_seconds", _stop)
    command = data.draw(st.sampled_from(sorted(_FLAGS)), label="command")
    argv = [command]
    if command == "experiments":
        argv += data.draw(st.lists(st.sampled_from(["fig4", "table1", "compare", "nope"]), max_size=2), label="names")
    if command == "quantize" and data.draw(st.integers(0, 4), label="with model"):  # mostly: one bad value at a time
        argv += ["--model", "resnet20_cifar10_a"]
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3, 0]), label="flags")):
        flag = data.draw(st.sampled_from(_FLAGS[command] + ["--bogus"]) if _FLAGS[command] else st.just("--bogus"))
        argv.append(flag)
        if flag in _VALUES:
            argv.append(data.draw(_VALUES[flag], label=flag))
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --help, --version, or a malformed argument
        code = e.code
    except WorkStarted:  # every check passed: the work would start here
        code = 0
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err)
    assert err.count("\n") <= 2 and "Traceback" not in err, (argv, err)
    if code == 2:
        assert err.startswith("dfmpc") and err.strip(), (argv, err)
