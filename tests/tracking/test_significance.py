"""The champion gate's statistics, without a server, on hand-made prediction vectors."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mnistops.tracking.significance import judge, mcnemar_p, p_text, paired
from mnistops.train.evaluation import per_class_accuracy

pytestmark = pytest.mark.unit

RULES = {"significance": 0.05, "max_class_drop": 0.5, "margin": 0.0}


def exact_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), by counting."""
    return sum(comb(n, i) for i in range(k, n + 1)) / 2**n


@pytest.mark.parametrize(("fixed", "broken"), [(10, 0), (5, 5), (9, 3), (30, 14), (0, 7), (1, 0)])
def test_the_p_value_is_the_exact_binomial_tail(fixed: int, broken: int) -> None:
    assert mcnemar_p(fixed, broken) == pytest.approx(exact_tail(fixed, fixed + broken), rel=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 3000))
@example(1037, 38)  # SciPy gives 0.0 there; the tail is 3.9e-254
def test_the_p_value_agrees_with_scipys_binomial_test(fixed: int, broken: int) -> None:
    """SciPy's binomtest, an implementation nobody here wrote, where it is above underflow."""
    from scipy.stats import binomtest

    if fixed + broken == 0:
        return
    theirs = binomtest(fixed, fixed + broken, 0.5, alternative="greater").pvalue
    ours = mcnemar_p(fixed, broken)
    if theirs > 1e-290:
        assert ours == pytest.approx(theirs, rel=1e-9)
    else:  # SciPy's tail underflows sooner (to 0.0 at times): ours is still the exact one
        assert ours == pytest.approx(exact_tail(fixed, fixed + broken), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(("fixed", "broken"), [(5, -1), (-1, 5)])
def test_a_negative_count_is_refused(fixed: int, broken: int) -> None:
    with pytest.raises(ValueError, match="negative"):
        mcnemar_p(fixed, broken)


def test_no_discordant_image_is_no_evidence() -> None:
    assert mcnemar_p(0, 0) == 1.0


def labels_and_champion(n: int = 10_000, errors: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels, and a champion wrong on `errors` images spread over all digits."""
    labels = np.arange(n) % 10
    champion = labels.copy()
    wrong = np.arange(errors) * (n // errors) + np.arange(errors) % 10
    champion[wrong] = (labels[wrong] + 1) % 10
    return labels, champion


def test_counts_of_a_hand_made_pair() -> None:
    labels = np.array([0, 1, 2, 3, 4, 5])
    new = np.array([0, 1, 2, 3, 9, 9])  # wrong on the last two
    old = np.array([0, 9, 9, 3, 4, 9])  # wrong on 1, 2 and the last
    found = paired(labels, new, old)
    assert (found.new_errors, found.champion_errors) == (2, 3)
    assert (found.new_only, found.champion_only) == (2, 1)
    assert found.p_value == pytest.approx(exact_tail(2, 3))


def test_a_clearly_better_model_moves_champion() -> None:
    labels, champion = labels_and_champion(errors=100)
    new = labels.copy()
    keep_wrong = np.flatnonzero(champion != labels)[:60]  # fixes 40 of the 100
    new[keep_wrong] = champion[keep_wrong]
    found = paired(labels, new, champion)
    assert (found.new_only, found.champion_only) == (40, 0)
    moved, reason = judge(found, **RULES, images=len(labels))
    assert moved, reason
    assert "better beyond noise" in reason and "p = " in reason


def test_an_equal_model_with_noise_does_not() -> None:
    """Three fewer errors, but 20 fixed against 17 broken: luck, not a better model."""
    labels, champion = labels_and_champion(errors=100)
    new = champion.copy()
    wrong = np.flatnonzero(champion != labels)
    new[wrong[:20]] = labels[wrong[:20]]
    right = np.flatnonzero(champion == labels)[::500][:17]
    new[right] = (labels[right] + 3) % 10
    found = paired(labels, new, champion)
    assert (found.new_only, found.champion_only, found.new_errors) == (20, 17, 97)
    assert found.p_value > 0.3
    moved, reason = judge(found, **RULES, images=len(labels))
    assert not moved
    assert "not better beyond noise" in reason and "needs p < 0.05" in reason


def test_a_model_that_loses_a_digit_does_not() -> None:
    """Far fewer errors overall, but digit 7 falls by 1 point: refused, and said so."""
    labels, champion = labels_and_champion(errors=200)  # 20 wrong of each digit
    new = labels.copy()
    sevens = np.flatnonzero((labels == 7) & (champion == 7))[:30]  # 30 of 1,000 sevens
    new[sevens] = 1
    found = paired(labels, new, champion)
    assert found.p_value < 1e-10 and (found.new_errors, found.champion_errors) == (30, 200)
    assert found.worst_class == 7
    assert found.worst_class_change == pytest.approx(-1.0)
    moved, reason = judge(found, **RULES, images=len(labels))
    assert not moved
    assert reason.startswith("digit 7 got worse by")


def test_the_class_drop_limit_is_inclusive_and_configurable() -> None:
    labels, champion = labels_and_champion(errors=200)
    new = labels.copy()
    sevens = np.flatnonzero((labels == 7) & (champion == 7))
    new[sevens[:25]] = 1  # digit 7: champion wrong on 20, new on 25: -0.5 points
    found = paired(labels, new, champion)
    assert found.worst_class == 7 and found.worst_class_change == pytest.approx(-0.5)
    assert judge(found, **RULES, images=len(labels))[0]
    assert not judge(found, 0.05, 0.4, 0.0, images=len(labels))[0]


def test_the_margin_still_applies_to_users_who_set_it() -> None:
    labels, champion = labels_and_champion(errors=100)
    new = labels.copy()  # 100 fewer errors: +1 point
    found = paired(labels, new, champion)
    assert judge(found, 0.05, 0.5, 0.01, images=len(labels))[0]
    moved, reason = judge(found, 0.05, 0.5, 0.02, images=len(labels))
    assert not moved and "champion_margin" in reason


def test_predictions_must_pair_one_to_one() -> None:
    with pytest.raises(ValueError, match="one per test image"):
        paired(np.zeros(5, int), np.zeros(5, int), np.zeros(4, int))


def test_a_digit_absent_from_the_test_set_is_never_the_worst() -> None:
    labels = np.array([0, 0, 1, 1])
    assert np.isnan(per_class_accuracy(labels, labels)[5])
    found = paired(labels, np.array([0, 0, 1, 0]), labels)
    assert found.worst_class == 1 and found.worst_class_change == pytest.approx(-50.0)


def test_every_failing_rule_is_named() -> None:
    labels, champion = labels_and_champion(errors=100)
    new = champion.copy()
    sevens = np.flatnonzero((labels == 7) & (champion == 7))[:5]
    new[sevens] = 1  # five more errors, all sevens: not better, digit 7 -0.5 points
    found = paired(labels, new, champion)
    moved, reason = judge(found, 0.05, 0.4, 0.01, images=len(labels))
    assert not moved
    assert "not better beyond noise" in reason and "digit 7 got worse" in reason
    assert "champion_margin" in reason


def test_a_p_value_below_what_a_float_holds_is_not_shown_as_zero() -> None:
    assert mcnemar_p(5000, 0) == 0.0
    assert p_text(0.0) == "< 1e-300" and p_text(0.0123) == "= 0.0123"
