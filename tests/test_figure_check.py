"""The figure check of the book finds overlapping text and a legend over data, and passes a clean figure."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from dfmpc.experiments.figures import figure_problems, self_test_figures  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def clean():
    fig, axes = plt.subplots(1, 2, figsize=(6.75, 2.5), layout="constrained")
    for ax in axes:
        ax.plot(range(10), range(10), label="rising")
        ax.set_title("short")
        ax.legend(loc="upper left")
    return fig


def test_overlapping_titles_are_reported():
    problems = figure_problems(self_test_figures()["figure text overlapping"])
    assert any(p.startswith("text overlaps") and "title" in p for p in problems), problems


def test_a_legend_over_data_is_reported():
    problems = figure_problems(self_test_figures()["legend over the data"])
    assert any(p.startswith("legend of axes 1 covers data") for p in problems), problems


def test_a_clean_figure_passes():
    assert figure_problems(clean()) == []


def test_turned_tick_labels_that_only_share_their_bounding_boxes_pass():
    fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
    ax.bar(range(8), range(8))
    ax.set_xticks(range(8), [f"method {i} 2/6" for i in range(8)], rotation=40, ha="right")
    assert figure_problems(fig) == []
    ax.set_xticks(range(8), [f"a much longer method name {i} 2/6" for i in range(8)], rotation=10, ha="right")
    assert any("x tick" in p for p in figure_problems(fig))
