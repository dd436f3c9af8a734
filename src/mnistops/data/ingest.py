"""`mnistops data ingest`: MNIST as labelled PNG folders, the way the tutorial lays them out."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mnistops.data import folder_guard, mnist, scan_index
from mnistops.settings import DatasetSettings, Settings

Progress = Callable[[int], None]


@dataclass(frozen=True)
class IngestResult:
    written: dict[str, int]
    """split -> PNG files written (0 for a split already complete)"""
    root: Path


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG encoding of a 28x28 uint8 image; the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def split_plan(
    data: mnist.Mnist, dataset: DatasetSettings, fast: bool
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """split -> (ids, images, labels). Train takes MNIST's first training images, train_v2
    the next ones, test the test set; ids are the indices in the original files."""

    def size(n: int) -> int:
        return max(10, int(n * dataset.fast_fraction)) if fast and n else n

    train_n, new_n, test_n = (
        size(dataset.train_size),
        size(dataset.new_data_size),
        size(dataset.test_size),
    )
    train_ids = np.arange(0, train_n)
    new_ids = np.arange(dataset.train_size, dataset.train_size + new_n)
    test_ids = np.arange(0, test_n)
    return {
        "train": (train_ids, data.train_images[train_ids], data.train_labels[train_ids]),
        "train_v2": (new_ids, data.train_images[new_ids], data.train_labels[new_ids]),
        "test": (test_ids, data.test_images[test_ids], data.test_labels[test_ids]),
    }


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
    os.replace(tmp, path)


CHUNK = 1000
"""images a worker process writes at a time"""


def write_split(
    folder: Path,
    ids: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    progress: Progress,
    checked: list[tuple[Path, str, str]],
) -> int:
    """Write the PNGs of one split; files already there with the right bytes are kept.

    Appends (path, sha256, pixel hash) of every file to `checked`, so that publishing
    need not decode them again. Many images are encoded and written on every core (the
    PNG encoding is the work: one core wrote 3,700 a second).
    """
    for digit in range(10):
        (folder / str(digit)).mkdir(parents=True, exist_ok=True)
    chunks = [
        (folder, ids[i : i + CHUNK], images[i : i + CHUNK], labels[i : i + CHUNK])
        for i in range(0, len(ids), CHUNK)
    ]
    workers = min(os.cpu_count() or 1, 8)
    if len(ids) < 4 * CHUNK or workers < 2:
        done = (_write_chunk(*chunk) for chunk in chunks)
        return _collect(done, progress, checked)
    with ProcessPoolExecutor(workers) as pool:
        return _collect(pool.map(_write_chunk, *zip(*chunks, strict=True)), progress, checked)


def _collect(
    done: Iterable[tuple[int, list[tuple[Path, str, str]]]],
    progress: Progress,
    checked: list[tuple[Path, str, str]],
) -> int:
    written = 0
    for count, chunk_checked in done:
        written += count
        checked += chunk_checked
        progress(len(chunk_checked))
    return written


def _write_chunk(
    folder: Path, ids: np.ndarray, images: np.ndarray, labels: np.ndarray
) -> tuple[int, list[tuple[Path, str, str]]]:
    """(files written, (path, sha256, pixel hash) of each image) for one chunk."""
    written = 0
    checked = []
    for image_id, pixels, label in zip(ids, images, labels, strict=True):
        path = folder / str(int(label)) / f"{int(image_id)}.png"
        payload = png_bytes(pixels)
        checked.append(
            (
                path,
                hashlib.sha256(payload).hexdigest(),
                hashlib.sha256(pixels.tobytes()).hexdigest(),
            )
        )
        try:
            same = path.stat().st_size == len(payload) and path.read_bytes() == payload
        except FileNotFoundError:
            same = False
        if not same:
            _write_atomic(path, payload)
            written += 1
    return written, checked


def ingest(
    source: Path,
    mnist_dir: Path,
    dataset: DatasetSettings,
    fast: bool = False,
    index_file: Path | None = None,
    progress_for: Callable[[str, int], Progress] = lambda _s, _n: lambda _k: None,
    known_images: Path | None = None,
) -> IngestResult:
    """Verify and decode the IDX files in `source`, then write the three PNG splits.

    The pixels written, with the SHA-256 of each file, go to `known_images` (a cache
    file of `train.data`): a version's first load copies them instead of decoding PNGs.

    Safe to re-run: a file is only rewritten when its bytes differ. Until every split is
    written, a hidden file in `mnist_dir` says so, and publishing refuses the folder; a
    full ingest cut short is finished by a full one only, not by `fast`.
    """
    data = mnist.load(source)
    written = {}
    checked: list[tuple[Path, str, str]] = []
    unfinished = mnist_dir / folder_guard.UNFINISHED_INGEST
    mnist_dir.mkdir(parents=True, exist_ok=True)
    left = unfinished.read_text() if unfinished.is_file() else ""
    # A full ingest cut short is finished only by a full one: --fast writes a share of
    # the images and leaves the others' files as they are (an outside try published the
    # 1,036 test images of a killed ingest after a --fast one).
    still_full = fast and left.startswith("full")
    plan = "full" if not fast or still_full else "fast"
    unfinished.write_text(f"{plan}: `mnistops data ingest` is writing here or was cut short\n")
    decoded: dict[str, np.ndarray] = {}
    for split, (ids, pixels, labels) in split_plan(data, dataset, fast).items():
        first = len(checked)
        written[split] = write_split(
            mnist_dir / split, ids, pixels, labels, progress_for(split, len(ids)), checked
        )
        decoded[f"{split}_x"] = pixels
        decoded[f"{split}_sha"] = np.frombuffer(
            b"".join(bytes.fromhex(sha) for _path, sha, _pixels in checked[first:]), np.uint8
        ).reshape(-1, 32)
    if index_file is not None:
        scan_index.remember(index_file, checked)
    if known_images is not None:
        from mnistops.data import decoded as decoded_images

        decoded_images.save(known_images, decoded)
    if not still_full:
        unfinished.unlink()
    return IngestResult(written=written, root=mnist_dir)


def ingest_mnist(
    settings: Settings,
    source: Path | None = None,
    url: str | None = None,
    fast: bool = False,
    progress_for: Callable[[str, int], Progress] = lambda _s, _n: lambda _k: None,
) -> IngestResult:
    """MNIST as PNG folders under the settings' data dir, from `source` (a folder of the
    four IDX files), a mirror `url` (verified by SHA-256), or the copy shipped with us."""
    import tempfile

    locks = settings.home / "locks"
    with (
        folder_guard.dataset_in_use(settings.mnist_dir, locks, "data ingest"),
        tempfile.TemporaryDirectory() as tmp,
    ):
        folder = source or (mnist.download(url, Path(tmp)) if url else mnist.packaged_dir())
        return ingest(
            folder,
            settings.mnist_dir,
            settings.dataset,
            fast,
            scan_index.index_path(settings.home),
            progress_for,
            settings.home / "cache" / "arrays" / "ingested.npz",
        )
