"""Is a new model better than the champion beyond noise? Pure statistics, no servers.

Both models are scored on the same test images, so their predictions are paired. Only
the images where exactly one of them is right say anything about which is better:
`new_only` (the new model right, the champion wrong) and `champion_only` (the reverse).
If the two models were equally good, each such image would be either kind with
probability 1/2, so `new_only` would follow Binomial(new_only + champion_only, 1/2).
The exact one-sided McNemar test asks how likely a count this high is under that null:
p = P(X >= new_only). Two accuracies alone cannot tell 3 images of luck from a better
model; the paired test can, because the images both get right or both get wrong cancel.

A model can also be better overall and much worse on one digit, which the users of
that digit would notice; `worst_class` finds the digit whose accuracy drops the most.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

from mnistops.tracking.contract import GATE_TAGS


@dataclass(frozen=True)
class Paired:
    """The paired comparison of a new model's test predictions with the champion's."""

    new_errors: int
    champion_errors: int
    new_only: int
    """images the new model gets right and the champion gets wrong"""
    champion_only: int
    """images the champion gets right and the new model gets wrong"""
    p_value: float
    """exact one-sided McNemar: P(new_only this high or higher | equally good models)"""
    worst_class: int
    worst_class_change: float
    """accuracy change of `worst_class` (new - champion), in points (1 = 1 %)"""

    def summary(self) -> str:
        return (
            f"p {p_text(self.p_value)} (McNemar, {self.new_only} fixed, {self.champion_only}"
            f" broken), errors {self.new_errors} vs {self.champion_errors}, worst digit"
            f" {self.worst_class} {self.worst_class_change:+.2f} points"
        )


def p_text(p_value: float) -> str:
    """'= 0.0123', or '< 1e-300' where the p-value is below what a float holds."""
    return f"= {p_value:.3g}" if p_value > 0 else "< 1e-300"


def mcnemar_p(new_only: int, champion_only: int) -> float:
    """Exact one-sided McNemar p-value that the new model is better (1.0 with no evidence).

    Counted in whole numbers, sum of C(n, k) for k >= new_only over 2**n, each term from
    the one before, then divided once: exact up to that one rounding, 0.0 only where the
    value is below what a float holds, and no SciPy import (about 1 s) in every gate."""
    if new_only < 0 or champion_only < 0:
        raise ValueError(f"counts of images cannot be negative: {new_only}, {champion_only}")
    discordant = new_only + champion_only
    if discordant == 0:
        return 1.0
    term, tail = comb(discordant, new_only), 0
    for k in range(new_only, discordant + 1):
        tail += term
        term = term * (discordant - k) // (k + 1)
    return tail / (1 << discordant)


def paired(labels: np.ndarray, new: np.ndarray, champion: np.ndarray) -> Paired:
    """Compare two prediction vectors over the same labelled test images."""
    if not (len(labels) == len(new) == len(champion)):
        raise ValueError(
            f"paired predictions need one per test image: {len(labels)} labels,"
            f" {len(new)} new, {len(champion)} champion"
        )
    from mnistops.train.evaluation import per_class_accuracy

    new_right, old_right = new == labels, champion == labels
    new_only = int((new_right & ~old_right).sum())
    champion_only = int((old_right & ~new_right).sum())
    change = 100 * (per_class_accuracy(labels, new) - per_class_accuracy(labels, champion))
    change = np.where(np.isnan(change), np.inf, change)
    worst = int(np.argmin(change))
    return Paired(
        new_errors=int((~new_right).sum()),
        champion_errors=int((~old_right).sum()),
        new_only=new_only,
        champion_only=champion_only,
        p_value=mcnemar_p(new_only, champion_only),
        worst_class=worst,
        worst_class_change=float(change[worst]) if np.isfinite(change[worst]) else 0.0,
    )


def judge(
    evidence: Paired, significance: float, max_class_drop: float, margin: float, images: int
) -> tuple[bool, str]:
    """Whether the new model takes `champion`: better beyond noise (p < significance),
    no digit worse by more than `max_class_drop` points, and (if set) a plain accuracy
    gain of at least `margin`. The reason names every rule that fails."""
    failed = []
    if evidence.p_value >= significance:
        failed.append(f"not better beyond noise (needs p < {significance:g})")
    if -evidence.worst_class_change > max_class_drop + 1e-9:  # exactly the limit passes
        failed.append(
            f"digit {evidence.worst_class} got worse by {-evidence.worst_class_change:.2f}"
            f" points (at most {max_class_drop:g} allowed)"
        )
    gain = (evidence.champion_errors - evidence.new_errors) / max(images, 1)
    if margin and gain < margin:
        failed.append(f"test accuracy gain {gain:+.4f} is below champion_margin {margin:g}")
    if failed:
        return False, f"{'; '.join(failed)}: {evidence.summary()}"
    return True, f"better beyond noise: {evidence.summary()}"


def evidence_of(tags: dict[str, str]) -> Paired | None:
    """The gate's evidence as recorded on a version (None for a version never compared
    with a champion, or one whose tags are not what the gate writes)."""
    try:
        (_, p_value, new_errors, champion_errors, new_only, champion_only, worst, change) = (
            tags[key] for key in GATE_TAGS
        )
        return Paired(
            new_errors=int(new_errors),
            champion_errors=int(champion_errors),
            new_only=int(new_only),
            champion_only=int(champion_only),
            p_value=float(p_value),
            worst_class=int(worst),
            worst_class_change=float(change),
        )
    except (KeyError, ValueError):
        return None
