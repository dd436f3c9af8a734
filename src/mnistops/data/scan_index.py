"""The scan index: what validation learned of each file, so it is not decoded again.

path -> (size, mtime_ns, sha256, pixel hash) of the files that passed validation, in
`<home>/cache/scan-index.json`. Its users (`images.scan`, `images.check_files_indexed`)
take an entry only for a file whose bytes still hash to the recorded SHA-256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class ScanIndex:
    """path -> (size, mtime_ns, sha256, pixel hash) of files that passed validation.

    An entry spares decoding a file, never reading it: its users take it only for a
    file whose bytes still hash to the recorded SHA-256 (a rewrite can keep its size
    and mtime, `touch -r`)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except ValueError:
                self.entries = {}

    def lookup(self, path: Path, stat: os.stat_result) -> tuple[str, str] | None:
        hit = self.entries.get(str(path))
        if hit and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
            return hit[2], hit[3]
        return None

    def remember(self, path: Path, stat: os.stat_result, sha: str, pixels: str) -> None:
        self.entries[str(path)] = [stat.st_size, stat.st_mtime_ns, sha, pixels]

    def save(self, seen: set[str], scanned: list[Path] | None = None) -> None:
        """Keep the entries `seen` now and, when `scanned` folders were scanned, every
        entry of other folders (one index serves the dataset's splits, the folders
        `data add` merges from, such as `train_v2`, and `train --data-dir` folders)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prefixes = tuple(f"{folder}{os.sep}" for folder in scanned or ())
        kept = {
            k: v
            for k, v in self.entries.items()
            if k in seen or (scanned is not None and not k.startswith(prefixes))
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(kept))
        tmp.replace(self.path)


def index_path(home: Path) -> Path:
    """Where the scan index of a state dir lives."""
    return home / "cache" / "scan-index.json"


def remember(index_file: Path, checked: list[tuple[Path, str, str]]) -> None:
    """Record files known to be valid (path, sha256, pixel hash), e.g. just written by ingest."""
    index = ScanIndex(index_file)
    for path, sha, pixels in checked:
        index.remember(path, path.stat(), sha, pixels)
    index.save(set(index.entries))
