"""Labelled predictions become training images (`mnistops data add --feedback`).

The labels of /feedback are joined with the logged inputs they name (the latest label
of an image wins), written as 28x28 PNGs named `feedback-<request id>-<item>.png` and
merged into `data/MNIST/train/<digit>/` by the same validation and copy as every other
image (`data add`). An image whose pixels are those of a test image is refused: the
test set stays unseen. So is one whose pixels are those of another training image (or
of another labelled image of the same run): one image never holds two labels. Names
are made of checked hexadecimal ids only.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from mnistops.data import adding, images, scan_index, unseen
from mnistops.data.registry import FEEDBACK_NAME
from mnistops.loop import records
from mnistops.loop.store import read_batches
from mnistops.settings import Settings


@dataclass
class FeedbackAdded:
    """What `data add --feedback` did."""

    labels: int = 0
    added: dict[int, int] = field(default_factory=dict)
    already: int = 0
    moved: int = 0
    """of the added: images already in the training set under another digit (relabelled)"""
    in_test: list[tuple[str, str]] = field(default_factory=list)
    """(image name, the test file it equals)"""
    near_test: list[tuple[str, str, float]] = field(default_factory=list)
    """(image name, the test file it nearly is, RMS grey levels apart)"""
    in_train: list[tuple[str, str]] = field(default_factory=list)
    """(image name, the training image it equals)"""
    same_drawing: list[tuple[str, str]] = field(default_factory=list)
    """(image name, why): one drawing labelled in several requests"""
    unmatched: int = 0
    """labels whose prediction is not in the log (shed, not yet written, or refused)"""
    blank: list[str] = field(default_factory=list)
    """images with nothing drawn (every pixel the same): never training data"""
    logged_twice: list[tuple[str, str]] = field(default_factory=list)
    """(object, why) of an image logged again with other pixels: the first is kept"""
    refused: list[tuple[str, str]] = field(default_factory=list)
    """objects of the log refused (name, why)"""


def image_name(request_id: str, item: int) -> str:
    return f"{FEEDBACK_NAME}{request_id}-{item}.png"


def latest_labels(
    settings: Settings, since: datetime | None
) -> tuple[dict[tuple[str, int], int], list[tuple[str, str]]]:
    """(request id, item) -> the digit of its latest label, and the refused objects."""
    batches = read_batches(settings, records.FEEDBACK_PREFIX, since)
    found: dict[tuple[str, int], tuple[int, int]] = {}
    for table in batches.tables:
        # times as integer milliseconds: turning them into datetimes imports pandas
        millis = table.column("time").cast(pa.int64()).to_pylist()
        columns = table.select(["request_id", "item", "digit"]).to_pydict()
        for stamp, rid, item, digit in zip(millis, *columns.values(), strict=True):
            if (rid, item) not in found or found[(rid, item)][0] <= stamp:
                found[(rid, item)] = (stamp, digit)
    return {key: digit for key, (_t, digit) in found.items()}, batches.refused


Labelled = tuple[dict[tuple[str, int], tuple[int, bytes]], FeedbackAdded]
"""(request id, item) -> (label, 784 input bytes), and the report so far"""


def labelled_pixels(settings: Settings, since: datetime | None) -> Labelled:
    """(request id, item) -> (label, 784 input bytes) of every labelled logged image."""
    labels, refused = latest_labels(settings, since)
    report = FeedbackAdded(labels=len(labels), refused=refused)
    if not labels:
        return {}, report
    logged = read_batches(settings, records.PREDICTIONS_PREFIX, since)
    report.refused += logged.refused
    found: dict[tuple[str, int], tuple[int, bytes]] = {}
    first_in: dict[tuple[str, int], str] = {}
    for name, table in zip(logged.names, logged.tables, strict=True):
        columns = table.select(["request_id", "item", "input"]).to_pydict()
        for rid, item, pixels in zip(*columns.values(), strict=True):
            key = (rid, item)
            if key not in labels:
                continue
            if key in found:
                if found[key][1] != pixels:
                    report.logged_twice.append(
                        (name, f"request {rid} item {item} has other pixels in {first_in[key]}")
                    )
                continue
            found[key] = (labels[key], pixels)
            first_in[key] = name
    report.unmatched = len(labels) - len(found)
    return found, report


def png_of(pixels: bytes) -> bytes:
    image = Image.fromarray(np.frombuffer(pixels, np.uint8).reshape(28, 28), mode="L")
    sink = io.BytesIO()
    image.save(sink, format="PNG")
    return sink.getvalue()


def add_feedback(
    settings: Settings,
    since: datetime | None = None,
    progress_for: adding.ProgressFor | None = None,
    read: Labelled | None = None,
) -> FeedbackAdded:
    """Merge the labelled predictions (from `since` on) into the training folders;
    `read`: what `labelled_pixels` returned for the same `since`, not read again."""
    found, report = read if read is not None else labelled_pixels(settings, since)
    if not found:
        return report
    index = scan_index.index_path(settings.home)
    test_set = test_images(settings)
    test = test_set.hashes()  # as they are and as the service converts them
    train = images.pixel_hashes(settings.mnist_dir / "train", index)
    staging = settings.home / "cache"
    staging.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="feedback-", dir=staging)
    try:
        root = _staged(found, (test, test_set), train, report, folder)
        folders = settings.mnist_dir / "train"
        staged = list(root.rglob("*.png"))
        report.already = sum(
            1 for path in staged if (folders / path.parent.name / path.name).exists()
        )
        report.moved = sum(1 for path in staged if _labelled_otherwise(folders, path))
        if any(root.rglob("*.png")):
            report.added = adding.add_images(
                settings, root, progress_for or adding.no_progress, relabel=True
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return report


def test_images(settings: Settings) -> unseen.TestImages:
    """The test images labelled ones are checked against (kept in the cache while no
    test file changes: the first call converts 10,000 images, about 3 s)."""
    return unseen.test_images(
        settings.mnist_dir / "test", settings.home / "cache" / "test-images.npz"
    )


def _labelled_otherwise(folders: Path, staged: Path) -> bool:
    """Whether the image is in the training set under another digit (relabelled)."""
    digit = staged.parent.name
    return any((folders / str(d) / staged.name).exists() for d in range(10) if str(d) != digit)


def _refuse_near_test(
    drawings: dict[str, list[tuple[str, int, bytes]]],
    test_set: unseen.TestImages,
    report: FeedbackAdded,
) -> None:
    """Take out the drawings that are nearly a test image (re-encoded, resized)."""
    keys = list(drawings)
    candidates = np.array(
        [np.frombuffer(drawings[k][0][2], np.uint8) for k in keys], np.uint8
    ).reshape(-1, 784)
    for key, (twin, rms) in zip(keys, unseen.nearest(test_set, candidates), strict=True):
        if rms <= unseen.NEAR_RMS:
            report.near_test += [(name, str(twin), rms) for name, *_ in drawings.pop(key)]


def _staged(
    found: dict[tuple[str, int], tuple[int, bytes]],
    tests: tuple[dict[str, Path], unseen.TestImages],
    train: dict[str, Path],
    report: FeedbackAdded,
    folder: str,
) -> Path:
    """The labelled images as `folder/<digit>/<name>.png`, less those refused. One
    drawing labelled more than once (sent in several requests) is added once when the
    labels agree, and not at all when they disagree: which one is right is not known."""
    import hashlib

    test, test_set = tests
    drawings: dict[str, list[tuple[str, int, bytes]]] = {}
    for (rid, item), (digit, pixels) in sorted(found.items()):
        name = image_name(rid, item)
        if min(pixels) == max(pixels):
            report.blank.append(name)
            continue
        pixel_hash = hashlib.sha256(pixels).hexdigest()
        twin = test.get(pixel_hash)
        if twin is not None:
            report.in_test.append((name, str(twin)))
            continue
        same = train.get(pixel_hash)
        if same is not None and same.name != name:  # itself: added before, maybe relabelled
            report.in_train.append((name, str(same)))
            continue
        drawings.setdefault(pixel_hash, []).append((name, digit, pixels))
    _refuse_near_test(drawings, test_set, report)
    root = Path(folder)
    for digit in range(10):
        (root / str(digit)).mkdir()
    for copies in drawings.values():
        first, digit, pixels = copies[0]
        labels = sorted({label for _name, label, _pixels in copies})
        if len(labels) > 1:
            names = ", ".join(name for name, _label, _pixels in copies)
            shown = " and ".join(map(str, labels))
            report.same_drawing += [
                (name, f"the same drawing is labelled {shown} ({names})") for name, *_ in copies
            ]
            continue
        report.same_drawing += [
            (name, f"the same drawing as {first}, with the same label") for name, *_ in copies[1:]
        ]
        (root / str(digit) / first).write_bytes(png_of(pixels))
    return root
