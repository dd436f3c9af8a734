"""Turning any image into an MNIST-like input, and refusing what is not an image."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistops.data import mnist
from mnistops.data.conversion import image_from_bytes, images_from_bytes
from mnistops.errors import ImageUnusable
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


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
def test_a_photo_turned_by_its_exif_orientation_is_read_upright(kind: str) -> None:
    """A phone's photo is stored sideways with an orientation tag; PNGs can carry one too
    (and a PNG without one skips Pillow's look for it)."""
    upright = np.zeros((40, 28), np.uint8)
    upright[6:34, 12:16] = 255  # a tall stroke: a 1
    upright[6:10, 8:16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter left: to be turned a quarter right
    stored, tagged = io.BytesIO(), io.BytesIO()
    Image.fromarray(upright).save(stored, kind, quality=100)
    Image.fromarray(np.rot90(upright)).save(tagged, kind, exif=exif.tobytes(), quality=100)
    as_stored = image_from_bytes(stored.getvalue())
    assert np.abs(image_from_bytes(tagged.getvalue()) - as_stored).max() < 0.1
    untagged = io.BytesIO()
    Image.fromarray(np.rot90(upright)).save(untagged, kind, quality=100)
    assert np.abs(image_from_bytes(untagged.getvalue()) - as_stored).max() > 0.5


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


def empty_scans_jpeg(side: int, scans: int) -> bytes:
    """An attacker's JPEG: a progressive one, then `scans` scans that each code every
    block of the image as empty in a few bytes (a run of end-of-blocks), which the
    decoder still passes over block by block: small to send, long to decode."""
    import struct

    image = Image.new("L", (side, side), 0)
    image.paste(255, (side // 3, side // 3, 2 * side // 3, 2 * side // 3))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=50, progressive=True)
    head = out.getvalue()[:-2]  # without its end-of-image marker
    blocks = ((side + 7) // 8) ** 2
    # an AC table with one code, '0', for symbol 0xE0: a run of 2^14 + 14 bits of blocks
    table = b"\xff\xc4" + struct.pack(">H", 20) + bytes([0x11, 1] + [0] * 15 + [0xE0])
    bits = ("0" + "1" * 14) * ((blocks + 32766) // 32767)
    bits += "1" * (-len(bits) % 8)
    coded = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    scan = b"\xff\xda" + struct.pack(">H", 8) + bytes([1, 1, 0x01, 1, 63, 0]) + coded
    return head + table + scan * scans + b"\xff\xd9"


@pytest.mark.security
@pytest.mark.bad_input
def test_only_png_and_jpeg_are_decoded_and_a_jpeg_of_endless_scans_is_not() -> None:
    """Found by a helper: 10,000 empty scans over 40 M pixels (786 KB) held a decoding
    thread of the service for 28 s. GIF, WebP, BMP and TIFF were decoded too, beyond
    the PNG or JPEG the README names."""
    few = empty_scans_jpeg(64, 20)
    assert image_from_bytes(few, "few.jpg").shape == (28, 28)  # an attacker's, but cheap
    with pytest.raises(ImageUnusable, match=r"many\.jpg: a JPEG of 1,0\d\d scans: at most 100"):
        image_from_bytes(empty_scans_jpeg(64, 1_000), "many.jpg")
    # at 36 M pixels, 99 refinement scans still took 2.5 s (a helper): 17 are decoded there
    with pytest.raises(ImageUnusable, match=r"4\d scans: at most 17 are decoded at 6000x6000"):
        image_from_bytes(empty_scans_jpeg(6_000, 40), "large.jpg")
    for mode in ("L", "RGB", "CMYK"):  # libjpeg's own progressive scans: 6, 10, 18
        honest = io.BytesIO()
        Image.new(mode, (6_320, 6_320), (255,) * len(mode)).save(honest, "JPEG", progressive=True)
        with pytest.raises(ImageUnusable, match="blank"):  # decoded, then found blank
            image_from_bytes(honest.getvalue(), f"{mode}.jpg")
    drawn = Image.fromarray(np.full((28, 28), 255, np.uint8))
    drawn.paste(0, (8, 8, 20, 20))
    for kind in ("GIF", "WEBP", "BMP", "TIFF"):
        out = io.BytesIO()
        drawn.save(out, kind)
        with pytest.raises(ImageUnusable, match="PNG or JPEG expected"):
            image_from_bytes(out.getvalue(), f"digit.{kind.lower()}")


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


CONVERTED_SHA256 = "47651cf2134ed72eea70ac8f00e4b2598f3a09c02d056de3c928bc4a14895860"
"""of the float32 pixels the conversion gave for `conversion_cases` (computed before its
per-call costs were cut, which had to leave every pixel as it was)"""


def conversion_cases(images: np.ndarray) -> Iterator[np.ndarray]:
    """Test images as they are, inverted, as ink drawn in opacity, and resized."""
    yield from images[:300]
    for a in images[300:350]:
        yield 255 - a
        yield np.dstack([a, a, a, 255 - a]).astype(np.uint8)
        yield np.asarray(Image.fromarray(a).resize((97, 131)))


def test_the_conversion_gives_every_pixel_it_always_gave() -> None:
    """Models were trained and judged on what this conversion gives (the service, the
    CLI and the feedback check share it): a change to its pixels must be deliberate."""
    digest = hashlib.sha256()
    for array in conversion_cases(mnist.load(mnist.packaged_dir()).test_images):
        png = io.BytesIO()
        Image.fromarray(array).save(png, "PNG")
        converted = image_from_bytes(png.getvalue())
        assert converted.dtype == np.float32 and converted.shape == (28, 28)
        digest.update(converted.tobytes())
    assert digest.hexdigest() == CONVERTED_SHA256, (
        "the conversion's pixels changed: models trained before would see other images"
    )


def test_uploads_converted_together_are_each_what_it_is_alone() -> None:
    """The service converts the uploads of concurrent requests together: mixed sizes
    and modes, shuffled, in uneven groups, with a corrupt and a blank upload among
    them, each gets the pixels it gets alone (the digest above) or its own refusal."""
    cases = []
    for array in conversion_cases(mnist.load(mnist.packaged_dir()).test_images):
        png = io.BytesIO()
        Image.fromarray(array).save(png, "PNG")
        cases.append(png.getvalue())
    blank = io.BytesIO()
    Image.new("L", (28, 28), 0).save(blank, "PNG")
    uploads = [(data, f"case {i}") for i, data in enumerate(cases)]
    uploads += [(b"not an image", "corrupt"), (blank.getvalue(), "blank")]
    order = np.random.default_rng(7).permutation(len(uploads))
    converted: dict[str, np.ndarray | ImageUnusable] = {}
    start = 0
    for size in [1, 2, 37, 5, 128, 64, 3, 200, len(uploads)]:
        group = [uploads[i] for i in order[start : start + size]]
        converted.update(zip([name for _, name in group], images_from_bytes(group), strict=True))
        start += size
    assert len(converted) == len(uploads)
    digest = hashlib.sha256()
    for i in range(len(cases)):
        found = converted[f"case {i}"]
        assert isinstance(found, np.ndarray), found
        digest.update(found.tobytes())
    assert digest.hexdigest() == CONVERTED_SHA256
    assert "corrupt: not an image PIL can read" in str(converted["corrupt"])
    assert "blank: the image is blank" in str(converted["blank"])


def test_large_uploads_converted_together_are_held_a_few_at_a_time() -> None:
    """Sixteen uploads of a million pixels each converted together are converted in
    parts: NumPy's peak memory stays that of a few images, not of the sixteen (about
    190 MB at once)."""
    import tracemalloc

    digit = mnist.load(mnist.packaged_dir()).test_images[0]
    png = io.BytesIO()
    Image.fromarray(digit).resize((1000, 1000)).save(png, "PNG")
    uploads = [(png.getvalue(), f"upload {i}") for i in range(16)]
    tracemalloc.start()
    try:
        converted = images_from_bytes(uploads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(np.array_equal(c, converted[0]) for c in converted)  # type: ignore[arg-type]
    assert peak < 80 << 20, f"peak {peak >> 20} MB"
