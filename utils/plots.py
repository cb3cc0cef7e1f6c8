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


def colours():
    """Distinct colours, one for each artist of a panel: matplotlib's tab10, then Dark2 and Set1."""
    from matplotlib import colormaps

    return cycle([*colormaps["tab10"].colors, *colormaps["Dark2"].colors, *colormaps["Set1"].colors])


def class_axis(ax, classes):
    """Class names under the ticks, level and small enough that the longest never reach their neighbours."""
    ax.set_xticks(np.arange(len(classes)), classes, fontsize=8)


def grouped_bars_figure(panels, classes, title, ylabel, columns=1):
    """``panels``: ``{panel title: {series name: [one value per class]}}``, each drawn as grouped bars in a panel
    of its own, ``columns`` to a row (no panel titles where there is one); the legend right of each row."""
    plt = _pyplot()
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 + 6.5 * columns, 3.2 * rows), squeeze=False, sharey=True)
    for i, (ax, (panel, values)) in enumerate(zip(axes.flat, panels.items())):
        width = 0.8 / max(1, len(values))
        x = np.arange(len(classes))
        for j, ((name, ys), colour) in enumerate(zip(values.items(), colours())):
            ax.bar(x + (j - (len(values) - 1) / 2) * width, ys, width, label=name, color=colour)
        class_axis(ax, classes)
        if i % columns == 0:
            ax.set_ylabel(ylabel)
        if len(panels) > 1:
            ax.set_title(panel, fontsize=10)
        if i % columns == columns - 1 or i == len(panels) - 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(wrap(title, 100), fontsize=11)
    fig.tight_layout()
    return fig


def plot_grouped_bars(panels, classes, path, title, ylabel, columns=1):
    _save(grouped_bars_figure(panels, classes, title, ylabel, columns), path)


def label_cells(ax, texts, dark):
    """Write ``texts[i][j]`` in the middle of cell (i, j) of an ``imshow``, white where ``dark[i, j]``."""
    for i, row in enumerate(texts):
        for j, text in enumerate(row):
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark[i, j] else "black")


def gain_table_figure(values, classes, title):
    """``values``: ``{row name: [one value per class]}`` as a table of coloured cells, each with its value: red
    below 0, blue above, white at 0, the scale symmetric about 0."""
    plt = _pyplot()
    table = np.asarray(list(values.values()), dtype=float)
    limit = max(float(np.abs(table).max()), 1e-9)
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.32 * len(values)))
    image = ax.imshow(table, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    class_axis(ax, classes)
    ax.set_yticks(range(len(values)), list(values))
    label_cells(ax, [[f"{v:+.1f}" for v in row] for row in table], np.abs(table) > 0.6 * limit)
    ax.set_title(wrap(title, 90), fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def plot_gain_table(values, classes, path, title):
    _save(gain_table_figure(values, classes, title), path)


def confusion_figure(matrix, classes, title):
    """``matrix[true, predicted]`` counts, shown as row-normalised shares."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=float)
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    label_cells(ax, [[f"{int(v)}" for v in row] for row in matrix], shares > 0.5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(wrap(title, 55), fontsize=11)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_confusion(matrix, classes, path, title):
    _save(confusion_figure(matrix, classes, title), path)


def accuracy_vs_flops_figure(panels, title):
    """Accuracy against GFLOPs per image, one panel per entry of ``panels`` ``{panel title: (curves, points)}``:
    ``curves`` ``{name: (gflops, accuracy)}`` as lines (one point per threshold of a routing policy), ``points``
    ``{name: (gflops, accuracy)}`` as markers (each student, the ensemble, random routing, the oracle). Accuracies
    are fractions, drawn in %. The x-axis spans the points, where the systems are; longer curves run off it.

    Every line and marker of a panel has a colour of its own. The markers are drawn above every line, each with a
    dark outline, and each smaller than the one before it: points at the same coordinates show as nested markers,
    all visible. Curves differ in dash pattern and width (``line_styles``). Each legend sits under its panel.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), squeeze=False, sharey=True)
    for ax, (panel, (curves, points)) in zip(axes[0], panels.items()):
        colour = colours()
        for (name, (gflops, accuracy)), style in zip(curves.items(), line_styles()):
            ax.plot(np.asarray(gflops), 100 * np.asarray(accuracy), label=name, zorder=2, color=next(colour), **style)
        for i, (name, (gflops, accuracy)) in enumerate(points.items()):
            size = 14 - 8 * i / max(1, len(points) - 1)
            ax.plot(gflops, 100 * accuracy, MARKERS[i % len(MARKERS)], markersize=size, markeredgecolor="black",
                    markeredgewidth=0.8, zorder=3, label=name, color=next(colour))
        xs = [gflops for gflops, _ in points.values()]
        ax.set_xlim(0.9 * min(xs), max(xs) + 0.1 * (max(xs) - 0.9 * min(xs)) + 1e-6)
        ax.set_xlabel("GFLOPs per image")
        ax.set_title(panel if len(panels) > 1 else "", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8)
    axes[0, 0].set_ylabel("accuracy (%)")
    fig.suptitle(wrap(title, 60 * len(panels)), fontsize=11)
    return fig  # no tight_layout: it would shrink the axes to make room for the legends; the saving takes them in


def plot_accuracy_vs_flops(panels, path, title):
    _save(accuracy_vs_flops_figure(panels, title), path)
