"""The robustness set and the evaluation a person reads, without services."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnistops.data import mnist
from mnistops.train import robustness
from mnistops.train.evaluation import calibration

pytestmark = pytest.mark.unit


def sha(made: robustness.RobustnessSet) -> str:
    digest = hashlib.sha256()
    for part in (made.images, made.labels, made.kinds):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    data = mnist.load(mnist.packaged_dir())
    return data.test_images[:3000], data.test_labels[:3000].astype(np.int64)


BUILD_ELSEWHERE = """
import hashlib, sys
import numpy as np
from mnistops.data import mnist
from mnistops.train import robustness
data = mnist.load(mnist.packaged_dir())
made = robustness.build(data.test_images[:3000], data.test_labels[:3000].astype(np.int64))
digest = hashlib.sha256()
for part in (made.images, made.labels, made.kinds):
    digest.update(np.ascontiguousarray(part).tobytes())
print(digest.hexdigest())
"""


def test_the_set_is_identical_across_runs(test_images, tmp_path: Path) -> None:
    """Built here, built again, read from the cache, built by another process: the same."""
    images, labels = test_images
    first = robustness.build(images, labels)
    assert sha(first) == sha(robustness.build(images, labels))
    cached = robustness.cached(tmp_path, "t", images, labels)
    assert sha(cached) == sha(first) == sha(robustness.cached(tmp_path, "t", images, labels))
    elsewhere = subprocess.run(
        [sys.executable, "-c", BUILD_ELSEWHERE], capture_output=True, text=True, check=True
    )
    assert elsewhere.stdout.strip() == sha(first)


def test_each_kind_changes_the_images_as_named(test_images) -> None:
    images, labels = test_images
    made = robustness.build(images, labels)
    per_kind = min(robustness.PER_KIND, len(labels))
    assert len(made.labels) == per_kind * len(robustness.KINDS)
    ink = {
        kind: made.images[made.kinds == k].astype(float).sum(axis=(1, 2)).mean()
        for k, kind in enumerate(robustness.KINDS)
    }
    original = images.astype(float).sum(axis=(1, 2)).mean()
    assert ink["thicker"] > 1.3 * original and ink["thinner"] < 0.7 * original
    assert set(np.unique(made.labels)) == set(range(10))
    # turned and shifted images are not the originals (same ink, other places)
    originals = {img.tobytes() for img in images}
    for kind in ("rotated", "shifted"):
        changed = made.images[made.kinds == robustness.KINDS.index(kind)]
        assert not any(img.tobytes() in originals for img in changed), kind


def test_a_damaged_cache_is_built_again(test_images, tmp_path: Path) -> None:
    images, labels = test_images
    good = robustness.cached(tmp_path, "t", images, labels)
    (cache_file,) = tmp_path.glob("t-*.npz")
    cache_file.write_bytes(b"not a numpy file")
    assert sha(robustness.cached(tmp_path, "t", images, labels)) == sha(good)
    assert not list(tmp_path.glob(".t.*")), "no partial file is left"


def test_calibration_error_is_the_gap_between_confidence_and_accuracy() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.1, 1.0, 100_000)
    honest = rng.uniform(size=confidence.size) < confidence
    ece, bins = calibration(confidence, honest)
    assert ece < 0.01 and sum(b.count for b in bins) == confidence.size
    overconfident, _ = calibration(np.full(1000, 0.99), np.arange(1000) < 900)
    assert overconfident == pytest.approx(0.09)
