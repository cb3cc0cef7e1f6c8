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
    fig = plots.accuracy_vs_flops_figure({"": (curves, points)}, "accuracy against compute")
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
    colours = [matplotlib.colors.to_rgba(line.get_color()) for line in ax.get_lines()]
    assert len(set(colours)) == len(colours)  # teacher and oracle never share a colour


def test_the_accuracy_plot_spans_the_systems_not_the_longest_curve():
    curves = {"cascade to the teacher": (np.linspace(0.9, 5.3, 50), np.linspace(0.88, 0.91, 50))}
    points = {"student 2": (0.9, 0.887), "student 1": (1.78, 0.883), "teacher": (2.6, 0.913)}
    ax = plots.accuracy_vs_flops_figure({"": (curves, points)}, "accuracy against compute").axes[0]
    low, high = ax.get_xlim()
    assert low < 0.9 and 2.6 < high < 3.0


def test_a_long_legend_leaves_the_accuracy_plot_its_width_beneath_it(tmp_path):
    long_name = "Cascade to the teacher (the students cheapest first, then the teacher), at its best hold-out accuracy"
    points = {f"{long_name} {i}": (1.0 + i, 0.8 + 0.01 * i) for i in range(12)}
    fig = plots.accuracy_vs_flops_figure({"": ({"cascade": ([0.9, 1.8], [0.80, 0.85])}, points)},
                                         "accuracy against compute")
    fig.savefig(tmp_path / "plot.png", bbox_inches="tight")
    ax = fig.axes[0]
    assert ax.get_position().width * fig.get_figwidth() > 5.5  # inches: the legend sits under the axes, not beside
    assert ax.get_legend().get_window_extent().y1 < ax.get_window_extent().y0


def test_each_pair_has_a_panel_of_its_own():
    panel = ({"cascade": ([0.9, 1.8], [0.80, 0.85])}, {"student 1": (1.8, 0.85)})
    fig = plots.accuracy_vs_flops_figure({"Generalists": panel, "Specialists (mcl)": panel}, "accuracy")
    assert [ax.get_title() for ax in fig.axes] == ["Generalists", "Specialists (mcl)"]
    shares = {"Generalists": {"student 1": [0.5] * 10}, "Specialists (mcl)": {"specialist 1": [0.5] * 10}}
    fig = plots.grouped_bars_figure(shares, CLASSES, "share", "share")
    assert [ax.get_title() for ax in fig.axes] == ["Generalists", "Specialists (mcl)"]


def test_panels_in_columns_keep_one_legend_a_row_and_no_empty_panel():
    shares = {f"panel {k}": {"student 1": [0.5] * 10, "student 2": [0.5] * 10} for k in range(3)}
    fig = plots.grouped_bars_figure(shares, CLASSES, "share", "share", columns=2)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["panel 0", "panel 1", "panel 2"]
    assert [ax.get_legend() is not None for ax in shown] == [False, True, True]
    for ax in shown:
        assert_no_overlap(ax, fig)


def assert_no_overlap(ax, fig):
    fig.canvas.draw()
    boxes = [label.get_window_extent() for label in ax.get_xticklabels() if label.get_text()]
    assert len(boxes) == len(CLASSES)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_class_names_never_overlap():
    fig = plots.grouped_bars_figure({"": {f"system {k}": [0.1 * k] * 10 for k in range(9)}}, CLASSES, "t", "y")
    assert_no_overlap(fig.axes[0], fig)
    fig = plots.gain_table_figure({f"system {k}": [k - 4.0] * 10 for k in range(9)}, CLASSES, "gain")
    assert_no_overlap(fig.axes[0], fig)


def test_the_gain_table_shows_every_value_on_a_scale_symmetric_about_zero():
    values = {"routed": [1.0, -2.5] + [0.0] * 8, "oracle": [4.0] * 10}
    fig = plots.gain_table_figure(values, CLASSES, "gain")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts][:2] == ["+1.0", "-2.5"] and len(ax.texts) == 20
    low, high = ax.images[0].get_clim()
    assert low == -high == -4.0
