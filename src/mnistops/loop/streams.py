"""Deterministic streams of digits as users might send them, made from test images:
unshifted, turned 20-40 degrees, with thick strokes, inverted (white paper, black ink)
and off-centre. `bench/drift.py` and the tests send them through the service to see
when monitoring flags each shift. The demo's loop stage sends `drawn` digits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mnistops.train import robustness

KINDS = ("unshifted", "rotated", "thick", "inverted", "off-centre")
SEED = 20261203


def stream(images: np.ndarray, kind: str, n: int, seed: int = SEED) -> np.ndarray:
    """(n, 28, 28) uint8: test images in a seeded order (repeated if there are fewer),
    changed the way `kind` says."""
    if kind not in KINDS:
        raise ValueError(f"unknown stream {kind!r}: one of {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    order = rng.permutation(len(images))
    picked = images[np.resize(order, n)]
    return np.stack([_changed(image, kind, rng) for image in picked]).astype(np.uint8)


def _changed(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "rotated":
        return robustness.rotated(image, float(rng.uniform(20, 40) * rng.choice([-1, 1])))
    if kind == "thick":
        return robustness.thicker(robustness.thicker(image))
    if kind == "inverted":
        return 255 - image
    if kind == "off-centre":
        dy, dx = (int(rng.integers(4, 7)) * int(rng.choice([-1, 1])) for _ in range(2))
        return robustness.shifted(image, dy, dx)
    return image


def drawn(folder: Path, n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 digits as if drawn on the page with a thick pen, and their
    labels: images of `folder/<digit>/*.png` in a seeded order, strokes made thicker.
    The demo draws them from training images, never test images: what the service sees
    may become training data, and the test set must stay unseen."""
    paths = sorted(folder.glob("[0-9]/*.png"))
    if not paths:
        raise ValueError(f"no images in {folder}/<digit>/")
    rng = np.random.default_rng([seed, len(KINDS)])
    picked = [paths[i] for i in np.resize(rng.permutation(len(paths)), n)]
    images = np.stack(
        [_changed(np.asarray(Image.open(p).convert("L")), "thick", rng) for p in picked]
    )
    return images.astype(np.uint8), np.array([int(p.parent.name) for p in picked])
