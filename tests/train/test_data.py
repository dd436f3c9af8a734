"""A version's PNGs decode to the same arrays on one core or many; a bad one is named."""

from __future__ import annotations

import numpy as np
import pytest

from mnistops.data import images
from mnistops.data.ingest import png_bytes
from mnistops.train import data

pytestmark = pytest.mark.unit


def _blobs(n: int) -> tuple[np.ndarray, list[tuple[str, bytes]]]:
    pixels = np.random.default_rng(1).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return pixels, [(f"train/0/{i}.png", png_bytes(p)) for i, p in enumerate(pixels)]


@pytest.mark.parametrize("cores", [1, 2])
def test_many_images_decode_to_their_pixels_in_order(
    cores: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data.os, "cpu_count", lambda: cores)
    pixels, blobs = _blobs(2 * data.DECODE_CHUNK + 3)
    assert np.array_equal(data._decode_all(blobs), pixels)


def test_a_bad_image_in_a_worker_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.os, "cpu_count", lambda: 2)
    _pixels, blobs = _blobs(2 * data.DECODE_CHUNK + 3)
    blobs[data.DECODE_CHUNK + 5] = ("train/0/bad.png", b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(images.ImageRefused, match="train/0/bad.png: .*the data was not used"):
        data._decode_all(blobs)
