"""Turning any image into an MNIST-like input, and refusing what is not an image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistops.data import mnist
from mnistops.predict import MAX_PIXELS, PredictError, load_images, mnist_like

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    return mnist.load(mnist.packaged_dir()).test_images[0]


def test_an_mnist_image_stays_close_to_itself(digit: np.ndarray) -> None:
    converted = mnist_like(Image.fromarray(digit))
    assert converted.shape == (28, 28) and converted.dtype == np.float32
    assert np.abs(converted - digit / 255.0).mean() < 0.08


def test_a_big_dark_on_light_colour_photo_becomes_the_same_digit(digit: np.ndarray) -> None:
    big = Image.fromarray(255 - digit).resize((280, 280), Image.Resampling.BILINEAR)
    photo = Image.merge("RGB", (big, big, big))
    converted = mnist_like(photo)
    reference = mnist_like(Image.fromarray(digit))
    assert np.corrcoef(converted.ravel(), reference.ravel())[0, 1] > 0.9


def test_transparent_png_is_drawn_on_white(digit: np.ndarray) -> None:
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = digit
    converted = mnist_like(Image.fromarray(rgba, "RGBA"))
    assert np.corrcoef(converted.ravel(), mnist_like(Image.fromarray(digit)).ravel())[0, 1] > 0.9


@pytest.mark.bad_input
def test_blank_image_is_refused() -> None:
    with pytest.raises(PredictError, match="blank"):
        mnist_like(Image.new("L", (28, 28), 255), "white.png")


@pytest.mark.bad_input
def test_unreadable_files_are_named(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    for path, reason in (
        (text, "not an image"),
        (truncated, "corrupt or truncated"),
        (tmp_path / "missing.png", "no such file"),
    ):
        with pytest.raises(PredictError, match=reason) as caught:
            load_images([path])
        assert str(path) in str(caught.value)


@pytest.mark.bad_input
def test_a_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    side = int(MAX_PIXELS**0.5) + 100
    bomb = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 2_000_000
    with pytest.raises(PredictError, match="bomb|more than"):
        load_images([bomb])


@pytest.mark.security
@pytest.mark.bad_input
def test_a_file_name_with_control_characters_is_refused_escaped(tmp_path: Path) -> None:
    import os

    good = tmp_path / "good.png"
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(good)
    for raw in (b"e\x1b]0;PWNED\x07\x1b[2Jx.png", b"\xff\xfe.png"):
        named = Path(os.fsdecode(bytes(tmp_path) + b"/" + raw))
        named.write_bytes(good.read_bytes())
        with pytest.raises(PredictError, match="not valid UTF-8 or holds a control") as caught:
            load_images([named])
        assert "\x1b" not in str(caught.value) and "\udcff" not in str(caught.value)
