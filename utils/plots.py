"""PNG figures: training curves, per-class bars, a confusion matrix, accuracy against GFLOPs."""

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history, path, title, loss_name="loss"):
    """Loss (and its terms, and the hold-out cross-entropy) and accuracy per epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", label=f"train: {loss_name}")
    for key in ("train_kd", "train_ce"):
        if key in history[0]:
            term = "KD term" if key == "train_kd" else "cross-entropy term"
            ax_loss.plot(epochs, [r[key] for r in history], marker=".", linestyle="--", label=f"train: {term}")
    ax_acc.plot(epochs, [r["train_acc"] for r in history], marker="o", label="train (augmented)")
    for ax, key, label in ((ax_loss, "holdout_loss", "hold-out: cross-entropy"), (ax_acc, "holdout_acc", "hold-out")):
        held = [(r["epoch"], r[key]) for r in history if key in r]
        if held:
            ax.plot(*zip(*held), marker="o", label=label)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grouped_bars(values, classes, path, title, ylabel):
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
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix, classes, path, title):
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
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy_vs_flops(curves, points, path, title):
    """Accuracy against GFLOPs per image: ``curves`` ``{name: (gflops, accuracy)}`` as lines (one
    point per threshold of a routing policy), ``points`` ``{name: (gflops, accuracy)}`` as markers
    (each student, the ensemble, random routing, the oracle). Accuracies are fractions, drawn in %."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, (gflops, accuracy) in curves.items():
        ax.plot(np.asarray(gflops), 100 * np.asarray(accuracy), label=name, linewidth=1.5)
    markers = "osD^v<>px*"
    for i, (name, (gflops, accuracy)) in enumerate(points.items()):
        ax.plot(gflops, 100 * accuracy, markers[i % len(markers)], markersize=8, label=name)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
