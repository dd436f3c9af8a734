"""The pictures every run keeps: confusion matrix, training curves, worst mistakes, and
the evaluation (per digit, calibration, robustness)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from mnistops.train.evaluation import Report
from mnistops.train.loop import EpochMetrics


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    matrix = np.zeros((10, 10), np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def confusion_figure(truth: np.ndarray, predicted: np.ndarray) -> Figure:
    matrix = confusion_matrix(truth, predicted)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(np.log1p(matrix), cmap="Blues")
    for t in range(10):
        for p in range(10):
            if matrix[t, p]:
                color = "white" if t == p else "black"
                ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=7, color=color)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"test confusion matrix ({accuracy:.2%} correct of {matrix.sum()})")
    fig.tight_layout()
    return fig


def curves_figure(epochs: list[EpochMetrics]) -> Figure:
    x = [e.epoch for e in epochs]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(x, [e.train_loss for e in epochs], "o-", label="training")
    loss_ax.plot(x, [e.val_loss for e in epochs], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.plot(x, [e.train_accuracy for e in epochs], "o-", label="training")
    acc_ax.plot(x, [e.val_accuracy for e in epochs], "o-", label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
        ax.set_xticks(x)
    fig.tight_layout()
    return fig


def worst_errors_figure(
    images: np.ndarray,
    truth: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    count: int = 25,
) -> Figure:
    """The misclassified test images the model was most sure of, with true and predicted.

    One image of them all on one set of axes, each labelled above: 25 axes of their own
    (as `plt.subplots` makes them) took 1 s to draw, a tenth of a short training's CPU;
    this takes 0.2 s and shows the same."""
    wrong = np.flatnonzero(predicted != truth)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    columns, side, gap, label = 5, 28, 10, 13
    rows = max(1, -(-len(worst) // columns))
    mosaic = np.zeros((rows * (side + label + 2), columns * (side + gap)), np.float32)
    fig, ax = plt.subplots(figsize=(columns * 1.6, rows * 1.8))
    ax.axis("off")
    for place, i in enumerate(worst):
        top = (place // columns) * (side + label + 2) + label
        left = (place % columns) * (side + gap) + gap // 2
        mosaic[top : top + side, left : left + side] = images[i]
        caption = f"true {truth[i]}, said {predicted[i]}\n{confidence[i]:.0%}"
        ax.text(left + side / 2, top - 1, caption, ha="center", va="bottom", fontsize=8)
    ax.imshow(mosaic, cmap="gray_r", interpolation="nearest", vmin=0, vmax=255)
    fig.suptitle(f"worst {len(worst)} of {len(wrong)} misclassified test images", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95)
    return fig


def evaluation_figure(report: Report) -> Figure:
    """Accuracy per digit, the reliability plot with its ECE, accuracy per robustness kind."""
    fig, (digit_ax, cal_ax, robust_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    per_class = np.nan_to_num(report.per_class * 100)
    digit_ax.bar(range(10), per_class, color="tab:blue")
    low = max(0.0, float(per_class.min()) - 2)
    digit_ax.set(xticks=range(10), xlabel="digit", ylabel="test accuracy (%)", ylim=(low, 100.5))
    digit_ax.set_title("accuracy per digit")
    for digit, value in enumerate(per_class):
        digit_ax.text(digit, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    cal_ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    cal_ax.plot(
        [b.confidence for b in report.bins],
        [b.accuracy for b in report.bins],
        "o-",
        label="this model",
    )
    for b in report.bins:
        cal_ax.annotate(
            str(b.count),
            (b.confidence, b.accuracy),
            fontsize=6,
            xytext=(3, -9),
            textcoords="offset points",
        )
    cal_ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02))
    cal_ax.set_title(f"reliability (ECE {report.ece:.4f}; labels: answers per bin)")
    cal_ax.legend(loc="upper left", fontsize=8)
    kinds = list(report.robustness)
    values = [100 * report.robustness[k] for k in kinds]
    robust_ax.bar(kinds, values, color="tab:orange")
    for i, value in enumerate(values):
        robust_ax.text(i, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    robust_ax.set(ylabel="accuracy (%)", ylim=(0, 105))
    robust_ax.set_title("robustness set (turned, shifted, thicker, thinner)")
    for ax in (digit_ax, cal_ax, robust_ax):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
