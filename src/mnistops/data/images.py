"""Scan and validate a dataset of labelled PNG folders before anything is recorded.

A dataset is `<root>/<split>/<digit>/<name>.png` for the splits `train` and `test`.
Rules: every file is a PNG that decodes; 28x28, 8-bit grayscale (mode L; other modes
and sizes are refused, not converted); label folders are 0-9; no class is empty; no image
(same pixels) is in both train and test. Files whose size and mtime did not change since
the last scan are not decoded again (an index kept in the state dir).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import UnidentifiedImageError

from mnistops.data.decoding import ImageRefused as ImageRefused
from mnistops.data.decoding import open_image
from mnistops.data.scan_index import ScanIndex
from mnistops.errors import BadInput

VERSION_SPLITS = ("train", "test")
DIGITS = tuple(str(d) for d in range(10))
SHOWN_PROBLEMS = 20
MAX_FILE_BYTES = 64 << 20
"""larger files are refused before they are read"""
DIGIT_FILE_BYTES = 1 << 20
"""a 28x28 grayscale PNG of a dataset takes well under 1 KB; more is not one"""
Progress = Callable[[int], None]


def shown_name(name: str) -> str:
    """A file name safe to print: undecodable bytes as \\xNN, control characters escaped."""
    if name.isprintable():
        return name
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be an image's file name in a dataset, or None.

    Names travel into manifests, git and other machines' file systems: they must be
    valid UTF-8 without control characters, one path component, and a visible .png.
    """
    if not name.isprintable() or "\\" in name or "/" in name:
        return (
            f"the file name '{shown_name(name)}' is not valid UTF-8 or holds a control"
            " character or a slash; rename it"
        )
    if name.startswith(".") or not name.lower().endswith(".png"):
        return f"'{name}' is not a .png file name"
    if len(name.encode()) > 255:
        return "the file name is longer than 255 bytes"
    return None


def read_regular(path: Path, limit: int = MAX_FILE_BYTES, root: Path | None = None) -> bytes:
    """The bytes of a regular file, refused (ImageRefused) when it is a device, pipe,
    socket or folder, larger than `limit`, or (with `root`) reached through a symbolic
    link that leads outside `root`. Checked on the open file, so a file swapped after a
    listing is caught too.

    Read with the size the open file states (+1 to see one that grew), never `limit`
    bytes at once: a read of up to 1 MB allocates (maps) that much for a 300-byte PNG,
    4x the cost of the whole read of 70,000 files."""
    if root is not None and not _stays_inside(path, root):
        raise ImageRefused(f"a symbolic link that leads outside {root} (to {path.resolve()})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except IsADirectoryError:
        raise ImageRefused("a folder, not a file") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRefused("not a regular file (a device, pipe, socket or folder)")
        parts: list[bytes] = []
        total = 0
        want = info.st_size + 1
        while total <= limit and (part := os.read(fd, min(want, limit + 1 - total))):
            parts.append(part)
            total += len(part)
            want = 1 << 16
    finally:
        os.close(fd)
    if total > limit:
        raise ImageRefused(f"larger than the {limit:,} bytes accepted")
    return b"".join(parts)


class InvalidDataset(BadInput):
    def __init__(self, problems: list[tuple[Path, str]]):
        self.problems = problems
        shown = "\n".join(
            f"  {shown_name(str(path))}: {why}" for path, why in problems[:SHOWN_PROBLEMS]
        )
        more = len(problems) - SHOWN_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"the dataset is invalid ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}); nothing was recorded:\n{shown}{tail}"
        )


@dataclass(frozen=True)
class ImageEntry:
    split: str
    label: int
    name: str
    sha256: str
    """of the file's bytes: what is stored"""
    pixels: str
    """sha256 of the decoded pixels: what 'the same image' means"""
    path: Path

    @property
    def key(self) -> str:
        return f"{self.split}/{self.label}/{self.name}"


def check_file(path: Path, root: Path | None = None) -> tuple[str | None, str, str]:
    """(problem or None, sha256 of the bytes, pixel hash) of one file under `root`."""
    problem = name_problem(path.name)
    if problem:
        return problem, "", ""
    try:
        data = read_regular(path, DIGIT_FILE_BYTES, root)
    except ImageRefused as exc:
        return str(exc), "", ""
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})", "", ""
    if not data:
        return "empty file (0 bytes)", "", ""
    problem, pixels = check_image(data)
    return problem, hashlib.sha256(data).hexdigest(), pixels


def _check_many(paths: list[Path], root: Path | None) -> list[tuple[str | None, str, str]]:
    return [check_file(path, root) for path in paths]


def check_files(paths: list[Path], root: Path | None = None) -> list[tuple[str | None, str, str]]:
    """check_file for many files, on every core when there are many."""
    workers = min(os.cpu_count() or 1, 8)
    if len(paths) < 4000 or workers < 2:
        return _check_many(paths, root)
    size = -(-len(paths) // (workers * 4))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(workers) as pool:
        parts = pool.map(_check_many, chunks, [root] * len(chunks))
        return [result for part in parts for result in part]


def check_files_indexed(
    paths: list[Path], root: Path, index: ScanIndex
) -> list[tuple[str | None, str, str]]:
    """check_files, but a regular file inside `root` that `index` knows (size and mtime)
    and whose bytes are still the ones it recorded (SHA-256) is not decoded again: e.g.
    what `data ingest` wrote and `data add` merges. Hashing a 300-byte PNG costs a small
    share of decoding it; size and mtime alone can be kept by a rewrite (`touch -r`)."""
    unknown: list[int] = []
    inside = root.resolve()
    folders: dict[Path, bool] = {}  # a regular file is no link: only its folder can lead out
    results: list[tuple[str | None, str, str] | None] = []
    for path in paths:
        try:
            info = path.lstat()
        except OSError:
            info = None
        if path.parent not in folders:
            folders[path.parent] = path.parent.resolve().is_relative_to(inside)
        hit = (
            index.lookup(Path(os.path.abspath(path)), info)
            if info is not None and stat.S_ISREG(info.st_mode) and folders[path.parent]
            else None
        )
        if hit is not None and _sha256_or_none(path) != hit[0]:
            hit = None  # other bytes under the old size and mtime: validated anew
        if hit is None:
            unknown.append(len(results))
        results.append(None if hit is None else (None, *hit))
    for i, found in zip(unknown, check_files([paths[i] for i in unknown], root), strict=True):
        results[i] = found
    return [found for found in results if found is not None]


def _sha256_or_none(path: Path) -> str | None:
    try:
        return hashlib.sha256(read_regular(path, DIGIT_FILE_BYTES)).hexdigest()
    except (OSError, ImageRefused):
        return None


def check_image(data: bytes) -> tuple[str | None, str]:
    """(problem or None, pixel hash) of one file's bytes."""
    try:
        with open_image(io.BytesIO(data)) as img:
            if img.format != "PNG":
                return f"not a PNG image (it is {img.format})", ""
            if img.size != (28, 28):
                return f"size {img.size[0]}x{img.size[1]}, expected 28x28 (not decoded)", ""
            if img.mode != "L":
                return f"mode {img.mode}, expected 8-bit grayscale (L)", ""
            img.load()
            return None, hashlib.sha256(img.tobytes()).hexdigest()
    except ImageRefused as exc:
        return str(exc), ""
    except UnidentifiedImageError:
        return "not an image (cannot be decoded)", ""
    except (OSError, SyntaxError, ValueError) as exc:
        return f"damaged image: {exc}", ""


def _stays_inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def list_files(root: Path, problems: list[tuple[Path, str]]) -> list[tuple[str, int, Path]]:
    """(split, label, path) of every file, noting misplaced files and folders as problems."""
    found = []
    for split in VERSION_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            problems.append((split_dir, "missing split folder (run `mnistops data ingest`)"))
            continue
        labels = {
            entry.name: entry for entry in os.scandir(split_dir) if not entry.name.startswith(".")
        }
        usable: dict[str, os.DirEntry[str]] = {}
        for name, entry in sorted(labels.items()):
            if entry.is_symlink() and not _stays_inside(Path(entry.path), root):
                problems.append((Path(entry.path), "a symbolic link that leads outside the folder"))
            elif not entry.is_dir():
                problems.append((Path(entry.path), "a file outside the label folders 0-9"))
            elif name not in DIGITS:
                problems.append((Path(entry.path), "label folder must be one of 0-9"))
            else:
                usable[name] = entry
        for digit in DIGITS:
            folder = usable.get(digit)
            files = (
                []
                if folder is None
                else sorted(f.name for f in os.scandir(folder.path) if not f.name.startswith("."))
            )
            if not files:
                problems.append((split_dir / digit, "empty class: no image of this digit"))
            folder_path = split_dir / digit
            found += [(split, int(digit), folder_path / name) for name in files]
    return found


def scan(
    root: Path, index_path: Path | None = None, progress: Progress = lambda _k: None
) -> list[ImageEntry]:
    """Validate the dataset under `root`; raise InvalidDataset naming every offending file."""
    problems: list[tuple[Path, str]] = []
    files = list_files(root, problems)
    index = ScanIndex(index_path)
    entries: list[ImageEntry] = []
    unknown: list[tuple[str, int, Path, os.stat_result | None]] = []
    for split, label, path in files:
        try:
            info: os.stat_result | None = path.lstat()
        except OSError:
            info = None
        regular = info is not None and stat.S_ISREG(info.st_mode)
        known = index.lookup(path, info) if info is not None and regular else None
        if known is not None and _sha256_or_none(path) != known[0]:
            known = None  # other bytes under the old size and mtime: validated anew
        if known is None:
            unknown.append((split, label, path, info))
        else:
            entries.append(ImageEntry(split, label, path.name, known[0], known[1], path))
            progress(1)
    for start in range(0, len(unknown), 8000):
        batch = unknown[start : start + 8000]
        for (split, label, path, info), (problem, sha, pixels) in zip(
            batch, check_files([item[2] for item in batch], root), strict=True
        ):
            if problem or info is None:
                problems.append((path, problem or "cannot be read"))
            else:
                index.remember(path, info, sha, pixels)
                entries.append(ImageEntry(split, label, path.name, sha, pixels, path))
        progress(len(batch))
    problems += _leaks(entries) + _collisions(entries) + _two_labels(entries)
    index.save({str(e.path) for e in entries}, [root / split for split in VERSION_SPLITS])
    if problems:
        raise InvalidDataset(problems)
    return entries


def pixel_hashes(folder: Path, index_path: Path | None = None) -> dict[str, Path]:
    """pixel hash -> file of every valid image under `folder/<digit>/` (the scan index
    spares reading the files it knows); unreadable files are left out."""
    index = ScanIndex(index_path)
    found: dict[str, Path] = {}
    unknown: list[tuple[Path, os.stat_result]] = []
    for digit in DIGITS:
        label = folder / digit
        if not label.is_dir():
            continue
        for entry in sorted(os.scandir(label), key=lambda e: e.name):
            path = Path(entry.path)
            info = path.lstat()
            known = index.lookup(path, info) if stat.S_ISREG(info.st_mode) else None
            if known is not None:
                found.setdefault(known[1], path)
            elif stat.S_ISREG(info.st_mode):
                unknown.append((path, info))
    results = check_files([path for path, _ in unknown], folder)
    for (path, info), (problem, sha, pixels) in zip(unknown, results, strict=True):
        if not problem:
            index.remember(path, info, sha, pixels)
            found.setdefault(pixels, path)
    if unknown:
        index.save(set(index.entries))
    return found


def _collisions(entries: list[ImageEntry]) -> list[tuple[Path, str]]:
    """Names that are one file on a disk that folds case or Unicode forms (macOS,
    Windows): pulled there, one image would silently replace the other."""
    import unicodedata

    first: dict[str, ImageEntry] = {}
    found = []
    for entry in sorted(entries, key=lambda e: e.key):
        folded = unicodedata.normalize("NFC", entry.key).lower()
        other = first.setdefault(folded, entry)
        if other is not entry:
            found.append(
                (
                    entry.path,
                    f"the same name as {shown_name(str(other.path))} on a disk that folds case"
                    f" or Unicode forms (macOS, Windows; written {ascii(entry.name)} and"
                    f" {ascii(other.name)}): rename one",
                )
            )
    return found


def _leaks(entries: list[ImageEntry]) -> list[tuple[Path, str]]:
    """Images whose pixels appear both in train and in test."""
    test = {e.pixels: e for e in entries if e.split == "test"}
    return [
        (e.path, f"the same image is in test: {test[e.pixels].path}")
        for e in entries
        if e.split == "train" and e.pixels in test
    ]


def _two_labels(entries: list[ImageEntry]) -> list[tuple[Path, str]]:
    """Images whose pixels appear under two digits of one split: one of the labels is
    wrong (a digit folder linked to another's, a copy filed twice)."""
    first: dict[tuple[str, str], ImageEntry] = {}
    found = []
    for entry in sorted(entries, key=lambda e: e.key):
        other = first.setdefault((entry.split, entry.pixels), entry)
        if other.label != entry.label:
            found.append(
                (
                    entry.path,
                    f"the same image is {other.path}, labelled {other.label}: keep the one"
                    " with the right label",
                )
            )
    return found


def counts(entries: list[ImageEntry]) -> dict[str, dict[int, int]]:
    """split -> digit -> images"""
    result: dict[str, dict[int, int]] = {}
    for split in VERSION_SPLITS:
        counter = Counter(e.label for e in entries if e.split == split)
        result[split] = {d: counter.get(d, 0) for d in range(10)}
    return result
