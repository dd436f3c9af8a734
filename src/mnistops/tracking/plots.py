"""The pictures every run keeps: confusion matrix, training curves, worst mistakes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mnistops.train.loop import EpochMetrics  # noqa: E402


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
    """The misclassified test images the model was most sure of, with true and predicted."""
    wrong = np.flatnonzero(predicted != truth)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    columns = 5
    rows = max(1, -(-len(worst) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst, strict=False):
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(f"true {truth[i]}, said {predicted[i]}\n{confidence[i]:.0%}", fontsize=8)
    fig.suptitle(f"worst {len(worst)} of {len(wrong)} misclassified test images", fontsize=10)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
