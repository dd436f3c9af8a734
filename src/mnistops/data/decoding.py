"""Opening an image that nobody vouches for (an upload, a file to predict, a dataset's
PNG), before any of its pixels is decoded: PNG and JPEG only, and refused by name when
it declares more pixels than allowed (a decompression bomb) or a JPEG more scans than
its size allows."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from mnistops.errors import BadInput

MAX_PIXELS = 40_000_000
"""larger images are refused before they are decoded (decompression bombs)"""
IMAGE_FORMATS = ("PNG", "JPEG")
"""the formats read (Pillow would also decode GIF, WebP, BMP, TIFF and more: each a
decoder an upload could reach)"""
MAX_JPEG_SCANS = 100
SCAN_PIXELS = 640_000_000
"""A JPEG of more scans than SCAN_PIXELS / its pixels (at least 16, 20 for CMYK; at most
MAX_JPEG_SCANS) is refused before it is decoded: libjpeg writes 6 to 18, and the decoder
passes over every block once a scan (a 786 KB upload of 10,000 empty scans over 36 M
pixels held a decoding thread for 28 s; 99 refinement scans over 36 M pixels 2.5 s; 17
there cost about what an honest image of that size does)"""


class ImageRefused(BadInput, ValueError):
    """A file is not read or not decoded: too large, not a regular file, outside its folder."""


def open_image(source: Path | io.BytesIO, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image opened (not decoded) with PIL; ImageRefused when it declares more than
    `max_pixels` (a decompression bomb is refused before any pixel is decoded)."""
    if isinstance(source, io.BytesIO) and _starts_with(source, PNG_SIGNATURE):
        return _checked(_png(source), max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(source, formats=IMAGE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRefused(f"refused as a decompression bomb ({exc})") from None
    if image.format == "JPEG":
        _check_scans(source, image)
    return _checked(image, max_pixels)


def _check_scans(source: Path | io.BytesIO, image: Image.Image) -> None:
    """ImageRefused for a JPEG of more scans than its size allows (start-of-scan markers: in
    the coded data every 0xFF byte is followed by 0 or a restart marker, so the count
    is exact but for markers hidden in metadata, which only make it larger)."""
    data = source.getvalue() if isinstance(source, io.BytesIO) else source.read_bytes()
    scans = data.count(b"\xff\xda")
    width, height = image.size
    # libjpeg writes 6 scans for grey, 10 for colour, 18 for CMYK
    least = max(16, 5 * len(image.getbands()))
    most = min(MAX_JPEG_SCANS, max(least, SCAN_PIXELS // max(width * height, 1)))
    if scans > most:
        image.close()
        raise ImageRefused(
            f"a JPEG of {scans:,} scans: at most {most} are decoded at {width}x{height} (a"
            " progressive JPEG has about 10; refused before decoding)"
        )


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _starts_with(source: io.BytesIO, signature: bytes) -> bool:
    at = source.tell()
    found = source.read(len(signature)) == signature
    source.seek(at)
    return found


def _png(source: io.BytesIO) -> Image.Image:
    """A PNG in memory opened by Pillow's PNG reader itself: `Image.open` would try the
    formats one by one and set up a warnings filter per call, a fifth of a small
    upload's conversion in the service. Our own size check (below Pillow's bomb limit)
    stands in for Pillow's; what its reader cannot parse is refused as Image.open
    refuses it."""
    try:
        return PngImagePlugin.PngImageFile(source)
    except (SyntaxError, IndexError, TypeError, struct.error, EOFError) as exc:
        raise UnidentifiedImageError(f"cannot identify image file ({exc})") from None


def _checked(image: Image.Image, max_pixels: int) -> Image.Image:
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageRefused(
            f"{width}x{height} pixels is more than the {max_pixels:,} accepted"
            " (refused as a decompression bomb, not decoded)"
        )
    return image
