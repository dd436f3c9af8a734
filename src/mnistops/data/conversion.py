"""An image as the model sees it: any PNG or JPEG decoded (a decompression bomb refused
first) and converted the MNIST way, a white digit on black, cropped, scaled to 20 px
and centred by its centre of mass on 28x28. `mnistops predict`, the service and the
check that keeps test images out of feedback all use this one conversion."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnistops.data.decoding import ImageRefused, open_image
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
    return _one(images_from_bytes([(data, name)]))


STACK_PIXELS = 4_000_000
"""at most this many pixels of uploads are decoded and held at once: a batch of large
uploads is converted in parts, so its memory stays that of a few images"""


def images_from_bytes(uploads: Sequence[tuple[bytes, str]]) -> list[np.ndarray | ImageUnusable]:
    """Many uploads (bytes, name) converted together, each exactly as `image_from_bytes`
    converts it alone, or the ImageUnusable that says why it cannot be: the service
    converts the uploads of concurrent requests in one go."""
    found: dict[int, np.ndarray | ImageUnusable] = {}
    decoded: list[tuple[int, np.ndarray]] = []
    held = 0
    for i, (data, name) in enumerate(uploads):
        try:
            with decode(data, name) as image:
                decoded.append((i, _pixels(_grayscale(upright(image)))))
        except ImageUnusable as exc:
            found[i] = exc
            continue
        held += decoded[-1][1].size
        if held >= STACK_PIXELS:
            found.update(_by_size(decoded, uploads))
            decoded, held = [], 0
    found.update(_by_size(decoded, uploads))
    return [found[i] for i in range(len(uploads))]


def _by_size(
    decoded: list[tuple[int, np.ndarray]], uploads: Sequence[tuple[bytes, str]]
) -> dict[int, np.ndarray | ImageUnusable]:
    """Decoded uploads (their index, pixels) converted, those of one size together."""
    found: dict[int, np.ndarray | ImageUnusable] = {}
    for shape in {pixels.shape for _, pixels in decoded}:
        alike = [(i, pixels) for i, pixels in decoded if pixels.shape == shape]
        stack = np.stack([pixels for _, pixels in alike]) if len(alike) > 1 else alike[0][1][None]
        converted = _mnist_stack(stack, [uploads[i][1] for i, _ in alike])
        found.update(zip([i for i, _ in alike], converted, strict=True))
    return found


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


def _pixels(image: Image.Image) -> np.ndarray:
    """An 8-bit grayscale image's pixels as a (height, width) uint8 array, read from its
    bytes (`np.asarray` builds the same array through the array interface, in twice the
    time of a small upload)."""
    return np.frombuffer(image.tobytes(), np.uint8).reshape(image.height, image.width)


def _border_medians(gray: np.ndarray) -> np.ndarray:
    """The median of each image's outermost pixels (as `np.median`, in a tenth of its
    time: a border always has an even count of whole numbers, so the mean of its two
    middle values is exact)."""
    border = np.concatenate((gray[:, 0], gray[:, -1], gray[:, :, 0], gray[:, :, -1]), axis=1)
    middle = border.shape[1] // 2
    ordered = np.partition(border, (middle - 1, middle), axis=1)
    found: np.ndarray = (ordered[:, middle - 1] + ordered[:, middle].astype(np.float64)) / 2
    return found


def _span(flags: bytes) -> tuple[int, int]:
    """The first and last index of a row's (or column's) ink flags that is set; (-1, -1)
    if none is."""
    return flags.find(1), flags.rfind(1)


SCALED = np.arange(256, dtype=np.float32) / np.float32(255)
"""an 8-bit pixel as the model reads it, for every value: one lookup per digit"""
PLACES = np.arange(20)


def mnist_like(image: Image.Image, name: str = "image") -> np.ndarray:
    """A 28x28 float32 array in [0, 1], white digit on black, as MNIST draws them."""
    return _one(_mnist_stack(_pixels(_grayscale(image))[None], [name]))


def _one(converted: list[np.ndarray | ImageUnusable]) -> np.ndarray:
    if isinstance(converted[0], ImageUnusable):
        raise converted[0]
    return converted[0]


def _mnist_stack(gray: np.ndarray, names: list[str]) -> list[np.ndarray | ImageUnusable]:
    """Same-size 8-bit grayscale images (N, H, W) converted the MNIST way, each as it
    would be alone: the background (the border's median) taken away, the image turned
    white on black when its background is light, the ink (over a fifth of the brightest
    pixel) cropped, scaled to 20 px with Lanczos and placed on 28x28 by its centre of
    mass, moved at most 4 px. Blank images are ImageUnusable, naming `names[i]`.

    Most steps are one NumPy call for all the images: a digit has a few hundred
    pixels, so per-call costs are most of the time. The pixel arithmetic is in whole
    numbers (twice the pixels where a border's median is a half); the sums of the
    centre of mass are of whole numbers, exact in integers, so each image's placement
    is the one it gets alone."""
    background = _border_medians(gray)
    light = background > 127
    doubled = _lifted_twice(gray, background, light)
    most = (doubled.reshape(len(gray), -1).max(1) / 2).astype(np.float32)
    threshold = np.maximum(most * np.float32(0.2), np.float32(1))
    height, width = gray.shape[1:]
    twice = (2 * threshold)[:, None]  # lifted > threshold, as doubled > 2 * threshold
    rows = (doubled.max(2) > twice).tobytes()  # which rows hold ink
    columns = (doubled.max(1) > twice).tobytes()
    np.right_shift(doubled, 1, out=doubled)  # the lifted pixels, their halves dropped
    ink = doubled.astype(np.uint8)
    del doubled
    sheet = Image.frombuffer("L", (width, height * len(gray)), ink, "raw", "L", 0, 1)
    scaled = Image.new("L", (20, 20 * len(gray)))
    boxes: list[tuple[int, int, int, int] | None] = []
    for i in range(len(gray)):
        top, bottom = _span(rows[i * height : (i + 1) * height])
        first, last = _span(columns[i * width : (i + 1) * width])
        if top < 0:
            boxes.append(None)
            continue
        crop = sheet.crop((first, i * height + top, last + 1, i * height + bottom + 1))
        scale = 20 / max(crop.size)
        size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
        scaled.paste(crop.resize(size, Image.Resampling.LANCZOS), (0, 20 * i))
        boxes.append((*size, (28 - size[1]) // 2, (28 - size[0]) // 2))
    return _placed(_pixels(scaled).reshape(-1, 20, 20), boxes, names)


def _lifted_twice(gray: np.ndarray, background: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Twice each pixel's height over its image's background, at least 0, as int16, an
    image with a `light` background turned white on black first: the background (a
    median) is whole or a half, so twice it is whole and the arithmetic is exact, in
    place in 2 bytes a pixel (in float32 it took 8 with its temporary, and turning an
    image 2 more: converting a 5000x8000 photo took 450 MB, 190 MB now)."""
    doubled = gray.astype(np.int16)
    doubled *= 2
    for i in np.flatnonzero(light).tolist():
        np.subtract(510, doubled[i], out=doubled[i])
    twice = np.rint(2 * np.where(light, 255 - background, background)).astype(np.int16)
    doubled -= twice[:, None, None]
    np.maximum(doubled, 0, out=doubled)
    return doubled


def _placed(
    digits: np.ndarray, boxes: list[tuple[int, int, int, int] | None], names: list[str]
) -> list[np.ndarray | ImageUnusable]:
    """Each scaled digit (8-bit, at the top left of its 20x20 in `digits`; its width,
    height and centred place in `boxes`) on a 28x28 canvas, moved to its centre of
    mass; None in `boxes` is a blank image."""
    by_row, by_column = digits.sum(2, dtype=np.int64), digits.sum(1, dtype=np.int64)
    totals = by_row.sum(1).tolist()
    row_mass, column_mass = (by_row @ PLACES).tolist(), (by_column @ PLACES).tolist()
    canvas = np.zeros((len(digits), 28, 28), np.float32)
    found: list[np.ndarray | ImageUnusable] = []
    for i, box in enumerate(boxes):
        if box is None:
            found.append(ImageUnusable(f"{names[i]}: the image is blank (no digit found)"))
            continue
        width, height, top, left = box
        total = totals[i]
        if total > 0:
            top += _shift(total, top * total + row_mass[i])
            left += _shift(total, left * total + column_mass[i])
        canvas[i, top : top + height, left : left + width] = SCALED[digits[i, :height, :width]]
        found.append(canvas[i])
    return found


def _shift(total: int, weighted: int) -> int:
    """How far a centre of mass moves to the canvas' centre, at most 4 pixels."""
    return min(max(int(round(14 - weighted / total)), -4), 4)


def served_pixels(data: bytes, name: str = "image") -> bytes:
    """The 784 bytes the service logs for an upload of `data` (8 bits a pixel)."""
    return bytes(eight_bits(image_from_bytes(data, name)).tobytes())


def eight_bits(converted: np.ndarray) -> np.ndarray:
    """A converted image's pixels as the service logs them: 8 bits a pixel."""
    return np.clip(np.rint(converted * 255.0), 0, 255).astype(np.uint8)
