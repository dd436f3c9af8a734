"""Keeping the test set unseen: a labelled image from outside (feedback) that is a test
image, or nearly one, never becomes training data.

"Nearly": an upload is converted by the service (crop, scale, centre), and a test image
re-encoded (JPEG, 16-bit PNG) moves by a few grey levels. Each candidate is compared
with every test image as it is and as the service converts it; within NEAR_RMS grey
levels (root mean square over the 784 pixels) it is refused. `bench/unseen.py` measures
it: 16-bit and RGB PNGs of a test image are 0 apart, JPEGs of quality 75-90 a median of
2-5 (95-97 % within NEAR_RMS; the rest have their crop moved by a pixel), while training
images and the demo's drawn digits are 44-49 apart at the median and 13-14 at the
nearest of 300. A test image resized before upload is mostly not caught (13 %: its crop
and scale change): the check stops copies, not a determined forger.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mnistops.data.conversion import eight_bits, images_from_bytes
from mnistops.data.images import ImageRefused, read_regular
from mnistops.errors import ImageUnusable

NEAR_RMS = 10.0
"""grey levels (0-255), root mean square over the pixels: nearer is a copy"""
CHUNK = 256


@dataclass(frozen=True)
class TestImages:
    """The test images' pixels, as they are and as the service converts an upload of
    them: rows `i` and `i + len(paths)` are of `paths[i]`."""

    paths: list[Path]
    pixels: np.ndarray
    """(2N, 784) uint8"""

    def path_of(self, row: int) -> Path:
        return self.paths[row % len(self.paths)]

    def hashes(self) -> dict[str, Path]:
        """SHA-256 of each row's pixels -> its test file."""
        found: dict[str, Path] = {}
        for row, pixels in enumerate(self.pixels):
            found.setdefault(hashlib.sha256(pixels.tobytes()).hexdigest(), self.path_of(row))
        return found


def test_images(folder: Path, cache: Path) -> TestImages:
    """Every usable PNG under `folder/<digit>/`; the arrays are kept in `cache` (.npz)
    while no file changed. The service's conversion runs on CHUNK images at a time, as
    it converts concurrent uploads (each exactly as alone): the 10,000 test images take
    2.5-3 s so, 5-6.5 s one at a time."""
    paths = sorted(folder.glob("[0-9]/*.png"))
    stamps = [_stamp(path) for path in paths]
    cached = _read(cache, stamps)
    if cached is not None:
        return cached
    kept, raw, served = [], [], []
    for start in range(0, len(paths), CHUNK):
        read = []
        for path in paths[start : start + CHUNK]:
            try:
                data = read_regular(path)
                read.append((path, data, _raw_pixels(data)))
            except (ImageUnusable, ImageRefused, OSError, ValueError):
                continue
        converted = images_from_bytes([(data, str(path)) for path, data, _ in read])
        for (path, _data, as_is), as_served in zip(read, converted, strict=True):
            if isinstance(as_served, ImageUnusable):
                continue
            kept.append(path)
            raw.append(as_is)
            served.append(eight_bits(as_served).reshape(784))
    found = TestImages(kept, np.concatenate([np.array(raw), np.array(served)]).reshape(-1, 784))
    _write(cache, found, stamps)
    return found


def nearest(test: TestImages, candidates: np.ndarray) -> list[tuple[Path, float]]:
    """For each (784,) uint8 candidate, the nearest test image and how far it is (RMS
    grey levels)."""
    if not len(test.paths) or not len(candidates):
        return [(Path(), float("inf"))] * len(candidates)
    tests = test.pixels.astype(np.float32)
    norms = (tests**2).sum(axis=1)
    found = []
    for start in range(0, len(candidates), CHUNK):
        chunk = candidates[start : start + CHUNK].reshape(-1, 784).astype(np.float32)
        squared = (chunk**2).sum(axis=1)[:, None] + norms[None, :] - 2 * chunk @ tests.T
        rows = squared.argmin(axis=1)
        for i, row in enumerate(rows):
            rms = float(np.sqrt(max(float(squared[i, row]), 0.0) / 784))
            found.append((test.path_of(int(row)), rms))
    return found


def _raw_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.uint8)
    if pixels.shape != (28, 28):
        raise ValueError("not 28x28")
    return pixels.reshape(784)


def _stamp(path: Path) -> list[object]:
    try:
        info = path.stat()
    except OSError:
        return [str(path), -1, -1]
    return [str(path), info.st_size, info.st_mtime_ns]


def _read(cache: Path, stamps: list[list[object]]) -> TestImages | None:
    try:
        with np.load(cache, allow_pickle=False) as data:
            if json.loads(str(data["stamps"])) != stamps:
                return None
            kept = [Path(p) for p in json.loads(str(data["kept"]))]
            pixels = np.asarray(data["pixels"], np.uint8)
    except (OSError, ValueError, KeyError):
        return None
    if pixels.shape != (2 * len(kept), 784):
        return None
    return TestImages(kept, pixels)


def _write(cache: Path, found: TestImages, stamps: list[list[object]]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.name + ".partial.npz")
    np.savez(
        partial,
        pixels=found.pixels,
        kept=np.array(json.dumps([str(p) for p in found.paths])),
        stamps=np.array(json.dumps(stamps)),
    )
    partial.replace(cache)
