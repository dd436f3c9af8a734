"""Drift, as pure logic: a window of logged answers against the champion's training data.

The inputs are compared through eight statistics of each image's pixels (how much ink,
where its centre is, how far it spreads, its slant, how much touches the border). They
need no model, take a millisecond per thousand images, and each shift a digit can go
through moves at least one of them a long way (`bench/drift.py` measures it). Each is
compared by a two-sample Kolmogorov-Smirnov test; the predicted digits by a chi-square
test against what the champion predicts on its test images (or the training labels).
A test flags drift only when it is both significant (p below `alpha` divided by the
number of tests) and large (`min_effect`): with thousands of answers a window would
otherwise flag differences too small to matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mnistops.settings.flow import MonitoringSettings

FEATURES = (
    "mean intensity",
    "ink share",
    "centre x",
    "centre y",
    "spread x",
    "spread y",
    "slant",
    "ink at the border",
)


def features(pixels: np.ndarray) -> np.ndarray:
    """(N, 8) statistics of (N, 784) or (N, 28, 28) 8-bit images, in FEATURES' order."""
    x = np.asarray(pixels, np.float32).reshape(-1, 28, 28) / 255.0
    axis = np.arange(28, dtype=np.float32)
    mass = x.sum(axis=(1, 2)) + 1e-6
    rows, cols = x.sum(axis=2), x.sum(axis=1)
    cy, cx = rows @ axis / mass, cols @ axis / mass
    var_y = np.maximum(rows @ axis**2 / mass - cy**2, 1e-6)
    var_x = np.maximum(cols @ axis**2 / mass - cx**2, 1e-6)
    cov = np.einsum("nij,i,j->n", x, axis, axis) / mass - cx * cy
    inner = x[:, 3:25, 3:25].sum(axis=(1, 2))
    return np.stack(
        [
            x.mean(axis=(1, 2)),
            (x > 0.5).mean(axis=(1, 2)),
            cx,
            cy,
            np.sqrt(var_x),
            np.sqrt(var_y),
            cov / np.sqrt(var_x * var_y),
            (mass - inner) / mass,
        ],
        axis=1,
    )


@dataclass(frozen=True)
class Test:
    """One comparison: what, its effect size and p-value, and whether it flags drift."""

    name: str
    effect: float
    p_value: float
    flagged: bool


@dataclass(frozen=True)
class Window:
    """What a window of the log holds, as monitoring needs it (the inputs as their
    `features`: a long window is read one batch at a time, its pixels never all held)."""

    features: np.ndarray
    """(N, 8) statistics of the inputs, in FEATURES' order"""
    digits: np.ndarray
    confidences: np.ndarray
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """digits given through /feedback for answers in the window"""
    labelled_predicted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """what the model had answered for those"""
    versions: dict[str, int] = field(default_factory=dict)
    """answers per model version that gave them"""

    @classmethod
    def of_pixels(
        cls,
        pixels: np.ndarray,
        digits: np.ndarray,
        confidences: np.ndarray,
        labels: np.ndarray | None = None,
        labelled_predicted: np.ndarray | None = None,
    ) -> Window:
        none = np.zeros(0, np.int64)
        return cls(
            features(pixels),
            digits,
            confidences,
            none if labels is None else labels,
            none if labelled_predicted is None else labelled_predicted,
        )


@dataclass(frozen=True)
class Reference:
    """The champion's training data, as monitoring compares with it."""

    features: np.ndarray
    digit_share: np.ndarray
    """(10,) share of each digit the answers are expected to have"""
    digits_from: str = "the training labels"


@dataclass
class Judgement:
    """The figures of a window and why it is drift, if it is."""

    predictions: int
    tests: list[Test]
    digit_share: np.ndarray
    low_confidence_share: float
    feedback: int
    feedback_accuracy: float | None
    judged: bool
    """False when the window had fewer than `min_predictions` answers"""
    reasons: list[str]

    @property
    def drift(self) -> bool:
        return bool(self.reasons)

    @property
    def largest_shift(self) -> Test | None:
        inputs = [t for t in self.tests if t.name in FEATURES]
        return max(inputs, key=lambda t: t.effect) if inputs else None


def reference_of(pixels: np.ndarray, labels: np.ndarray, limit: int, seed: int = 0) -> Reference:
    """A fixed random sample of at most `limit` training images, and the labels' shares."""
    n = len(labels)
    keep = np.sort(np.random.default_rng(seed).permutation(n)[: min(limit, n)])
    share = np.bincount(np.asarray(labels, np.int64), minlength=10)[:10] / max(n, 1)
    return Reference(features(pixels[keep]), share.astype(np.float64))


def judge(window: Window, reference: Reference, config: MonitoringSettings) -> Judgement:
    """The tests of a window against the reference, and its reasons to be drift."""
    n = len(window.digits)
    share = np.bincount(window.digits.astype(np.int64), minlength=10)[:10] / max(n, 1)
    unsure = float((window.confidences < config.low_confidence).mean()) if n else 0.0
    labelled = len(window.labels)
    accuracy = float((window.labels == window.labelled_predicted).mean()) if labelled else None
    judged = n >= config.min_predictions
    tests = _tests(window, reference, config) if judged else []
    reasons = [
        f"{t.name}: {'KS statistic' if t.name in FEATURES else 'total variation'}"
        f" {t.effect:.2f}, p = {t.p_value:.2g}"
        for t in tests
        if t.flagged
    ]
    if judged and unsure > config.max_low_confidence_share:
        reasons.append(
            f"{unsure:.0%} of the answers are less than {config.low_confidence:.0%} sure"
            f" (more than {config.max_low_confidence_share:.0%})"
        )
    if (
        accuracy is not None
        and labelled >= config.min_feedback
        and accuracy < config.min_feedback_accuracy
    ):
        reasons.append(
            f"the feedback says {accuracy:.0%} of {labelled} labelled answers were right"
            f" (below {config.min_feedback_accuracy:.0%})"
        )
    return Judgement(n, tests, share, unsure, labelled, accuracy, judged, reasons)


def _tests(window: Window, reference: Reference, config: MonitoringSettings) -> list[Test]:
    from scipy import stats

    found = window.features
    bonferroni = config.alpha / (len(FEATURES) + 1)
    tests = []
    for i, name in enumerate(FEATURES):
        result = stats.ks_2samp(found[:, i], reference.features[:, i])
        effect, p = float(result.statistic), float(result.pvalue)
        tests.append(Test(name, effect, p, p < bonferroni and effect >= config.min_effect))
    tests.append(_digits_test(window.digits, reference.digit_share, bonferroni, config))
    return tests


def _digits_test(
    digits: np.ndarray, expected: np.ndarray, threshold: float, config: MonitoringSettings
) -> Test:
    """Chi-square of the predicted digits against the expected shares."""
    from scipy import stats

    counts = np.bincount(digits.astype(np.int64), minlength=10)[:10].astype(np.float64)
    wanted = np.maximum(expected, 1e-9) / np.maximum(expected, 1e-9).sum() * counts.sum()
    p = float(stats.chisquare(counts, wanted).pvalue)
    variation = float(np.abs(counts / counts.sum() - expected).sum() / 2)
    return Test("predicted digits", variation, p, p < threshold and variation >= config.min_effect)
