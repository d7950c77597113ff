"""``dfmpc experiments --rerun-method``: one method's rows rerun, the others kept, and where each came from."""
import copy
import json

import pytest

from dfmpc import experiments
from dfmpc.cli import main
from dfmpc.errors import DfmpcError
from dfmpc.experiments import book
from dfmpc.experiments.merge import merge_method_rows, row_methods, row_versions


def _result(rows, fp32=80.0, commit="a" * 40, settings=None):
    return {"schema": 2, "experiment": "x", "title": "X", "preset": "full", "command": f"dfmpc experiments x {commit[:1]}",
            "settings": settings or {"models": ["m"], "methods": sorted({r["method"] for r in rows})},
            "images_override": None, "seed": 0, "device": {"device": "cpu", "name": "cpu", "threads": 1},
            "versions": {"commit": commit, "dirty": False}, "data": [], "paper": None,
            "results": {"methods": {r["method"]: r["method"].upper() for r in rows},
                        "models": [{"model": "m", "fp32": {"top1": fp32}}], "rows": rows},
            "wall_s": 1.0, "cpu_s": 1.0, "created": f"day {commit[:1]}"}


def _row(method, bits, top1):
    return {"model": "m", "method": method, "bits": bits, "top1": top1}


COMMITTED = _result([_row("a", "2/6", 10.0), _row("b", "2/6", 20.0), _row("a", "3/6", 30.0), _row("b", "3/6", 40.0)])


def _rerun(rows, **kw):
    new = _result(rows, commit="b" * 40, **kw)
    new["settings"] = {**COMMITTED["settings"], "methods": ["b"], **kw.get("settings", {})}
    return new


def test_a_rerun_replaces_its_methods_rows_in_place_and_says_which_code_measured_which():
    merged = merge_method_rows(COMMITTED, _rerun([_row("b", "2/6", 21.0), _row("b", "3/6", 41.0)]), "b", "methods")
    assert [(r["method"], r["top1"]) for r in merged["results"]["rows"]] == [("a", 10.0), ("b", 21.0), ("a", 30.0),
                                                                              ("b", 41.0)]
    assert merged["settings"]["methods"] == ["a", "b"] and merged["results"]["methods"] == {"a": "A", "b": "B"}
    # the envelope stays the whole run's; the rerun is recorded beside it
    assert merged["versions"]["commit"] == "a" * 40 and merged["command"] == COMMITTED["command"]
    assert row_versions(merged) == {"a": {"commit": "a" * 40, "dirty": False}, "b": {"commit": "b" * 40, "dirty": False}}
    assert merged["method_versions"]["b"]["command"] == "dfmpc experiments x b"
    assert "b's rows rerun by dfmpc experiments x b at bbbbbbb" in book.provenance(merged)
    assert COMMITTED["results"]["rows"][1]["top1"] == 20.0  # the committed result is not modified
    # a float mean's last digits (the loss varies in its eighth between runs) are not a change; one image is
    noise = _rerun([_row("b", "2/6", 21.0), _row("b", "3/6", 41.0)], fp32=80.0 * (1 + 2e-8))
    assert merge_method_rows(COMMITTED, noise, "b", "methods")["results"]["models"][0]["fp32"]["top1"] == 80.0
    # a list of the method's rows alone (an ablation) is the rerun's whatever its rows; its description too
    ablation = _rerun([_row("b", "2/6", 21.0), _row("b", "3/6", 41.0)])
    ablation["results"]["methods"]["b"] = "B, new default"
    committed = copy.deepcopy(COMMITTED)
    committed["results"]["ablation"] = [{**_row("b", "2/6", 1.0), "variant": "old"}]
    ablation["results"]["ablation"] = [{**_row("b", "2/6", 2.0), "variant": "new"}, {**_row("b", "3/6", 3.0), "variant": "new"}]
    done = merge_method_rows(committed, ablation, "b", "methods")
    assert done["results"]["ablation"] == ablation["results"]["ablation"]
    assert done["results"]["methods"] == {"a": "A", "b": "B, new default"}
    # a second rerun of another method keeps the first one's record
    again = merge_method_rows(merged, {**_rerun([_row("a", "2/6", 11.0), _row("a", "3/6", 31.0)]),
                                       "settings": {**COMMITTED["settings"], "methods": ["a"]}}, "a", "methods")
    assert set(again["method_versions"]) == {"a", "b"} and row_methods(again) == ["a", "b"]
    assert [r["top1"] for r in again["results"]["rows"]] == [11.0, 21.0, 31.0, 41.0]


@pytest.mark.parametrize("new, needle", [
    (_rerun([_row("b", "2/6", 21.0), _row("b", "3/6", 41.0)], fp32=80.02), "results.models[0].fp32.top1"),
    (_rerun([_row("b", "2/6", 21.0)]), "not the committed result's"),
    (_rerun([_row("b", "3/6", 41.0), _row("b", "2/6", 21.0)]), "not the committed result's"),
    (_rerun([_row("b", "2/6", 21.0), _row("a", "3/6", 41.0)]), "methods other than 'b'"),
    (_rerun([_row("b", "2/6", 21.0), _row("b", "3/6", 41.0)], settings={"models": ["m", "n"]}), "models="),
    ({**_rerun([_row("b", "2/6", 21.0), _row("b", "3/6", 41.0)]), "seed": 1}, "seed"),
    ({**_rerun([_row("b", "2/6", 21.0), _row("b", "3/6", 41.0)]),
      "device": {"device": "cpu", "name": "cpu", "threads": 2}}, "device"),
])
def test_a_rerun_that_cannot_stand_beside_the_committed_rows_is_refused(new, needle):
    with pytest.raises(DfmpcError, match="run (it|the experiment) whole|rerun it with the same") as e:
        merge_method_rows(COMMITTED, new, "b", "methods")
    assert needle in str(e.value)


def test_the_cli_reruns_one_methods_rows_and_keeps_the_others(tmp_path, shared, capsys):
    argv = ["experiments", "authors_data_free", "--quick", "--out", str(tmp_path), "--no-progress", "--threads", "1",
            "--set", "bits=2/6"]
    assert main(argv) == 0
    path = tmp_path / "authors_data_free.json"
    whole = json.loads(path.read_text())
    planted = copy.deepcopy(whole)
    squant = next(r for r in planted["results"]["rows"] if r["method"] == "squant")
    squant["top1"] = -1.0  # a kept row is kept as it is, not measured again
    path.write_text(json.dumps(planted))
    assert main(argv + ["--rerun-method", "dfmpc+"]) == 0
    merged = json.loads(path.read_text())
    assert next(r for r in merged["results"]["rows"] if r["method"] == "squant")["top1"] == -1.0

    def measured(result, method):
        return [{k: v for k, v in r.items() if k != "quantize_seconds"} for r in result["results"]["rows"]
                if r["method"] == method]

    assert measured(merged, "dfmpc+") == measured(whole, "dfmpc+") and measured(merged, "ocs") == measured(whole, "ocs")
    assert set(merged["method_versions"]) == {"dfmpc+"} and merged["command"] == whole["command"]
    assert merged["method_versions"]["dfmpc+"]["command"].endswith("--rerun-method dfmpc+")
    # what the other rows rest on moved (the full-precision accuracy): refused in one line, the file untouched
    planted = copy.deepcopy(merged)
    planted["results"]["models"][0]["fp32"]["top1"] += 0.5
    path.write_text(json.dumps(planted))
    capsys.readouterr()
    assert main(argv + ["--rerun-method", "dfmpc+"]) == 2
    err = capsys.readouterr().err
    assert "results.models[0].fp32.top1" in err and "whole" in err and err.count("\n") == 1, err
    assert json.loads(path.read_text()) == planted


@pytest.mark.parametrize("name, committed, needle", [
    ("table1", False, "cannot rerun one method's rows"),
    ("wa", False, "needs the committed result"),
    ("wa", True, "has no rows of method 'nope'"),
])
def test_the_cli_refuses_a_rerun_it_cannot_do_before_any_work(tmp_path, capsys, name, committed, needle):
    if committed:
        (tmp_path / f"{name}.json").write_text(json.dumps({**_result([_row("a", "2/6", 1.0)]), "experiment": name}))
    code = main(["experiments", name, "--quick", "--out", str(tmp_path), "--rerun-method", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_every_experiment_that_lists_its_methods_runs_each_alone():
    """The experiments --rerun-method serves: their methods are a setting of every preset."""
    listing = {n for n, m in experiments.EXPERIMENTS.items() if getattr(m, "METHODS_SETTING", None)}
    assert listing == {"compare", "coverage", "wa", "authors_data_free", "zeroq_authors"}
    for name in listing:
        for preset in experiments.PRESETS:
            assert experiments.settings_for(name, preset)["methods"], (name, preset)
