"""A version's PNGs decode to the same arrays on one core or many; a bad one is named;
a new version decodes only the images no cached version holds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from mnistops.data import decoded, images
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


def _items(pixels: np.ndarray, split: str = "train") -> list[tuple[str, str, bytes]]:
    blobs = [png_bytes(p) for p in pixels]
    return [
        (f"{split}/{i % 10}/{i}.png", hashlib.sha256(b).hexdigest(), b) for i, b in enumerate(blobs)
    ]


def test_a_new_version_reuses_the_cached_images_and_decodes_only_the_new(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(2)
    old = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    new = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    first = _items(old) + _items(test, "test")
    decoded.save(tmp_path / "first.npz", data._split_arrays(first))
    # the second version: the old images (their bytes now unreadable: so they can only
    # come from the cache), and new ones that must be decoded
    second = [(k, sha, b"not a png") for k, sha, _b in _items(old)]
    second += [(k.replace(".png", "-new.png"), sha, b) for k, sha, b in _items(new)]
    second += _items(test, "test")
    needed = {bytes.fromhex(sha) for _k, sha, _b in second}
    got = data._split_arrays(second, data.known_images(tmp_path, needed))
    assert np.array_equal(got["train_x"], np.concatenate([old, new]))
    assert np.array_equal(got["test_x"], test)
    assert got["train_sha"].shape == (35, 32)
    # without the cache, the unreadable bytes are decoded and named
    with pytest.raises(images.ImageRefused, match="train/0/0.png"):
        data._split_arrays(second)


def test_a_cache_file_that_does_not_match_its_hash_is_not_reused(tmp_path: Path) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    items = _items(pixels)
    path = tmp_path / "v.npz"
    decoded.save(path, data._split_arrays(items))
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    known = data.known_images(tmp_path, {bytes.fromhex(sha) for _k, sha, _b in items})
    assert known.rows == {}


@pytest.mark.parametrize("sidecar", ["[]", "1", '"x"', '{"sha256": null}', "not json"])
def test_a_damaged_sidecar_is_named_and_the_arrays_rebuilt(tmp_path: Path, sidecar: str) -> None:
    """helper-34: a sidecar of valid JSON that is not an object stopped training with a
    traceback (AttributeError), both for its own version and for any new one."""
    pixels = np.random.default_rng(4).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    items = _items(pixels) + _items(pixels, "test")
    path = tmp_path / "v.npz"
    decoded.save(path, data._split_arrays(items))
    path.with_suffix(".json").write_text(sidecar)
    assert data.known_images(tmp_path, {b"x" * 32}).rows == {}
    said: list[str] = []
    rebuilt = data._cached_or_built(path, lambda: data._split_arrays(items), said.append)
    assert np.array_equal(rebuilt["train_x"], pixels)
    assert said and str(path) in said[0]
