"""The figures show everything they draw: whole epochs, titles inside the image, every marker and line."""

import matplotlib.colors
import numpy as np
import pytest

from utils import plots
from utils.data import CLASSES

ROUTED_TITLE = ("Routed: cascade, at most 1.25x the cheapest student's GFLOPs (googlenet): confusion matrix "
                "(test set)")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plots._pyplot().close("all")


def visible_ticks(ax):
    low, high = ax.get_xlim()
    return [tick for tick in ax.get_xticks() if low <= tick <= high]


@pytest.mark.parametrize("epochs", [1, 2, 7])
def test_training_curves_have_whole_epochs_on_the_x_axis(epochs):
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.1 * e, "holdout_loss": 2.1 / e,
                "holdout_acc": 0.1 * e} for e in range(1, epochs + 1)]
    fig = plots.history_figure(history, "teacher googlenet")
    fig.canvas.draw()
    for ax in fig.axes:
        assert visible_ticks(ax) == list(range(1, epochs + 1))


def test_a_long_title_is_wrapped_and_stays_inside_the_figure():
    fig = plots.confusion_figure(np.eye(len(CLASSES)) * 5, CLASSES, ROUTED_TITLE)
    fig.canvas.draw()
    (ax, _colorbar) = fig.axes
    assert " ".join(ax.get_title().split()) == ROUTED_TITLE  # every word kept, over several lines
    assert len(ax.get_title().splitlines()) > 1
    box = ax.title.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


def test_every_point_shows_above_the_curves_even_where_points_coincide():
    curves = {"cascade": ([0.9, 1.2, 1.8], [0.80, 0.84, 0.85]), "deferral": ([0.9, 1.2, 1.8], [0.80, 0.84, 0.85])}
    points = {"student 1": (1.8, 0.85), "student 2": (0.9, 0.80), "ensemble": (2.7, 0.86),
              "random routing": (0.9, 0.80), "oracle": (2.7, 0.86)}
    fig = plots.accuracy_vs_flops_figure(curves, points, "accuracy against compute")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    markers = [lines[name] for name in points]
    for marker in markers:
        assert marker.get_zorder() > max(lines[name].get_zorder() for name in curves)
        assert matplotlib.colors.to_rgba(marker.get_markeredgecolor()) != matplotlib.colors.to_rgba(
            marker.get_markerfacecolor())  # an outline
    sizes = [marker.get_markersize() for marker in markers]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)  # a later one sits inside
    cascade, deferral = lines["cascade"], lines["deferral"]  # the same curve twice: both must show
    assert (cascade.get_linestyle(), cascade.get_linewidth()) != (deferral.get_linestyle(), deferral.get_linewidth())
    assert cascade.get_linewidth() > deferral.get_linewidth()


def test_a_long_legend_leaves_the_accuracy_plot_its_width(tmp_path):
    long_name = "Cascade to the teacher (the students cheapest first, then the teacher), at its best hold-out accuracy"
    points = {f"{long_name} {i}": (1.0 + i, 0.8 + 0.01 * i) for i in range(12)}
    fig = plots.accuracy_vs_flops_figure({"cascade": ([0.9, 1.8], [0.80, 0.85])}, points, "accuracy against compute")
    fig.savefig(tmp_path / "plot.png", bbox_inches="tight")
    ax = fig.axes[0]
    assert ax.get_position().width * fig.get_figwidth() > 6  # inches: the legend sits beside the axes, not in them
    assert ax.get_legend().get_window_extent().x0 > ax.get_window_extent().x1
