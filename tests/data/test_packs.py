"""The pack format and the working folders, without a store: what `data version` writes
is what `data pull` reads back, and a diff counts images by their bytes."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistops.data import folders, manifests, packs
from mnistops.data.images import ImageEntry
from mnistops.data.registry import changes_between

pytestmark = pytest.mark.unit


def digit_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def dataset(root: Path, per_class: int = 2, offset: int = 0) -> list[ImageEntry]:
    """PNG files in train|test/<digit>/, and their entries as `images.scan` makes them."""
    entries = []
    for split in ("train", "test"):
        for digit in range(10):
            for i in range(per_class):
                data = digit_png(offset + 1000 * (split == "test") + 10 * digit + i)
                path = root / split / str(digit) / f"{i + offset}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                sha = hashlib.sha256(data).hexdigest()
                entries.append(ImageEntry(split, digit, path.name, sha, sha, path))
    return entries


def stored(tmp_path: Path, entries: list[ImageEntry]) -> tuple[packs.ObjectCache, bytes]:
    cache = packs.ObjectCache(tmp_path / "cache")
    locations = packs.build_packs(cache, entries, {})
    return cache, manifests.build_manifest(entries, locations)


def record_for(entries: list[ImageEntry], manifest: bytes) -> packs.VersionRecord:
    rows = manifests.parse_manifest(manifest)
    counts = {s: {str(d): 0 for d in range(10)} for s in ("train", "test")}
    for entry in entries:
        counts[entry.split][str(entry.label)] += 1
    return packs.VersionRecord(
        tag="v1.0",
        message="unit",
        created="2026-11-27T12:00:00+00:00",
        content_hash=packs.content_hash(entries),
        counts=counts,
        files=manifests.dataset_files(packs.md5_bytes(manifest), rows),
        format=packs.FORMAT,
    )


def test_a_manifest_round_trips_through_its_record(tmp_path: Path) -> None:
    entries = dataset(tmp_path / "data")
    cache, manifest = stored(tmp_path, entries)
    record = record_for(entries, manifest)
    again = packs.record_from_json(record.to_json(), "v1.0")
    assert again == record
    rows = manifests.parse_manifest(manifest, again)
    assert sorted(row.key for row in rows) == sorted(e.key for e in entries)
    assert manifests.rows_content_hash(rows) == packs.content_hash(entries)
    manifests.check_rows(rows, cache)
    assert manifests.build_manifest(entries, packs.build_packs(cache, entries, {})) == manifest


def test_a_new_version_packs_only_the_new_images(tmp_path: Path) -> None:
    first = dataset(tmp_path / "data")
    cache = packs.ObjectCache(tmp_path / "cache")
    known = packs.build_packs(cache, first, {})
    second = first + dataset(tmp_path / "data", per_class=1, offset=100)
    locations = packs.build_packs(cache, second, known)
    old_packs = {loc.pack for loc in known.values()}
    new_packs = {locations[e.sha256].pack for e in second if e.sha256 not in known}
    assert new_packs and not new_packs & old_packs


def test_pulled_folders_hold_the_bytes_that_were_published(tmp_path: Path) -> None:
    entries = dataset(tmp_path / "data")
    cache, manifest = stored(tmp_path, entries)
    record = record_for(entries, manifest)
    rows = manifests.parse_manifest(manifest, record)
    target = tmp_path / "pulled"
    folders.materialize(rows, cache, target, record)
    for entry in entries:
        assert (target / entry.key).read_bytes() == entry.path.read_bytes()
    assert folders.read_stamp(target)["content_hash"] == record.content_hash
    assert folders.changed_files(rows, target) == []
    (target / entries[0].key).write_bytes(b"changed")
    assert folders.changed_files(rows, target) == [entries[0].key]


def test_a_failed_pull_leaves_no_half_written_folder(tmp_path: Path) -> None:
    entries = dataset(tmp_path / "data")
    cache, manifest = stored(tmp_path, entries)
    record = record_for(entries, manifest)
    rows = manifests.parse_manifest(manifest, record)
    cache.path(rows[0].pack).unlink()
    with pytest.raises(FileNotFoundError):
        folders.materialize(rows, cache, tmp_path / "pulled", record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data"]


def test_a_diff_counts_images_by_their_bytes(tmp_path: Path) -> None:
    entries = dataset(tmp_path / "data")
    _cache, manifest = stored(tmp_path, entries)
    old = manifests.parse_manifest(manifest)
    renamed = [row._replace(key=row.key.replace(".png", "-renamed.png")) for row in old]
    assert not any(c.added or c.removed for c in changes_between(old, renamed))
    first = next(i for i, row in enumerate(old) if row.key.startswith("train/0/"))
    moved = [*old[:first], old[first]._replace(key="train/9/moved.png"), *old[first + 1 :]]
    changes = {(c.split, c.label): (c.added, c.removed) for c in changes_between(old, moved)}
    assert changes[("train", 9)] == (1, 0) and changes[("train", 0)] == (0, 1)
    assert sum(a + r for a, r in changes.values()) == 2
    fewer = changes_between(old, old[2:])
    assert sum(c.removed for c in fewer) == 2 and sum(c.added for c in fewer) == 0


def test_a_manifest_whose_names_collide_when_folded_is_refused(tmp_path: Path) -> None:
    """Pull refuses a version whose two paths are one file on a disk that folds Unicode
    forms or case: it names both."""
    import gzip
    import json

    rows = [
        ["train/1/caf\u00e9.png", "a" * 64, "b" * 32, 0, 10],
        ["train/1/cafe\u0301.png", "c" * 64, "b" * 32, 10, 10],
    ]
    manifest = gzip.compress(
        json.dumps({"columns": manifests.MANIFEST_COLUMNS, "rows": rows}).encode()
    )
    with pytest.raises(packs.CorruptRecord) as refused:
        manifests.parse_manifest(manifest)
    message = str(refused.value)
    assert "folds case or Unicode forms" in message, message
    assert "caf\u00e9.png" in message and "cafe\u0301.png" in message, message
