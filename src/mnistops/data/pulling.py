"""`data pull`: a version written out as PNG folders, all or nothing, from the object
store alone (no copy of the registry needed); a folder that holds it already is checked
and left as it is."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnistops.data import folders, packs
from mnistops.data.reader import (
    RegistryError,
    Report,
    VersionRefused,
    cache_of,
    cached_record,
    check_tag,
    fetch_version,
    find_record,
    load_manifest,
    store_client,
)
from mnistops.settings import Settings

ProgressFor = Callable[[str, int], Callable[[int], None]]


def _no_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def _changed_folders(target: Path, stamp: dict[str, Any]) -> list[str]:
    counts = folders.folder_counts(target)
    stamped = stamp["folders"]
    return [f for f in sorted(set(counts) | set(stamped)) if counts.get(f) != stamped.get(f)]


def _check_unchanged(target: Path, record: packs.VersionRecord, changed: list[str]) -> None:
    if changed:
        raise VersionRefused(
            f"{target} holds {record.tag} but it was changed (first difference: {changed[0]});"
            " remove the folder and pull again"
        )


@dataclass(frozen=True)
class PullResult:
    record: packs.VersionRecord
    target: Path
    images: int
    downloaded: int
    already_there: bool


def _check_writable(target: Path) -> None:
    """A pull target must be a folder, or a new one in a folder that can be written."""
    if target.exists() and not target.is_dir():
        raise VersionRefused(f"{target} is not a folder: pull into a folder (--to DIR)")
    parent = next((p for p in target.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise VersionRefused(f"{target}: cannot make a folder there ({parent} is not writable)")


def pull(
    settings: Settings,
    tag: str,
    target: Path,
    progress_for: ProgressFor = _no_progress,
    verify: bool = False,
    report: Report = lambda _m: None,
) -> PullResult:
    """Write exactly that version as PNG folders into `target` (all or nothing).

    A target that already holds the version is left as it is after a quick check (the
    number of files per folder). When this machine has seen the tag's record before,
    that check needs no network at all: a published tag names one content hash.
    `verify` re-reads the record from the object store and checks every file's
    presence and size instead.
    """
    check_tag(tag)
    _check_writable(target)
    stamp = folders.read_stamp(target)
    known = cached_record(settings, tag) if tag != "latest" and not verify else None
    if known and stamp and stamp.get("content_hash") == known.content_hash and "folders" in stamp:
        _check_unchanged(target, known, _changed_folders(target, stamp))
        return PullResult(known, target, stamp["images"], 0, True)
    client = store_client(settings)
    record = find_record(settings, tag, client)
    cache = cache_of(settings)
    if stamp and stamp.get("content_hash") == record.content_hash:
        if verify or "folders" not in stamp:
            rows = load_manifest(settings, record, client)
            _check_unchanged(target, record, folders.changed_files(rows, target))
        else:
            _check_unchanged(target, record, _changed_folders(target, stamp))
        return PullResult(record, target, stamp["images"], 0, True)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise VersionRefused(
            f"{target} exists and is not empty; pull into a new folder or remove it first"
        )
    missing = [m for m in record.files.values() if not cache.has(m)]
    rows = fetch_version(
        settings,
        record,
        f"Nothing was written to {target}",
        client,
        progress_for("downloading", len(record.files)),
        report,
    )
    try:
        folders.materialize(rows, cache, target, record, progress_for("writing PNGs", len(rows)))
    except OSError as exc:
        raise RegistryError(
            f"cannot write {record.tag} into {target}: {exc.strerror or exc}; nothing was"
            " written there"
        ) from None
    return PullResult(record, target, len(rows), len(missing), False)
