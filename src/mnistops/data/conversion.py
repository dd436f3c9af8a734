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
        return mnist_like(ImageOps.exif_transpose(image) or image, name)


def _grayscale(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        return Image.fromarray((array / top * 255).astype(np.uint8))
    return image.convert("L")


def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


ROWS, COLUMNS = np.indices((28, 28))
"""each pixel's row and column on the canvas, for its centre of mass"""


def mnist_like(image: Image.Image, name: str = "image") -> np.ndarray:
    """A 28x28 float32 array in [0, 1], white digit on black, as MNIST draws them.

    Every step works on the few hundred pixels of a digit, so NumPy's per-call cost is
    most of the time (the service converts every upload on its event loop): the
    border's median is taken once (inverting the image inverts it), the clips are the
    ufuncs, and the canvas' pixel coordinates are computed once."""
    gray = np.asarray(_grayscale(image), dtype=np.float32)
    background = np.median(_border(gray))
    if background > 127:
        gray = 255 - gray
        background = 255 - background
    gray = np.maximum(gray - background, 0)  # at most 255: the background is not below 0
    ink = gray > max(gray.max() * 0.2, 1)
    if not ink.any():
        raise ImageUnusable(f"{name}: the image is blank (no digit found)")
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    crop = Image.fromarray(gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.uint8))
    scale = 20 / max(crop.size)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    digit = np.asarray(crop.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    canvas = np.zeros((28, 28), np.float32)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    canvas[top : top + size[1], left : left + size[0]] = digit
    total = canvas.sum()
    if total > 0:
        dy = int(round(14 - (ROWS * canvas).sum() / total))
        dx = int(round(14 - (COLUMNS * canvas).sum() / total))
        canvas = np.roll(canvas, (min(max(dy, -4), 4), min(max(dx, -4), 4)), axis=(0, 1))
    found: np.ndarray = canvas / 255.0  # 0-255 already: the pixels of an 8-bit image
    return found


def served_pixels(data: bytes, name: str = "image") -> bytes:
    """The 784 bytes the service logs for an upload of `data` (8 bits a pixel)."""
    converted = image_from_bytes(data, name)
    return bytes(np.clip(np.rint(converted * 255.0), 0, 255).astype(np.uint8).tobytes())
