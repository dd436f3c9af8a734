"""What a person reads about a model besides its accuracy: per digit, calibration, robustness.

Calibration asks whether the model's confidence means what it says: of the answers given
with 90 % confidence, about 90 % should be right. The expected calibration error (ECE)
is the gap between confidence and accuracy, averaged over confidence bins weighted by
how many answers fall in each; a reliability plot shows the bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mnistops.train.loop import Evaluation, as_tensor, evaluate
from mnistops.train.robustness import KINDS, RobustnessSet

BINS = 10
DIGITS = 10


def per_class_accuracy(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Accuracy of each digit 0-9 (NaN for a digit absent from `labels`)."""
    right = np.bincount(labels[predicted == labels], minlength=DIGITS).astype(float)
    total = np.bincount(labels, minlength=DIGITS).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, right / np.maximum(total, 1), np.nan)


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    confidence: float
    accuracy: float
    count: int


@dataclass(frozen=True)
class Report:
    per_class: np.ndarray
    """accuracy of each digit 0-9 on the test images"""
    ece: float
    bins: list[ReliabilityBin]
    robustness: dict[str, float]
    """accuracy on each kind of the robustness set, and `all`"""

    def metrics(self) -> dict[str, float]:
        """The report as MLflow metrics (a digit absent from the test set is left out)."""
        values = {
            f"test_accuracy_digit_{digit}": float(a)
            for digit, a in enumerate(self.per_class)
            if np.isfinite(a)
        }
        values["test_ece"] = self.ece
        values.update({f"robust_accuracy_{k}": v for k, v in self.robustness.items()})
        return values


def calibration(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, list[ReliabilityBin]]:
    """(ECE, the non-empty bins) of answers given with `confidence`, right where `correct`.
    Bins are equal widths of confidence from 0.1 (the least a top-of-10 answer can have)."""
    edges = np.linspace(0.1, 1.0, BINS + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, BINS - 1)
    bins, gap = [], 0.0
    for b in range(BINS):
        inside = which == b
        count = int(inside.sum())
        if not count:
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        gap += count * abs(conf - acc)
        bins.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), conf, acc, count))
    return gap / max(len(confidence), 1), bins


def robustness(model: nn.Module, device: str, robust: RobustnessSet) -> dict[str, float]:
    """Accuracy on each kind of the robustness set, and on all of it."""
    x = as_tensor(robust.images, device)
    predicted = evaluate(model, x, torch.from_numpy(robust.labels).to(device)).predicted
    right = predicted == robust.labels
    found = {
        kind: float(right[robust.kinds == k].mean())
        for k, kind in enumerate(KINDS)
        if (robust.kinds == k).any()
    }
    found["all"] = float(right.mean()) if len(right) else 0.0
    return found


def report(
    model: nn.Module, device: str, labels: np.ndarray, test: Evaluation, robust: RobustnessSet
) -> Report:
    ece, bins = calibration(test.confidence, test.predicted == labels)
    return Report(
        per_class_accuracy(labels, test.predicted), ece, bins, robustness(model, device, robust)
    )
