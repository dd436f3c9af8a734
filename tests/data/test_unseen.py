"""The test set a labelled image is checked against, built from known files (no server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistops.data import unseen
from mnistops.data.conversion import served_pixels

pytestmark = pytest.mark.unit


def test_the_test_set_holds_each_image_as_it_is_and_as_the_service_converts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converted a few at a time (CHUNK), each row is what one upload of the file gives
    the service; a file that is not a usable 28x28 image (or one the service refuses:
    nothing drawn) is left out."""
    monkeypatch.setattr(unseen, "CHUNK", 3)
    rng = np.random.default_rng(4)
    folder = tmp_path / "test"
    for digit in range(3):
        (folder / str(digit)).mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            pixels[:6] = 0  # blank rows: the conversion crops and centres
            Image.fromarray(pixels).save(folder / str(digit) / f"{k}.png")
    colour = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(colour, "RGB").save(folder / "1" / "rgb.png")
    Image.new("L", (28, 28), 255).save(folder / "1" / "blank.png")  # nothing drawn
    Image.new("L", (40, 28), 255).save(folder / "2" / "wide.png")  # not 28x28
    (folder / "0" / "broken.png").write_bytes(b"\x89PNG not really")

    found = unseen.test_images(folder, tmp_path / "cache.npz")

    expected = sorted(
        p for p in folder.glob("*/*.png") if p.name not in ("wide.png", "broken.png", "blank.png")
    )
    assert found.paths == expected
    n = len(expected)
    for row, path in enumerate(expected):
        with Image.open(path) as image:
            as_is = np.asarray(image.convert("L"), np.uint8).reshape(784)
        assert (found.pixels[row] == as_is).all(), path
        assert found.pixels[n + row].tobytes() == served_pixels(path.read_bytes()), path
    again = unseen.test_images(folder, tmp_path / "cache.npz")  # from the cache
    assert again.paths == found.paths and (again.pixels == found.pixels).all()
