"""An image as the model sees it: any PNG or JPEG decoded (a decompression bomb refused
first) and converted the MNIST way, a white digit on black, cropped, scaled to 20 px
and centred by its centre of mass on 28x28. `mnistops predict`, the service and the
check that keeps test images out of feedback all use this one conversion."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnistops.data.images import ImageRefused, open_image
from mnistops.errors import ImageUnusable


def decode(data: bytes, name: str = "image") -> Image.Image:
    """An image's bytes, decoded; a decompression bomb is refused before its pixels are
    decoded. ImageUnusable names `name` and what is wrong."""
    try:
        image = open_image(io.BytesIO(data))
        image.load()
    except ImageRefused as exc:
        raise ImageUnusable(f"{name}: {exc}") from None
    except UnidentifiedImageError:
        raise ImageUnusable(f"{name}: not an image PIL can read (PNG or JPEG expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageUnusable(f"{name}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageUnusable(f"{name}: the image is corrupt or truncated ({exc})") from None
    return image


def image_from_bytes(data: bytes, name: str = "image") -> np.ndarray:
    """A PNG or JPEG's bytes as a 28x28 float32 array, converted the MNIST way: what
    `mnistops predict` does with a file, and the service with an upload."""
    with decode(data, name) as image:
        return mnist_like(upright(image), name)


ORIENTATION_KEYS = frozenset(("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"))
"""where Pillow finds an image's EXIF or XMP orientation (`Image.getexif`)"""


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF or XMP orientation says. A decoded PNG that carries
    neither is used as it is: Pillow's `exif_transpose` would find no orientation in it
    and return a copy, a tenth of a small upload's conversion."""
    if image.format == "PNG" and ORIENTATION_KEYS.isdisjoint(image.info):
        return image
    return ImageOps.exif_transpose(image) or image


def _grayscale(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        return Image.fromarray((array / top * 255).astype(np.uint8))
    return image if image.mode == "L" else image.convert("L")


def _border_median(gray: np.ndarray) -> np.float32:
    """The median of the image's outermost pixels (as `np.median`, in a tenth of its
    time: the border always has an even count, whole numbers, so the mean of its two
    middle values is exact)."""
    border = np.concatenate((gray[0], gray[-1], gray[:, 0], gray[:, -1]))
    middle = len(border) // 2
    low, high = np.partition(border, (middle - 1, middle))[middle - 1 : middle + 1]
    found: np.float32 = (low + high) / np.float32(2)
    return found


def _shift(total: np.floating, weighted: np.floating) -> int:
    """How far the centre of mass moves to the canvas' centre, at most 4 pixels."""
    return min(max(int(round(14 - weighted / total)), -4), 4)


def mnist_like(image: Image.Image, name: str = "image") -> np.ndarray:
    """A 28x28 float32 array in [0, 1], white digit on black, as MNIST draws them.

    Every step works on the few hundred pixels of a digit, so NumPy's and Pillow's
    per-call costs are most of the time (the service converts every upload on its event
    loop): each step is one call where it can be. The sums of the centre of mass are of
    whole numbers below 2**24, so they are exact over the digit as over the canvas, and
    the digit is placed once where the centre of mass puts it (20 px on a 28 px canvas
    moved at most 4 px: no ink wraps, as `np.roll` would have let it)."""
    gray = np.asarray(_grayscale(image), dtype=np.float32)
    background = _border_median(gray)
    if background > 127:
        gray = 255 - gray
        background = 255 - background
    gray = np.maximum(gray - background, 0)  # at most 255: the background is not below 0
    ink = gray > max(gray.max() * 0.2, 1)
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if not len(rows):
        raise ImageUnusable(f"{name}: the image is blank (no digit found)")
    crop = Image.fromarray(gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.uint8))
    scale = 20 / max(crop.size)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    digit = np.asarray(crop.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    by_row, by_column = digit.sum(1), digit.sum(0)
    total = by_row.sum()
    if total > 0:
        top += _shift(total, by_row @ np.arange(top, top + size[1]))
        left += _shift(total, by_column @ np.arange(left, left + size[0]))
    canvas = np.zeros((28, 28), np.float32)
    canvas[top : top + size[1], left : left + size[0]] = digit / 255.0  # 8-bit pixels
    return canvas


def served_pixels(data: bytes, name: str = "image") -> bytes:
    """The 784 bytes the service logs for an upload of `data` (8 bits a pixel)."""
    converted = image_from_bytes(data, name)
    return bytes(np.clip(np.rint(converted * 255.0), 0, 255).astype(np.uint8).tobytes())
