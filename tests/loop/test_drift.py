"""Drift as pure logic, on the shipped MNIST images: every shifted stream is flagged in
one window of 250, the unshifted one in none of 40, and each reason names its test."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from mnistops.data import mnist
from mnistops.loop import drift, streams
from mnistops.settings.flow import MonitoringSettings

pytestmark = pytest.mark.unit

CONFIG = MonitoringSettings()


@cache
def shipped() -> mnist.Mnist:
    return mnist.load(mnist.packaged_dir())


@cache
def reference() -> drift.Reference:
    data = shipped()
    return drift.reference_of(data.train_images, data.train_labels, CONFIG.reference_images)


def window_of(images: np.ndarray, digits: np.ndarray, confidence: float = 0.99) -> drift.Window:
    return drift.Window.of_pixels(images.reshape(-1, 784), digits, np.full(len(digits), confidence))


def test_the_unshifted_stream_raises_no_false_alarm_in_10000_answers() -> None:
    data = shipped()
    images = streams.stream(data.test_images, "unshifted", 10_000)
    order = np.random.default_rng([streams.SEED, 0]).permutation(10_000)
    digits = data.test_labels[order].astype(np.int64)
    alarms = [
        start
        for start in range(0, 10_000, 250)
        if drift.judge(
            window_of(images[start : start + 250], digits[start : start + 250]), reference(), CONFIG
        ).drift
    ]
    assert alarms == []


@pytest.mark.parametrize("kind", [k for k in streams.KINDS if k != "unshifted"])
def test_every_shift_is_flagged_in_its_first_250_answers(kind: str) -> None:
    data = shipped()
    images = streams.stream(data.test_images, kind, 250)
    judged = drift.judge(
        window_of(images, data.test_labels[:250].astype(np.int64)), reference(), CONFIG
    )
    assert judged.drift and judged.judged
    assert all("KS statistic" in r or "total variation" in r for r in judged.reasons)
    assert judged.largest_shift is not None and judged.largest_shift.effect >= CONFIG.min_effect


def test_streams_are_the_same_every_time_and_differ_by_kind() -> None:
    test = shipped().test_images[:500]
    assert (streams.stream(test, "rotated", 50) == streams.stream(test, "rotated", 50)).all()
    assert not (streams.stream(test, "rotated", 50) == streams.stream(test, "thick", 50)).all()
    with pytest.raises(ValueError, match="unknown stream"):
        streams.stream(test, "sideways", 5)


def test_a_small_window_is_reported_not_judged() -> None:
    data = shipped()
    few = streams.stream(data.test_images, "inverted", CONFIG.min_predictions - 1)
    judged = drift.judge(window_of(few, np.zeros(len(few), np.int64)), reference(), CONFIG)
    assert not judged.judged and not judged.drift and judged.tests == []


def test_unsure_answers_and_bad_feedback_are_reasons() -> None:
    data = shipped()
    images = streams.stream(data.test_images, "unshifted", 250)
    digits = data.test_labels[:250].astype(np.int64)
    unsure = drift.judge(window_of(images, digits, confidence=0.3), reference(), CONFIG)
    assert any("less than 50% sure" in r for r in unsure.reasons)
    labels = np.arange(30) % 10
    wrong = drift.Window.of_pixels(
        images.reshape(-1, 784), digits, np.full(250, 0.99), labels, (labels + 1) % 10
    )
    judged = drift.judge(wrong, reference(), CONFIG)
    assert judged.feedback == 30 and judged.feedback_accuracy == 0
    assert any("feedback says 0% of 30" in r for r in judged.reasons)
    few = drift.Window.of_pixels(
        images.reshape(-1, 784), digits, np.full(250, 0.99), labels[:5], labels[:5] + 1
    )
    assert not drift.judge(few, reference(), CONFIG).drift


def test_the_predicted_digits_alone_can_be_drift() -> None:
    data = shipped()
    images = streams.stream(data.test_images, "unshifted", 400)
    judged = drift.judge(window_of(images, np.full(400, 7, np.int64)), reference(), CONFIG)
    assert any(r.startswith("predicted digits: total variation") for r in judged.reasons)


def test_features_follow_what_was_done_to_the_image() -> None:
    image = np.zeros((28, 28), np.uint8)
    image[10:18, 12:16] = 255
    moved = np.roll(image, 4, axis=1)
    a, b = drift.features(np.stack([image, moved]))
    names = list(drift.FEATURES)
    assert b[names.index("centre x")] - a[names.index("centre x")] == pytest.approx(4, abs=1e-3)
    assert a[names.index("ink share")] == pytest.approx(32 / 784)
    inverted = drift.features((255 - image)[None])[0]
    assert inverted[names.index("mean intensity")] > 0.9


def test_an_input_sent_again_weighs_once() -> None:
    from mnistops.loop.monitoring import _first_seen

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 784), dtype=np.uint8)
    seen: set[bytes] = set()
    first = _first_seen(images[[0, 1, 0, 2]], seen)
    assert first.tolist() == [True, True, False, True]
    later = _first_seen(images[[2, 3, 3, 4]], seen)
    assert later.tolist() == [False, True, False, True]
