"""What a training run sees: a data version decoded once into uint8 arrays.

A version's PNGs are decoded a single time into `<home>/cache/arrays/<content hash>.npz`
(with the SHA-256 of that file beside it); every later run of that version loads the
arrays in well under a second, and epochs read tensors, never PNGs. A cache file that no
longer matches its hash is named, thrown away and rebuilt from the object store.

Each cache file also holds the SHA-256 of every image's file, so a new version decodes
only the images no cached version has: v2.0 after v1.0 its 30,000 new ones, v3.0 after
v2.0 the few the loop labelled.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnistops.data import decoded, decoding, images, manifests, packs, reader, scan_index
from mnistops.settings import Settings

Report = Callable[[str], None]


@dataclass(frozen=True)
class DataSource:
    """Where the images came from: a published version, or an untracked folder."""

    name: str
    """the version tag, or the folder for untracked data"""
    content_hash: str
    uri: str
    commit: str | None = None
    tracked: bool = True


@dataclass
class Arrays:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: DataSource
    subset_of: int | None = None
    """the number of training images of the whole version when this is a share of it"""

    def subset(self, fraction: float, seed: int) -> Arrays:
        """A random share of the training images (the same for the same seed), for `--fast`.

        The test images stay whole, so a fast run's test accuracy compares with any other.
        """
        n = len(self.train_y)
        keep = np.sort(np.random.default_rng(seed).permutation(n)[: max(20, round(n * fraction))])
        return Arrays(
            self.train_x[keep],
            self.train_y[keep],
            self.test_x,
            self.test_y,
            self.source,
            subset_of=self.subset_of or n,
        )


def _cache_dir(settings: Settings) -> Path:
    return settings.home / "cache" / "arrays"


def _decode(data: bytes) -> np.ndarray:
    """A 28x28 PNG's pixels; any other size is refused before decoding (ImageRefused)."""
    with decoding.open_image(io.BytesIO(data), max_pixels=28 * 28) as image:
        if image.format != "PNG" or image.size != (28, 28):
            raise decoding.ImageRefused(f"a {image.format} of {image.size}, not a 28x28 PNG")
        return np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)


DECODE_CHUNK = 2000
"""images a worker process decodes at a time"""


def _decode_all(keys_and_blobs: list[tuple[str, bytes]]) -> np.ndarray:
    """Decode many images on every core, a chunk a process (for 28x28 PNGs a thread pool
    is 2x slower than one thread: GIL hand-offs; two processes take ~0.55x its time)."""
    chunks = [
        keys_and_blobs[i : i + DECODE_CHUNK] for i in range(0, len(keys_and_blobs), DECODE_CHUNK)
    ]
    workers = min(os.cpu_count() or 1, 8)
    if len(chunks) < 2 or workers < 2:
        return _decode_chunk(keys_and_blobs)
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_decode_chunk, chunks)))


def _decode_chunk(keys_and_blobs: list[tuple[str, bytes]]) -> np.ndarray:
    out = np.zeros((len(keys_and_blobs), 28, 28), np.uint8)
    for i, (key, blob) in enumerate(keys_and_blobs):
        try:
            out[i] = _decode(blob)
        except (images.ImageRefused, OSError) as exc:
            raise images.ImageRefused(f"{key}: {exc}; the data was not used") from None
    return out


def _arrays(found: dict[str, np.ndarray], source: DataSource) -> Arrays:
    return Arrays(found["train_x"], found["train_y"], found["test_x"], found["test_y"], source)


def _cached_or_built(
    path: Path, build: Callable[[], dict[str, np.ndarray]], report: Report
) -> dict[str, np.ndarray]:
    try:
        cached = decoded.load(path)
    except (decoded.CacheCorrupt, ValueError, OSError) as exc:
        report(f"data cache: {exc}")
        path.unlink(missing_ok=True)
        cached = None
    if cached is not None:
        return cached
    arrays = build()
    decoded.save(path, arrays)
    return arrays


REUSED_CACHES = 3
"""the newest cache files whose images a new version's arrays reuse"""


class KnownImages:
    """Decoded images of cached versions, by the SHA-256 of their PNG file."""

    def __init__(self) -> None:
        self.sources: list[np.ndarray] = []
        self.rows: dict[bytes, tuple[int, int]] = {}

    def add(self, x: np.ndarray, shas: np.ndarray) -> None:
        """`shas`: one row of 32 bytes per image of `x`."""
        if shas.shape != (len(x), 32) or shas.dtype != np.uint8:
            return
        source = len(self.sources)
        self.sources.append(x)
        raw = shas.tobytes()
        for row in range(len(x)):
            self.rows.setdefault(raw[32 * row : 32 * row + 32], (source, row))

    def fill(self, x: np.ndarray, shas: list[bytes]) -> list[int]:
        """Copy the known images into `x` (one row per sha); the rows left to decode."""
        wanted: dict[int, tuple[list[int], list[int]]] = {}
        missing = []
        for i, sha in enumerate(shas):
            found = self.rows.get(sha)
            if found is None:
                missing.append(i)
            else:
                into, rows = wanted.setdefault(found[0], ([], []))
                into.append(i)
                rows.append(found[1])
        for source, (into, rows) in wanted.items():
            x[into] = self.sources[source][rows]
        return missing


def known_images(cache_dir: Path, needed: set[bytes]) -> KnownImages:
    """The images of the newest cache files (at most REUSED_CACHES, and none after one
    that held nothing new): versions' and what `data ingest` wrote. A file that does not
    match its hash, or from before the hashes were kept, is passed over (its own
    version's load names and rebuilds it)."""
    known = KnownImages()
    files = sorted(
        (p for p in cache_dir.glob("*.npz") if not p.name.endswith(".partial.npz")),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    for path in files[:REUSED_CACHES]:
        if needed.issubset(known.rows):
            break
        try:
            found = decoded.load(path) or {}
        except (decoded.CacheCorrupt, ValueError, OSError):
            continue
        before = len(known.rows)
        for name, shas in found.items():
            x = found.get(name.removesuffix("_sha") + "_x")
            if name.endswith("_sha") and x is not None:
                known.add(x, shas)
        if len(known.rows) == before:
            break  # an older file is not likely to hold what this one did not
    return known


def _split_arrays(
    items: list[tuple[str, str, bytes]], known: KnownImages | None = None
) -> dict[str, np.ndarray]:
    """The arrays of (key, file SHA-256, PNG bytes) items; images `known` has are
    copied, not decoded."""
    known = known or KnownImages()
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        chosen = [item for item in items if item[0].split("/", 1)[0] == split]
        shas = [bytes.fromhex(sha) for _key, sha, _blob in chosen]
        x = np.zeros((len(chosen), 28, 28), np.uint8)
        missing = known.fill(x, shas)
        if missing:
            x[missing] = _decode_all([(chosen[i][0], chosen[i][2]) for i in missing])
        arrays[f"{split}_x"] = x
        arrays[f"{split}_y"] = np.array([int(k.split("/")[1]) for k, _s, _b in chosen], np.int64)
        arrays[f"{split}_sha"] = np.frombuffer(b"".join(shas), np.uint8).reshape(-1, 32)
    return arrays


def _arrays_reusing(
    settings: Settings, items: list[tuple[str, str, bytes]]
) -> dict[str, np.ndarray]:
    needed = {bytes.fromhex(sha) for _key, sha, _blob in items}
    return _split_arrays(items, known_images(_cache_dir(settings), needed))


def load_version(settings: Settings, tag: str, report: Report = lambda _m: None) -> Arrays:
    """The arrays of a published version ('latest' = the newest), fetched through the registry."""
    record = reader.find_record(settings, tag)

    def build() -> dict[str, np.ndarray]:
        rows = sorted(reader.fetch_version(settings, record, "No training started", report=report))
        blobs = reader.image_bytes(settings, rows)
        return _arrays_reusing(
            settings, [(r.key, r.sha256, b) for r, (_k, b) in zip(rows, blobs, strict=True)]
        )

    arrays = _cached_or_built(
        manifests.path_inside(_cache_dir(settings), f"{record.content_hash}.npz"), build, report
    )
    source = DataSource(
        record.tag,
        record.content_hash,
        f"s3://{settings.s3.buckets.dvc}/{packs.VERSIONS_PREFIX}{record.tag}.json",
        record.commit,
    )
    return _arrays(arrays, source)


def load_folder(settings: Settings, folder: Path, report: Report = lambda _m: None) -> Arrays:
    """The arrays of a plain folder of `train/` and `test/` PNGs: untracked data."""
    folder = folder.absolute()
    entries = images.scan(folder, scan_index.index_path(settings.home))
    digest = packs.content_hash(entries)
    arrays = _cached_or_built(
        _cache_dir(settings) / f"{digest}.npz",
        lambda: _arrays_reusing(
            settings, [(e.key, e.sha256, e.path.read_bytes()) for e in sorted(entries, key=_key)]
        ),
        report,
    )
    return _arrays(arrays, DataSource(str(folder), digest, folder.as_uri(), tracked=False))


def _key(entry: images.ImageEntry) -> str:
    return entry.key
