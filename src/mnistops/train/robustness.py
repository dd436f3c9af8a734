"""A fixed robustness set: test images turned, shifted, thickened and thinned.

Test accuracy says how a model does on images like its training images; users draw
digits that are tilted, off-centre, bolder or thinner. This set measures that, the same
way for every model: it is made from the test images only, by a seeded generator, so the
same test set always gives the same images (cached under `<home>/cache/robustness/`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("rotated", "shifted", "thicker", "thinner")
PER_KIND = 2000
"""test images per kind (the first ones of a seeded order): 8,000 images in all"""
SEED = 20261127
VERSION = 1
"""bumped whenever the recipe below changes, so old caches are not used"""


@dataclass(frozen=True)
class RobustnessSet:
    images: np.ndarray
    """uint8, N x 28 x 28"""
    labels: np.ndarray
    kinds: np.ndarray
    """index into KINDS, per image"""


def rotated(image: np.ndarray, degrees: float) -> np.ndarray:
    turned = Image.fromarray(image).rotate(degrees, resample=Image.Resampling.BILINEAR)
    return np.asarray(turned, dtype=np.uint8)


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Moved by (dy, dx) pixels, the uncovered edge black (no wrap-around)."""
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _neighbours(image: np.ndarray) -> list[np.ndarray]:
    """The image and its copies moved by one pixel right, down, and both (a 2x2 window)."""
    return [image, shifted(image, 0, 1), shifted(image, 1, 0), shifted(image, 1, 1)]


def thicker(image: np.ndarray) -> np.ndarray:
    thick: np.ndarray = np.maximum.reduce(_neighbours(image))
    return thick


def thinner(image: np.ndarray) -> np.ndarray:
    thin: np.ndarray = np.minimum.reduce(_neighbours(image))
    return thin


def build(images: np.ndarray, labels: np.ndarray) -> RobustnessSet:
    """The set for these test images: rotations of 15-30 degrees either way, shifts of
    2-3 pixels, strokes one pixel thicker and thinner; each kind on PER_KIND images."""
    rng = np.random.default_rng(SEED)
    count = min(PER_KIND, len(labels))
    out_images, out_labels, out_kinds = [], [], []
    for kind, name in enumerate(KINDS):
        chosen = np.sort(rng.permutation(len(labels))[:count])
        for i in chosen:
            image = images[i]
            if name == "rotated":
                made = rotated(image, float(rng.uniform(15, 30) * rng.choice([-1, 1])))
            elif name == "shifted":
                dy, dx = (int(rng.integers(2, 4)) * int(rng.choice([-1, 1])) for _ in range(2))
                made = shifted(image, dy, dx)
            elif name == "thicker":
                made = thicker(image)
            else:
                made = thinner(image)
            out_images.append(made)
            out_labels.append(labels[i])
            out_kinds.append(kind)
    return RobustnessSet(
        np.array(out_images, dtype=np.uint8).reshape(-1, 28, 28),
        np.array(out_labels, dtype=np.int64),
        np.array(out_kinds, dtype=np.int64),
    )


def cached(cache_dir: Path, digest: str, images: np.ndarray, labels: np.ndarray) -> RobustnessSet:
    """The set for the test set named `digest`: read from the cache, or built and cached
    (written whole or not at all). A cache file that cannot be read is built again."""
    path = cache_dir / f"{digest}-v{VERSION}.npz"
    try:
        with np.load(path, allow_pickle=False) as saved:
            found = RobustnessSet(saved["images"], saved["labels"], saved["kinds"])
        if found.images.shape[1:] == (28, 28) and len(found.labels) == len(found.images):
            return found
    except (OSError, ValueError, KeyError):
        pass
    made = build(images, labels)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{digest}.", suffix=".npz", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, images=made.images, labels=made.labels, kinds=made.kinds)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return made
