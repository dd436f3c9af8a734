"""Keeping the test set unseen: how many copies of test images the near-copy check of
`data add --feedback` refuses, and how near legitimate images come to its threshold.

From the shipped MNIST files: every test image written as a PNG (as `data ingest` does),
then 200 of them (every 50th) re-encoded the ways a labeller could upload them (PNG as
16-bit or RGB, JPEG quality 90 and 75, RGB upscaled to 56x56), each converted as the
service converts an upload and compared with `data/unseen.py`: the share refused
(within NEAR_RMS grey levels) and the median distance. Baseline, the same run: 300
digits drawn the demo's way from training images and 300 training images uploaded
unchanged, which must stay above the threshold.
Usage: .venv/bin/python bench/unseen.py
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mnistops.data import mnist, unseen
from mnistops.data.conversion import served_pixels
from mnistops.loop import streams

ENCODINGS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "PNG, 16-bit": lambda im: Image.fromarray(np.asarray(im).astype(np.uint16) * 257),
    "PNG, RGB": lambda im: im.convert("RGB"),
    "JPEG q90": lambda im: im,
    "JPEG q75": lambda im: im,
    "PNG, RGB upscaled to 56x56": lambda im: im.convert("RGB").resize((56, 56)),
}


def write_pngs(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / str(int(label)) / f"{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target)


def upload(image: Image.Image, kind: str) -> bytes:
    sink = io.BytesIO()
    if kind.startswith("JPEG"):
        image.save(sink, format="JPEG", quality=int(kind[-2:]))
    else:
        ENCODINGS[kind](image).save(sink, format="PNG")
    return sink.getvalue()


def distances(test: unseen.TestImages, uploads: list[bytes]) -> np.ndarray:
    served = np.array([np.frombuffer(served_pixels(b), np.uint8) for b in uploads])
    return np.array([rms for _path, rms in unseen.nearest(test, served)])


def row(name: str, found: np.ndarray) -> None:
    refused = (found <= unseen.NEAR_RMS).mean()
    print(
        f"{name:<34} {refused:>8.1%} {np.median(found):>9.1f} {found.min():>8.1f}"
        f" {np.percentile(found, 1):>8.1f}"
    )


def main() -> None:
    data = mnist.load(mnist.packaged_dir())
    with tempfile.TemporaryDirectory(prefix="bench-unseen-") as tmp:
        root = Path(tmp)
        write_pngs(data.test_images, data.test_labels, root / "test")
        write_pngs(data.train_images[:3000], data.train_labels[:3000], root / "train")
        test = unseen.test_images(root / "test", root / "cache.npz")
        picked = test.paths[::50]
        print(f"{len(test.paths)} test images; threshold {unseen.NEAR_RMS:g} grey levels RMS")
        print(f"{'upload':<34} {'refused':>8} {'median':>9} {'min':>8} {'1st pct':>8}")
        for kind in ENCODINGS:
            row(kind, distances(test, [upload(Image.open(p), kind) for p in picked]))
        drawn, _labels = streams.drawn(root / "train", 300)
        as_png = [upload(Image.fromarray(image), "PNG, RGB") for image in drawn]
        row("baseline: demo's drawn digits", distances(test, as_png))
        train = sorted((root / "train").glob("*/*.png"))[:300]
        row("baseline: training images", distances(test, [p.read_bytes() for p in train]))


if __name__ == "__main__":
    main()
