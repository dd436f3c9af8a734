"""Reading a published version: its record, its objects and its manifest, checked.

What `data pull` (into PNG folders), training (into arrays) and `data diff` share: the
record is found in the object store ('latest' = the newest), every object of the version
is brought into this machine's cache and checked against its MD5 (a corrupt cached copy
is fetched again), and the manifest is parsed and its rows checked against the packs
before any image is used. A store that cannot be reached is explained the same way for
every reader. Nothing here writes outside the state dir's caches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnistops.clients import s3_client
from mnistops.data import manifests, packs, remote
from mnistops.errors import BadInput, MnistopsError
from mnistops.settings import Settings

Report = Callable[[str], None]
Progress = Callable[[int], None]


class RegistryError(MnistopsError):
    """A version cannot be made, found or fetched; the message says what to do."""


class VersionRefused(RegistryError, BadInput):
    """What the command was given cannot be used: a bad or unknown tag, a tag that exists
    already, a dataset identical to the last version, a target folder that is not empty."""


def cache_of(settings: Settings) -> packs.ObjectCache:
    return packs.ObjectCache(settings.home / "cache" / "objects")


def bucket_of(settings: Settings) -> str:
    return settings.s3.buckets.dvc


def store_client(settings: Settings) -> remote.S3Client:
    return s3_client(settings)


def version_listing(settings: Settings) -> remote.Listing:
    """The valid published versions, and a message for each record that is not valid."""
    return remote.list_records(store_client(settings), bucket_of(settings))


def list_versions(settings: Settings) -> list[packs.VersionRecord]:
    return version_listing(settings).records


def check_tag(tag: str) -> None:
    """A tag typed by a user (or 'latest'): RegistryError if it cannot name a version."""
    problem = None if tag == "latest" else packs.tag_problem(tag)
    if problem:
        raise VersionRefused(problem)


def find_record(
    settings: Settings, tag: str, client: remote.S3Client = None
) -> packs.VersionRecord:
    """The record of `tag` (or of the newest version: 'latest') read from the object store."""
    check_tag(tag)
    client = client or store_client(settings)
    if tag == "latest":
        records = remote.list_records(client, bucket_of(settings)).records
        if not records:
            raise VersionRefused("no data version is published yet (`mnistops data version v1.0`)")
        found: packs.VersionRecord | None = records[-1]
    else:
        found = remote.read_record(client, bucket_of(settings), tag)
    if found is None:
        known = [r.tag for r in remote.list_records(client, bucket_of(settings)).records]
        raise VersionRefused(
            f"no data version '{tag}' in s3://{bucket_of(settings)} at {settings.s3_endpoint}"
            f" (published: {', '.join(known) or 'none'})"
        )
    remember_record(settings, found)
    return found


def _records_dir(settings: Settings) -> Path:
    return settings.home / "cache" / "versions"


def _record_file(settings: Settings, tag: str) -> Path:
    check_tag(tag)
    return manifests.path_inside(_records_dir(settings), f"{tag}.json")


def remember_record(settings: Settings, record: packs.VersionRecord) -> None:
    """Keep the record of a tag this machine has read or published (for offline no-op pulls)."""
    target = _record_file(settings, record.tag)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{record.tag}.json.partial")
    partial.write_text(record.to_json())
    os.replace(partial, target)


def cached_record(settings: Settings, tag: str) -> packs.VersionRecord | None:
    """The record this machine kept of `tag`; None if none, or if it is not valid (an
    older format, a damaged file): then the object store is asked again."""
    try:
        return packs.record_from_json(_record_file(settings, tag).read_bytes(), tag)
    except (OSError, packs.StoreError):
        return None


def load_manifest(
    settings: Settings, record: packs.VersionRecord, client: remote.S3Client = None
) -> list[manifests.ManifestRow]:
    cache = cache_of(settings)
    remote.fetch(
        client or store_client(settings), bucket_of(settings), cache, [record.manifest_md5]
    )
    return manifests.parse_manifest(cache.read(record.manifest_md5), record)


def fetch_version(
    settings: Settings,
    record: packs.VersionRecord,
    nothing_done: str,
    client: Any = None,
    progress: Progress = lambda _k: None,
    report: Report = lambda _m: None,
) -> list[manifests.ManifestRow]:
    """Every object of the version in this machine's cache, each checked against its
    MD5, and the version's manifest rows, checked against the packs. `nothing_done` says
    what the caller did not do when the store cannot be reached ("Nothing was written to
    X"), in the one explanation every reader gives."""
    cache = cache_of(settings)
    for md5 in record.files.values():
        if cache.has(md5) and packs.md5_bytes(cache.read(md5)) != md5:
            report(f"data cache: object {md5} of {record.tag} is corrupt; fetching it again")
            cache.path(md5).unlink()
    missing = [m for m in record.files.values() if not cache.has(m)]
    if missing:
        report(
            f"downloading {len(missing)} of {len(record.files)} objects of {record.tag}"
            f" from s3://{bucket_of(settings)}/{remote.DVC_PREFIX}"
        )
    try:
        remote.fetch(
            client or store_client(settings),
            bucket_of(settings),
            cache,
            record.files.values(),
            progress,
        )
    except remote.StoreUnreachable as exc:
        raise RegistryError(
            f"{exc}\n{nothing_done}; the objects already fetched are kept in this machine's cache."
        ) from None
    rows = manifests.parse_manifest(cache.read(record.manifest_md5), record)
    manifests.check_rows(rows, cache)
    return rows


def image_bytes(settings: Settings, rows: list[manifests.ManifestRow]) -> list[tuple[str, bytes]]:
    """(key, PNG bytes) of every row, in order, from the packs in the cache."""
    cache = cache_of(settings)
    blobs = {pack: cache.read(pack) for pack in {row.pack for row in rows}}
    return [(r.key, blobs[r.pack][r.offset : r.offset + r.length]) for r in rows]
