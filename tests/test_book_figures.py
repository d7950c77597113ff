"""One number per fact: a figure for the same model, method, bits and split is the same committed result on every
page, and every figure the README quotes comes from, or is asserted against, a committed JSON."""
import json
import re
from pathlib import Path

import pytest

from dfmpc.experiments import compare, deviations, load_result, verdict

ROOT = Path(__file__).resolve().parents[1]
COMPARE = load_result("compare", ROOT / "book" / "data")
README = " ".join((ROOT / "README.md").read_text().split())


def compare_entry(model):
    return next(e for e in COMPARE["results"]["models"] if e["model"] == model)


def same_images(record, model):
    """The record names the comparison's images: the same half, every image of it."""
    theirs = compare_entry(model)["data"]
    return (record["split"], record["images"], record["path"]) == (theirs["split"], theirs["images"], theirs["path"])


@pytest.mark.parametrize("name", ["table1", "table2"])
def test_the_papers_cifar_tables_are_the_comparisons_figures(name):
    """Tables 1-2 are measured on the comparison's test half: fp32, original and dfmpc at 2/6 are its numbers."""
    result = load_result(name, ROOT / "book" / "data")
    rows = [r for r in result["results"]["rows"] if r["status"] in ("measured", "agreement only")]
    assert rows
    for row in rows:
        assert same_images(row["data"], row["model"]), (name, row["model"], row["data"]["images"])
        field = "top1" if row["status"] == "measured" else "agreement_with_fp32"
        assert row["results"]["fp32"].get(field, 100.0) == (compare_entry(row["model"])["fp32"].get(field) or 100.0)
        for method in ("original", "dfmpc"):
            assert row["results"][method][field] == compare.figure(COMPARE, row["model"], "2/6", method, field), \
                (name, row["model"], method)


def test_the_stand_in_of_tables_3_4_is_the_comparisons_figure():
    standin = load_result("table34", ROOT / "book" / "data")["results"]["standin"]
    model = standin["model"]
    assert same_images(standin["data"], model)
    assert standin["results"]["fp32"]["top1"] == compare_entry(model)["fp32"]["top1"]
    for key, q in standin["results"].items():
        if key != "fp32":
            method, bits = key.split()
            assert q["top1"] == compare.figure(COMPARE, model, bits, method), key


def test_the_readme_main_command_quotes_its_committed_result():
    """The main command's figures and the saved file's size are those of book/data/main_command.json, which is
    the README's command run with --json (and --save), and they are the comparison's figures for ResNet-56."""
    main = json.loads((ROOT / "book" / "data" / "main_command.json").read_text())
    args = re.search(r"\.venv/bin/dfmpc quantize ([^\n`]*)", (ROOT / "README.md").read_text()).group(1).strip()
    assert main["command"].startswith(f"dfmpc quantize {args} ") and "--save q.dfmpc" in main["command"]
    rows = {r["method"]: r for r in main["results"]}
    model = main["model"]
    assert main["data"]["split"] == "test" and same_images(main["data"], model)
    assert f"full precision {rows['fp32']['top1']:.2f} %" in README
    assert rows["fp32"]["top1"] == compare_entry(model)["fp32"]["top1"]
    for method in ("original", "dfmpc", "dfmpc+"):
        assert f"`{method}` {rows[method]['top1']:.2f} %" in README, method
        assert rows[method]["top1"] == pytest.approx(compare.figure(COMPARE, model, "2/6", method), abs=1e-9), method
    saved = main["saved"]
    assert saved["method"] == "dfmpc+" and saved["bits"] == "2/6"
    assert (f"that is {saved['bytes']:,} bytes ({saved['bytes'] / 2**20:.2f} MB), against "
            f"{rows['dfmpc+']['size_mb']:.2f} MB in the report") in README
    assert f"and {rows['fp32']['size_mb']:.2f} MB in full precision" in README


def test_the_readme_quotes_zeroqs_deviation_from_its_authors():
    """The README's sentence on ZeroQ's distillation budget, against book/data/deviations.json."""
    data = load_result("deviations", ROOT / "book" / "data")
    effect = {e["bits"]: e for e in deviations.effects(data) if e["setting"] == "distillation iterations"}
    two = effect["2/6"]
    assert (f"the 500 give it {two['delta']:.2f} more points at 2/6 ({two['authors']:.2f} % against {two['ours']:.2f} %; "
            f"`dfmpc+` {two['dfmpc+']:.2f} %) and nothing measurable at 3/6 and 4/6") in README
    assert two["word"] == "higher" and effect["3/6"]["word"] == effect["4/6"]["word"] == "tie"
    assert two["authors"] - two["dfmpc+"] > two["se"]  # on the development cell full-strength ZeroQ leads dfmpc+


def test_the_readme_quotes_full_strength_zeroq_on_the_test_half():
    """The README's sentence on ZeroQ at its authors' budget, as verdict writes it from book/data/zeroq_authors.json."""
    data = load_result("zeroq_authors", ROOT / "book" / "data")
    sentence = verdict.class_summary(data, "synthetic data")
    assert ("At its authors' budget (500 distillation iterations on 32 images; run on the two CIFAR-10 ResNets and "
            "EfficientNet-Lite0, `book/data/zeroq_authors.json`), "
            f"on the same test half: {sentence}.") in README
    lite0 = {r["bits"]: r["top1"] for r in data["results"]["rows"]
             if (r["model"], r["method"]) == ("efficientnet_lite0", "zeroq")}
    assert f"that budget does not rescue ZeroQ ({lite0['3/6']:.2f} % at 3/6, {lite0['4/6']:.2f} % at 4/6)" in README
    assert lite0["3/6"] < compare.figure(COMPARE, "efficientnet_lite0", "3/6", "zeroq")  # lower than at 100 steps


def test_the_readme_judges_dfmpc_plus_against_squant_and_ocs_at_their_stronger_settings():
    """The README's sentence on the data-free class, with SQuant and OCS each at the better of our setting and their
    authors' (as in its table), as verdict writes it from compare.json merged with book/data/authors_data_free.json."""
    from dfmpc.experiments import authors_data_free

    merged = authors_data_free.strongest(COMPARE, load_result("authors_data_free", ROOT / "book" / "data"))
    sentence = verdict.class_summary(merged, "data-free")
    assert f"With SQuant and OCS each at the stronger of its two settings, as in the table: {sentence}." in README
    assert sentence != verdict.class_summary(COMPARE, "data-free")  # the authors' settings change the verdict


def test_the_readme_quotes_the_speed_of_dfmpc_plus():
    """The README's sentence on how long dfmpc+ takes, against book/data/speed.json and its targets."""
    from dfmpc.experiments import speed

    data = load_result("speed", ROOT / "book" / "data")
    rows = {r["model"]: r for r in data["results"]["rows"]}
    per = [r["seconds_per_mparameter"] for r in rows.values()]
    assert (f"`dfmpc+` takes {rows['resnet18']['median_s']:.2f} s to quantize ResNet-18 at 2/6, not the "
            f"{speed.TARGET_SECONDS:g} s we aim for; per million parameters it takes {min(per):.2f}-{max(per):.2f} s "
            f"from ResNet-18 through ResNet-50 to VGG-16, within the factor of {speed.TARGET_SPREAD:g} we aim for") in README
    assert [t["met"] for t in speed.targets(data)] == [False, True]


def test_the_readme_verdict_quotes_the_comparison():
    """The figures of the README's verdict under the table, each computed from book/data/compare.json."""
    r20, r56 = "resnet20_cifar10_a", "resnet56_cifar10_a"
    models = {e["model"]: e for e in COMPARE["results"]["models"]}
    se = [compare.standard_error(50.0, models[m]["images"]) for m in (r20, "efficientnet_lite0")]
    assert f"standard error at most {se[0]:.2f} points; 650 ImageNet-subset images, at most {se[1]:.2f} points" in README
    sentence = verdict.class_summary(COMPARE, "synthetic data")  # the data-free one: the next test
    assert sentence[0].upper() + sentence[1:] + "." in README
    resnet_rows = [r for r in COMPARE["results"]["rows"] if r["model"] in (r20, r56)]
    zeroq = [r["quantize_seconds"] for r in resnet_rows if r["method"] == "zeroq"]
    plus = [r["quantize_seconds"] for r in resnet_rows if r["method"] == "dfmpc+"]
    assert f"takes {min(zeroq):.0f}-{max(zeroq):.0f} s per ResNet on one CPU thread, its distillation included" in README
    assert f"against {min(plus):.1f}-{max(plus):.1f} s for `dfmpc+`" in README
    share = {m: 100 * compare.figure(COMPARE, m, "2/6") / models[m]["fp32"]["top1"] for m in (r20, r56)}
    assert f"`dfmpc+` keeps {share[r20]:.1f} % (ResNet-20) and {share[r56]:.1f} % (ResNet-56) of full precision" in README


def test_the_readme_names_the_choices_pending_adoption():
    """The README's protocol paragraph says which ablation variants the rule adopted but are not yet the default
    (compare.PENDING_ADOPTION), and points at that list while it is not empty."""
    assert ("PENDING_ADOPTION" in README) == bool(compare.PENDING_ADOPTION)
    phrases = {"ternary search from one start (no restarts)": "a single start of the ternary search",
               "asymmetric grid for the k-bit layers": "the asymmetric grid for the k-bit layers"}
    for variant, phrase in phrases.items():
        assert (phrase in README) == (variant in compare.PENDING_ADOPTION), variant
    from dfmpc.experiments import pair_roles  # the choices measured since, on the same cells

    assert ("pair_roles.PENDING_ADOPTION" in README) == bool(pair_roles.PENDING_ADOPTION)
    phrase = "giving the low bit width of each pair to the layer whose codes lose less, with the whole model no larger"
    assert (phrase in README) == ("least-error layer of each pair low, model no larger in total" in pair_roles.PENDING_ADOPTION)


def test_the_readme_says_which_pending_choices_the_next_full_run_adopts():
    """The README's account of the pending choices measured together (book/data/adoption.json): which two are
    adopted, their mean change, and what the third costs on the cell that fails it."""
    from dfmpc.experiments import adoption

    data = load_result("adoption", ROOT / "book" / "data")
    decided = {tuple(d["choices"]): d for d in adoption.decisions(data)}
    assert adoption.chosen(data) == adoption.ADOPT == ["asymmetric grid for the k-bit layers",
                                                       "least-error layer of each pair low, model no larger in total"]
    best, all_three = decided[tuple(adoption.ADOPT)], decided[tuple(data["results"]["pending"])]
    assert (f"the grid and the low-layer choice together raise the mean by {best['mean_change']:.2f} points and "
            "lower no cell") in README and best["worst_change"] >= 0
    assert f"adding the single start costs ResNet-20 {-all_three['worst_change']:.2f} points at 2/6" in README
    assert all_three["worst_cell"] == ("resnet20_cifar10_a", "2/6") and not all_three["adopted"]
    assert -all_three["worst_change"] > all_three["worst_cell_se"]  # "more than a standard error"


def test_the_readme_engine_figures_are_the_committed_engine_result():
    """The README's onnxruntime paragraph (its command's model, ResNet-56 at W2/6-A8) quotes book/data/engine.json."""
    engine = load_result("engine", ROOT / "book" / "data")
    r56 = next(m for m in engine["results"]["models"] if m["model"] == "resnet56_cifar10_a")
    assert (engine["results"]["method"], engine["results"]["bits"], engine["results"]["act_bits"]) == ("dfmpc+", "2/6", 8)
    assert "--bits 2/6 --act-bits 8 --method dfmpc+ --split test --export r56.onnx" in README
    kernels = r56["kernels"]["quantized"]
    assert not kernels["float"], "the README says integer kernels only"
    mb = {k: v / 2**20 for k, v in r56["size_bytes"].items()}
    assert (f"On the test half ({r56['images']:,} JPEG images), one CPU thread: onnxruntime "
            f"{r56['top1']['quantized_onnxruntime']:.2f} % top-1, dfmpc's simulation {r56['top1']['quantized_dfmpc']:.2f} %, "
            f"the same class on {r56['agreement']['quantized']:.2f} % of the images") in README
    integer = kernels["integer"]
    assert (f"({integer['QLinearConv']} `QLinearConv`, {integer['QLinearAdd']} `QLinearAdd`, one `QGemm`), from a "
            f"{mb['quantized']:.2f} MB file (fp32 ONNX: {mb['fp32']:.2f} MB)") in README and integer["QGemm"] == 1


def test_the_improvement_chapter_claims_what_the_comparison_shows():
    """Its opening sentence: leads (by the points quoted) and ties (within one standard error), cell by cell."""
    text = " ".join((ROOT / "notebooks" / "improvement.md").read_text().split())
    cells = {(s.model, s.bits): s for s in verdict.standings(COMPARE, "data-free")}
    resnets, lites = ("resnet20_cifar10_a", "resnet56_cifar10_a"), ("efficientnet_lite0", "efficientnet_lite2")
    leads = [cells[(m, "2/6")] for m in resnets]
    lite_leads = [cells[(m, b)] for m in lites for b in ("3/6", "4/6")]
    assert all(s.word == "ahead" for s in leads + lite_leads)
    assert f"at 2/6 on the CIFAR ResNets (by {leads[0].lead:.0f} and {leads[1].lead:.0f} points)" in text
    low, high = min(s.lead for s in lite_leads), max(s.lead for s in lite_leads)
    assert f"at 3/6 and 4/6 on the EfficientNets (by {low:.0f} to {high:.0f} points)" in text
    others = [s for (m, b), s in cells.items() if m in resnets + lites and b != "2/6" and s not in lite_leads]
    assert others and all(s.word == "tie" for s in others), "the chapter says: tied in every other cell above 2 bits"


def test_the_improvement_chapter_says_how_far_the_unbiased_gain_leads():
    """'at 2/6 on ResNet-20 unbiased is far ahead (by 14 to 42 points); in the other development cells it and the others
    differ by at most 3 points': from the ablation on the development half."""
    text = " ".join((ROOT / "notebooks" / "improvement.md").read_text().split())
    others = ("least-squares gain (DF-MPC's c)", "variance-matching gain", "no gain correction")
    gaps = {(m, b): [compare.figure(COMPARE, m, b, variant="dfmpc+") - compare.figure(COMPARE, m, b, variant=v)
                     for v in others]
            for m in compare.DEVELOPMENT_MODELS for b in ("2/6", "3/6", "4/6")}
    r20 = gaps.pop(("resnet20_cifar10_a", "2/6"))
    assert f"unbiased is far ahead (by {min(r20):.0f} to {max(r20):.0f} points)" in text and min(r20) > 10
    worst = max(abs(g) for cell in gaps.values() for g in cell)
    assert f"it and the others differ by at most {worst:.0f} points" in text or (worst <= 3 and "at most 3 points" in text)
