"""How a version is stored: packs of PNG bytes, a manifest, and a version record.

Tens of thousands of small files are slow to hash, upload and download one by one,
so a version is stored as a few objects:

- packs: PNG files concatenated, about 4 MiB each. A new version only adds packs for
  the images that no earlier version stored.
- a manifest (gzipped JSON lines): for every image its path, SHA-256, pixel hash and
  where it lies in which pack.
- a version record (JSON): tag, message, counts, content hash, and the MD5 of the
  manifest and of every pack it needs.

Packs and manifest are the files of the registry's DVC-tracked `dataset/` folder, so
they live in the DVC remote under DVC's own layout (`<remote>/files/md5/ab/cdef...`),
and `dvc pull` in the registry gets them too. The record is kept in git (`version.json`)
and in the bucket at `<bucket>/versions/<tag>.json`: that is how another machine, with
only the S3 endpoint and keys, finds a version and every object of it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from botocore.exceptions import BotoCoreError, ClientError

from mnistops.data.images import ImageEntry

PACK_BYTES = 4 * 1024 * 1024
MANIFEST = "manifest.json.gz"
VERSIONS_PREFIX = "versions/"
DVC_PREFIX = "registry"
STAMP = ".mnistops-version.json"
FORMAT = 1
Progress = Callable[[int], None]


class StoreError(Exception):
    """The object store could not give or take what a version needs."""


class StoreUnreachable(StoreError):
    """The connection to the object store failed (down, killed, wrong endpoint)."""


@dataclass
class Location:
    pack: str
    offset: int
    length: int


@dataclass
class VersionRecord:
    tag: str
    message: str
    created: str
    content_hash: str
    counts: dict[str, dict[str, int]]
    files: dict[str, str]
    """path in dataset/ -> MD5 (DVC's hash): the manifest and the packs"""
    previous: str | None = None
    commit: str | None = None
    remote: str = ""
    format: int = 0
    """layout of record and manifest; FORMAT for what this code writes and reads"""

    @property
    def images(self) -> dict[str, int]:
        return {split: sum(per.values()) for split, per in self.counts.items()}

    @property
    def manifest_md5(self) -> str:
        return self.files[MANIFEST]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VersionRecord:
        data = json.loads(text)
        if data.get("format", 0) != FORMAT:
            raise StoreError(
                f"version {data.get('tag')} was written in format {data.get('format', 0)};"
                f" this mnistops reads format {FORMAT}. Publish it again with this version"
                " (`mnistops data version TAG --force`), or use the mnistops that wrote it."
            )
        return cls(**data)


def content_hash(entries: Iterable[ImageEntry]) -> str:
    """Identity of a dataset: sorted paths and the SHA-256 of each file."""
    digest = hashlib.sha256()
    for key, sha in sorted((e.key, e.sha256) for e in entries):
        digest.update(f"{key}\t{sha}\n".encode())
    return digest.hexdigest()


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class ObjectCache:
    """Content-addressed local copies of packs and manifests, by MD5."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, md5: str) -> Path:
        return self.root / md5[:2] / md5[2:]

    def has(self, md5: str) -> bool:
        return self.path(md5).is_file()

    def put(self, data: bytes) -> str:
        md5 = md5_bytes(data)
        target = self.path(md5)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, target)
        return md5

    def read(self, md5: str) -> bytes:
        return self.path(md5).read_bytes()


def build_packs(
    cache: ObjectCache, entries: list[ImageEntry], known: dict[str, Location]
) -> dict[str, Location]:
    """Store the images not in `known` (by SHA-256) in new packs; return every location."""
    locations = dict(known)
    pending: list[tuple[str, bytes]] = []
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if not pending:
            return
        blob = b"".join(data for _, data in pending)
        md5 = md5_bytes(blob)
        offset = 0
        for sha, data in pending:
            locations[sha] = Location(md5, offset, len(data))
            offset += len(data)
        cache.put(blob)
        pending, size = [], 0

    for entry in sorted(entries, key=lambda e: e.key):
        if entry.sha256 in locations:
            continue
        data = entry.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StoreError(f"{entry.path}: changed while the version was being made; run again")
        pending.append((entry.sha256, data))
        locations[entry.sha256] = Location("", 0, 0)
        size += len(data)
        if size >= PACK_BYTES:
            flush()
    flush()
    return locations


MANIFEST_COLUMNS = ["path", "sha256", "pack", "offset", "length"]


def build_manifest(entries: list[ImageEntry], locations: dict[str, Location]) -> bytes:
    rows = []
    for e in sorted(entries, key=lambda e: e.key):
        loc = locations[e.sha256]
        rows.append([e.key, e.sha256, loc.pack, loc.offset, loc.length])
    document = {"columns": MANIFEST_COLUMNS, "rows": rows}
    return gzip.compress(json.dumps(document, separators=(",", ":")).encode(), mtime=0)


class ManifestRow(NamedTuple):
    key: str
    sha256: str
    pack: str
    offset: int
    length: int

    @property
    def location(self) -> Location:
        return Location(self.pack, self.offset, self.length)

    @property
    def split(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def label(self) -> int:
        return int(self.key.split("/")[1])


def parse_manifest(data: bytes) -> list[ManifestRow]:
    document = json.loads(gzip.decompress(data))
    if document.get("columns") != MANIFEST_COLUMNS:
        raise StoreError(f"unknown manifest layout {document.get('columns')}")
    return list(map(ManifestRow._make, document["rows"]))


def dataset_files(manifest_md5: str, rows: list[ManifestRow]) -> dict[str, str]:
    """The files of the DVC-tracked dataset/ folder of a version: name -> MD5."""
    files = {MANIFEST: manifest_md5}
    for pack in sorted({row.pack for row in rows}):
        files[f"packs/{pack}.pack"] = pack
    return files


# --- the remote -------------------------------------------------------------------------


def object_key(md5: str) -> str:
    """Where DVC 3 keeps an object in its remote."""
    return f"{DVC_PREFIX}/files/md5/{md5[:2]}/{md5[2:]}"


def _store_error(action: str, exc: Exception, endpoint: str) -> StoreError:
    kind = StoreUnreachable if isinstance(exc, BotoCoreError) else StoreError
    return kind(f"{action}: the object store at {endpoint} failed: {exc}")


def read_record(client, bucket: str, tag: str) -> VersionRecord | None:
    try:
        body = client.get_object(Bucket=bucket, Key=f"{VERSIONS_PREFIX}{tag}.json")["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise _store_error(f"reading version {tag}", exc, client.meta.endpoint_url) from None
    except BotoCoreError as exc:
        raise _store_error(f"reading version {tag}", exc, client.meta.endpoint_url) from None
    return VersionRecord.from_json(body.decode())


def list_records(client, bucket: str) -> list[VersionRecord]:
    """Every published version, oldest first."""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=VERSIONS_PREFIX
        )
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        records = [
            VersionRecord.from_json(client.get_object(Bucket=bucket, Key=k)["Body"].read().decode())
            for k in keys
            if k.endswith(".json")
        ]
    except (ClientError, BotoCoreError) as exc:
        raise _store_error("listing versions", exc, client.meta.endpoint_url) from None
    return sorted(records, key=lambda r: r.created)


def write_record(client, bucket: str, record: VersionRecord) -> None:
    try:
        client.put_object(
            Bucket=bucket,
            Key=f"{VERSIONS_PREFIX}{record.tag}.json",
            Body=record.to_json().encode(),
            ContentType="application/json",
        )
    except (ClientError, BotoCoreError) as exc:
        raise _store_error(
            f"publishing version {record.tag}", exc, client.meta.endpoint_url
        ) from None


def download_verified(client, bucket: str, md5: str) -> bytes:
    """One object of the remote, checked against its MD5; a mismatch names the object."""
    key = object_key(md5)
    try:
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise _store_error(
            f"downloading s3://{bucket}/{key}", exc, client.meta.endpoint_url
        ) from None
    if md5_bytes(data) != md5:
        raise StoreError(
            f"s3://{bucket}/{key} is corrupt: its MD5 is {md5_bytes(data)}, expected {md5}."
            " It was not used. Publish the version again from a machine that has the data"
            " (`mnistops data version TAG --force`)."
        )
    return data


def _in_parallel(work: Callable[[str], None], md5s: Iterable[str]) -> None:
    """Run `work` for each distinct MD5 on 8 threads; the first error is raised."""
    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work, m) for m in dict.fromkeys(md5s)]:
            future.result()


def fetch(
    client,
    bucket: str,
    cache: ObjectCache,
    md5s: Iterable[str],
    progress: Progress = lambda _k: None,
) -> None:
    """Bring every object into the local cache, in parallel, each verified before it is kept."""
    wanted = list(dict.fromkeys(md5s))
    missing = [m for m in wanted if not cache.has(m)]
    progress(len(wanted) - len(missing))

    def one(md5: str) -> None:
        cache.put(download_verified(client, bucket, md5))
        progress(1)

    _in_parallel(one, missing)


def upload(
    client,
    bucket: str,
    cache: ObjectCache,
    md5s: Iterable[str],
    progress: Progress = lambda _k: None,
) -> None:
    """Put objects from the cache into the remote under DVC's layout, in parallel."""

    def one(md5: str) -> None:
        try:
            client.put_object(Bucket=bucket, Key=object_key(md5), Body=cache.read(md5))
        except (ClientError, BotoCoreError) as exc:
            raise _store_error(
                f"uploading s3://{bucket}/{object_key(md5)}", exc, client.meta.endpoint_url
            ) from None
        progress(1)

    _in_parallel(one, md5s)


def verify_remote(
    client, bucket: str, md5s: Iterable[str], progress: Progress = lambda _k: None
) -> None:
    """Read every object back from the remote and compare its MD5 (catches servers that
    store checksum trailers or truncate uploads)."""

    def one(md5: str) -> None:
        download_verified(client, bucket, md5)
        progress(1)

    _in_parallel(one, md5s)


# --- materializing PNG folders -----------------------------------------------------------


def read_stamp(target: Path) -> dict | None:
    try:
        return json.loads((target / STAMP).read_text())
    except (FileNotFoundError, ValueError):
        return None


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
            (staging / folder).mkdir(parents=True, exist_ok=True)
        base = str(staging) + "/"

        def write(chunk: list[ManifestRow]) -> None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            for row in chunk:
                fd = os.open(base + row.key, flags, 0o644)
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


def check_rows(rows: list[ManifestRow], cache: ObjectCache) -> None:
    """Every image of the manifest matches its SHA-256 (packs were verified by MD5)."""
    packs: dict[str, bytes] = {}
    for row in rows:
        pack = packs.get(row.pack) or packs.setdefault(row.pack, cache.read(row.pack))
        data = pack[row.offset : row.offset + row.length]
        if hashlib.sha256(data).hexdigest() != row.sha256:
            raise StoreError(
                f"{row.key}: its bytes in pack {row.pack} do not match"
                " the manifest; the version is corrupt"
            )
