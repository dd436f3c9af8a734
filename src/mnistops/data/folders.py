"""Working folders: a version written out as PNG folders, all or nothing, with a stamp
that says which version a folder holds."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mnistops.data.manifests import ManifestRow, image_path_problem, path_inside
from mnistops.data.packs import CorruptRecord, ObjectCache, Progress, VersionRecord, shown

STAMP = ".mnistops-version.json"


def read_stamp(target: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((target / STAMP).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def materialize(
    rows: list[ManifestRow],
    cache: ObjectCache,
    target: Path,
    record: VersionRecord,
    progress: Progress = lambda _k: None,
) -> None:
    """Write the version's PNG folders to `target`, all or nothing.

    Files are written into a hidden folder beside `target` and renamed into place at
    the end, so a failure leaves no half-written target.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        packs = {pack: cache.read(pack) for pack in {row.pack for row in rows}}
        for folder in sorted({row.key.rsplit("/", 1)[0] for row in rows}):
            path_inside(staging, folder).mkdir(parents=True, exist_ok=True)
        base = str(staging) + "/"

        def write(chunk: list[ManifestRow]) -> None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            for row in chunk:
                path = base + row.key
                if image_path_problem(row.key) or os.path.normpath(path) != path:
                    raise CorruptRecord(f"'{shown(row.key)}' would leave {target}")
                fd = os.open(path, flags, 0o644)
                try:
                    os.write(fd, memoryview(packs[row.pack])[row.offset : row.offset + row.length])
                finally:
                    os.close(fd)
            progress(len(chunk))

        step = 2000
        with ThreadPoolExecutor(4) as pool:
            for future in [
                pool.submit(write, rows[i : i + step]) for i in range(0, len(rows), step)
            ]:
                future.result()
        stamp = {
            "tag": record.tag,
            "content_hash": record.content_hash,
            "images": len(rows),
            "folders": folder_counts(staging),
        }
        (staging / STAMP).write_text(json.dumps(stamp))
        if target.exists():
            target.rmdir()
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def folder_counts(root: Path) -> dict[str, int]:
    """split/label folder -> number of files in it (names only: no stat per file)."""
    counts = {}
    for split in sorted(os.listdir(root)):
        if (root / split).is_dir():
            for label in sorted(os.listdir(root / split)):
                counts[f"{split}/{label}"] = len(os.listdir(root / split / label))
    return counts


def changed_files(rows: list[ManifestRow], target: Path) -> list[str]:
    """Paths of the manifest missing from `target` or of another size (a quick check)."""
    sizes: dict[str, int] = {}
    for folder in {row.key.rsplit("/", 1)[0] for row in rows}:
        try:
            with os.scandir(target / folder) as entries:
                for entry in entries:
                    sizes[f"{folder}/{entry.name}"] = entry.stat().st_size
        except FileNotFoundError:
            continue
    return [row.key for row in rows if sizes.get(row.key) != row.length]
