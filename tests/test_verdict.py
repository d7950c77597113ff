"""The words of a comparison follow its table: a lead under one standard error is a tie (dfmpc.experiments.verdict)."""
import pytest

from dfmpc.experiments import verdict
from dfmpc.experiments.compare import standard_error


def comparison(cells: dict, images: int = 5000) -> dict:
    """A comparison result of one labelled model: cells {(bits, method): top-1}."""
    methods = sorted({m for _, m in cells})
    return {"results": {"methods": methods, "bits": sorted({b for b, _ in cells}),
                        "models": [{"model": "m", "images": images, "fp32": {"top1": 90.0}}],
                        "rows": [{"model": "m", "bits": b, "method": m, "top1": v} for (b, m), v in cells.items()]}}


def test_a_lead_under_one_standard_error_is_a_tie_and_the_rival_is_the_best_of_its_class():
    se = standard_error(80.0, 5000)  # 0.566 points; both figures near 80 %
    data = comparison({("3/6", "dfmpc+"): 80.0, ("3/6", "squant"): 80.0 - 0.9 * se, ("3/6", "omse"): 70.0,
                       ("3/6", "zeroq"): 80.0 + 1.1 * se, ("4/6", "dfmpc+"): 80.0, ("4/6", "squant"): 80.0 - 1.1 * se,
                       ("4/6", "zeroq"): 81.0})
    tie = verdict.standing(data, "m", "3/6", "data-free")
    assert (tie.word, tie.rival) == ("tie", "squant") and tie.lead == pytest.approx(0.9 * se)
    assert tie.se == pytest.approx(max(standard_error(80.0, 5000), standard_error(80.0 - 0.9 * se, 5000)))
    assert verdict.standing(data, "m", "3/6", "synthetic data").word == "behind"
    assert verdict.standing(data, "m", "4/6", "data-free").word == "ahead"
    assert verdict.rivals(data, "data-free") == ["omse", "squant"] and verdict.rivals(data, "synthetic data") == ["zeroq"]
    text = verdict.class_summary(data, "data-free", bits=("3/6", "4/6"), names={"m": "M"})
    assert "ahead by more than one standard error in 1 of 2 cells, tied (within one standard error) in 1: M at 3/6" in text
    assert "behind" not in text
    assert "behind in 2: M at 3/6" in verdict.class_summary(data, "synthetic data", bits=("3/6", "4/6"), names={"m": "M"})
    assert "| m | 3/6 | 80.00 | 88.9 | **tie** +0.51 vs squant" in verdict.standings_table(data)  # 80 % of fp32 90 %
