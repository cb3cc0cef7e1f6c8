"""PNG figures: training curves, per-class bars, a confusion matrix, accuracy against GFLOPs.

Each ``plot_*`` saves the figure its ``*_figure`` builds. Nothing is cut off: long titles are wrapped
and the saved image takes in everything drawn (``bbox_inches="tight"``). Lines that may coincide
differ in style and width, so that each stays visible.
"""

import textwrap
from itertools import cycle

import numpy as np

from utils.runs import write_atomically

LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = "osD^v<>px*"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wrap(title, width):
    """``title`` in lines of at most ``width`` characters."""
    return "\n".join(textwrap.wrap(title, width)) or title


def line_styles():
    """Keyword arguments of successive lines: each a different dash pattern, the later ones thinner, so that a
    line drawn over an earlier one at the same place leaves it visible."""
    for i, style in enumerate(cycle(LINE_STYLES)):
        yield {"linestyle": style, "linewidth": max(1.0, 2.6 - 0.4 * i)}


def _save(fig, path):
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        _pyplot().close(fig)


def history_figure(history, title, loss_name="loss"):
    """Loss (and its terms, and the hold-out cross-entropy) and accuracy per epoch; the x-axis has whole
    epochs only, even for a run of one epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {ax_loss: line_styles(), ax_acc: line_styles()}
    series = [(ax_loss, "train_loss", f"train: {loss_name}"), (ax_loss, "train_kd", "train: KD term"),
              (ax_loss, "train_ce", "train: cross-entropy term"), (ax_acc, "train_acc", "train (augmented)"),
              (ax_loss, "holdout_loss", "hold-out: cross-entropy"), (ax_acc, "holdout_acc", "hold-out")]
    for ax, key, label in series:
        points = [(r["epoch"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=label, **next(styles[ax]))
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(wrap(title, 110), fontsize=10)
    fig.tight_layout()
    return fig


def plot_history(history, path, title, loss_name="loss"):
    _save(history_figure(history, title, loss_name), path)


def grouped_bars_figure(values, classes, title, ylabel):
    """``values``: ``{series name: [one value per class]}``, drawn as grouped bars; the legend outside them."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / max(1, len(values))
    x = np.arange(len(classes))
    for i, (name, ys) in enumerate(values.items()):
        ax.bar(x + (i - (len(values) - 1) / 2) * width, ys, width, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, classes, rotation=30)
    ax.set_ylabel(ylabel)
    ax.set_title(wrap(title, 100))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_grouped_bars(values, classes, path, title, ylabel):
    _save(grouped_bars_figure(values, classes, title, ylabel), path)


def confusion_figure(matrix, classes, title):
    """``matrix[true, predicted]`` counts, shown as row-normalised shares."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=float)
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(wrap(title, 55), fontsize=11)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_confusion(matrix, classes, path, title):
    _save(confusion_figure(matrix, classes, title), path)


def accuracy_vs_flops_figure(curves, points, title):
    """Accuracy against GFLOPs per image: ``curves`` ``{name: (gflops, accuracy)}`` as lines (one point per
    threshold of a routing policy), ``points`` ``{name: (gflops, accuracy)}`` as markers (each student, the
    ensemble, random routing, the oracle). Accuracies are fractions, drawn in %.

    The markers are drawn above every line, each with a dark outline, and each smaller than the one
    before it: points at the same coordinates show as nested markers, all visible. Curves differ in
    dash pattern and width (``line_styles``).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for (name, (gflops, accuracy)), style in zip(curves.items(), line_styles()):
        ax.plot(np.asarray(gflops), 100 * np.asarray(accuracy), label=name, zorder=2, **style)
    for i, (name, (gflops, accuracy)) in enumerate(points.items()):
        size = 14 - 8 * i / max(1, len(points) - 1)
        ax.plot(gflops, 100 * accuracy, MARKERS[i % len(MARKERS)], markersize=size, markeredgecolor="black",
                markeredgewidth=0.8, zorder=3, label=name)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(wrap(title, 75))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, borderaxespad=0)
    return fig  # no tight_layout: it would shrink the axes to make room for a long legend; the saving takes it in


def plot_accuracy_vs_flops(curves, points, path, title):
    _save(accuracy_vs_flops_figure(curves, points, title), path)
