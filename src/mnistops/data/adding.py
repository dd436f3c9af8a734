"""New labelled images merged into the training folders (`mnistops data add`): every
image validated first, and copied all or none."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mnistops.data.folder_guard import dataset_in_use
from mnistops.data.images import (
    DIGITS,
    ImageRefused,
    InvalidDataset,
    check_files_indexed,
    read_regular,
)
from mnistops.data.scan_index import ScanIndex, index_path, remember
from mnistops.settings import Settings

ProgressFor = Callable[[str, int], Callable[[int], None]]


def no_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _k: None


def _remove_from_other_digits(train: Path, digit: str, name: str) -> list[tuple[Path, bytes]]:
    """Remove the image `name` from the other digits' folders; what was removed (path,
    bytes: PNGs of a few hundred bytes), to put back if the add is interrupted."""
    removed = []
    for other in DIGITS:
        path = train / other / name
        if other != digit and path.is_file():
            removed.append((path, path.read_bytes()))
            path.unlink()
    return removed


def _sha256_of(path: Path) -> str:
    try:
        return hashlib.sha256(read_regular(path)).hexdigest()
    except (OSError, ImageRefused):
        return ""


def add_images(
    settings: Settings,
    source: Path,
    progress_for: ProgressFor = no_progress,
    relabel: bool = False,
) -> dict[int, int]:
    """Merge `source/<digit>/*.png` into the training set; validate first, copy all or none.
    Refused while a `data version` (or another `data add`) uses the dataset folder.
    With `relabel`, an image of the same name under another digit is moved: the newer
    label wins (feedback that was corrected again)."""
    with dataset_in_use(settings.mnist_dir, settings.home / "locks", "data add"):
        return _add_images(settings, source, progress_for, relabel)


def _add_images(
    settings: Settings, source: Path, progress_for: ProgressFor, relabel: bool
) -> dict[int, int]:
    problems: list[tuple[Path, str]] = []
    if not source.is_dir():
        raise InvalidDataset([(source, "not a folder of label folders 0-9")])
    found = []
    for entry in sorted(source.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir() or entry.name not in DIGITS:
            problems.append((entry, "expected only label folders 0-9"))
            continue
        found += [p for p in sorted(entry.iterdir()) if not p.name.startswith(".")]
    results = check_files_indexed(found, source, ScanIndex(index_path(settings.home)))
    progress = progress_for("checking", len(found))
    for path, (problem, _sha, _pixels) in zip(found, results, strict=True):
        progress(1)
        if problem:
            problems.append((path, problem))
    hashes = {path: (sha, pixels) for path, (_p, sha, pixels) in zip(found, results, strict=True)}
    train = settings.mnist_dir / "train"
    checked = [path for path, (problem, _s, _p) in zip(found, results, strict=True) if not problem]
    clashes = [
        (p, f"a different image with this name is in {train / p.parent.name}")
        for p in checked
        if (train / p.parent.name / p.name).exists()
        and _sha256_of(train / p.parent.name / p.name) != hashes[p][0]
    ]
    problems += clashes
    if problems:
        raise InvalidDataset(problems)
    added: Counter[int] = Counter()
    copied: list[tuple[Path, str, str]] = []
    removed: list[tuple[Path, bytes]] = []
    copy_progress = progress_for("adding", len(found))
    try:
        for path in found:
            target = train / path.parent.name / path.name
            if relabel:
                removed += _remove_from_other_digits(train, path.parent.name, path.name)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                copied.append((target, *hashes[path]))
                added[int(path.parent.name)] += 1
            copy_progress(1)
    except BaseException:  # Ctrl-C or a full disk: all or none, as promised
        _undo(copied, removed)
        raise
    remember(index_path(settings.home), copied)
    return dict(sorted(added.items()))


def _undo(copied: list[tuple[Path, str, str]], removed: list[tuple[Path, bytes]]) -> None:
    """Take back an interrupted add: the copies go, the relabelled images return."""
    for target, _sha, _pixels in copied:
        target.unlink(missing_ok=True)
    for path, data in removed:
        path.write_bytes(data)
