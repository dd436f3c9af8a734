"""Decoded images kept as cache files: uint8 arrays in an `.npz`, with the SHA-256 of the
file beside it (`<name>.json`), written whole or not at all. `train.data` keeps a
version's arrays this way, `data ingest` the pixels it wrote: with each image's file
SHA-256 (`<split>_sha`), a new version copies images it would otherwise decode."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mnistops.errors import MnistopsError


class CacheCorrupt(MnistopsError):
    pass


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a cache file (and its SHA-256 beside it) whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")  # one per process
    np.savez(partial, allow_pickle=False, **arrays)
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({"sha256": file_sha256(partial)}))
    os.replace(partial, path)


def load(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, None if absent; CacheCorrupt if the file does not match its hash."""
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        return None
    try:
        expected = json.loads(sidecar.read_text())
    except ValueError:
        expected = None
    if not isinstance(expected, dict) or file_sha256(path) != expected.get("sha256"):
        raise CacheCorrupt(f"{path} does not match its SHA-256; rebuilding it")
    with np.load(path) as data:
        return {name: data[name] for name in data.files}
