"""The remote: a version's objects and record in the object store.

Packs and manifests live under DVC's own layout (`<remote>/files/md5/ab/cdef...`), so
`dvc pull` in the registry finds them too; the record at `<bucket>/versions/<tag>.json`
is what publishes a version. Every object read back is checked against its MD5, every
record is validated (`packs.record_from_json`) before it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from mnistops.data.packs import (
    MAX_RECORD_BYTES,
    VERSIONS_PREFIX,
    CorruptRecord,
    ObjectCache,
    Progress,
    StoreError,
    VersionRecord,
    md5_bytes,
    record_from_json,
    shown,
    tag_problem,
)

DVC_PREFIX = "registry"


class StoreUnreachable(StoreError):
    """The connection to the object store failed (down, killed, wrong endpoint)."""


def object_key(md5: str) -> str:
    """Where DVC 3 keeps an object in its remote."""
    return f"{DVC_PREFIX}/files/md5/{md5[:2]}/{md5[2:]}"


S3Client = Any
"""a boto3 S3 client (boto3 ships no types)"""


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def store_errors(action: str, client: S3Client) -> Iterator[None]:
    """An object-store failure inside the block, as the one error every caller explains:
    StoreUnreachable when the connection failed (down, killed, wrong endpoint),
    StoreError when the store answered with an error. `action` says what was tried."""
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        kind = StoreUnreachable if isinstance(exc, BotoCoreError) else StoreError
        raise kind(
            f"{action}: the object store at {client.meta.endpoint_url} failed: {exc}"
        ) from None


def _read_small(client: S3Client, bucket: str, key: str) -> bytes:
    """An object of at most MAX_RECORD_BYTES (+1, so that a larger one is seen as such)."""
    body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read(MAX_RECORD_BYTES + 1)
    return body


def read_record(client: S3Client, bucket: str, tag: str) -> VersionRecord | None:
    """The record of `tag`, None if there is none; CorruptRecord if it is invalid."""
    problem = tag_problem(tag)
    if problem:
        raise CorruptRecord(problem)
    with store_errors(f"reading version {tag}", client):
        try:
            body = _read_small(client, bucket, f"{VERSIONS_PREFIX}{tag}.json")
        except ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
    return record_from_json(body, tag)


@dataclass
class Listing:
    """The valid versions of a bucket, oldest first, and the objects that are not."""

    records: list[VersionRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """one message per object of versions/ that was not used, naming it and why"""


def list_records(client: S3Client, bucket: str) -> Listing:
    """Every published version, oldest first; an invalid record is named, not used, and
    does not hide the others."""
    listing = Listing()
    with store_errors("listing versions", client):
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=VERSIONS_PREFIX
        )
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        for key in keys:
            tag = key.removeprefix(VERSIONS_PREFIX).removesuffix(".json")
            try:
                if not key.endswith(".json") or tag_problem(tag):
                    raise CorruptRecord(f"not a version record name ({tag_problem(tag)})")
                listing.records.append(record_from_json(_read_small(client, bucket, key), tag))
            except CorruptRecord as exc:
                listing.problems.append(f"s3://{bucket}/{shown(key)}: {exc}")
    listing.records.sort(key=lambda r: r.created)
    return listing


class RecordExists(StoreError):
    """Another publisher wrote the record of this tag first."""


def write_record(
    client: S3Client, bucket: str, record: VersionRecord, create_only: bool = False
) -> None:
    """Publish the record. `create_only`: only if no record of the tag exists (a
    conditional write: of two publishers of one tag on two machines, one wins)."""
    condition = {"IfNoneMatch": "*"} if create_only else {}
    with store_errors(f"publishing version {record.tag}", client):
        try:
            client.put_object(
                Bucket=bucket,
                Key=f"{VERSIONS_PREFIX}{record.tag}.json",
                Body=record.to_json().encode(),
                ContentType="application/json",
                **condition,
            )
        except ClientError as exc:
            if error_code(exc) in ("PreconditionFailed", "412"):
                raise RecordExists(
                    f"data version '{record.tag}' was published by someone else meanwhile;"
                    " nothing of this run was published"
                ) from None
            raise


def download_verified(client: S3Client, bucket: str, md5: str) -> bytes:
    """One object of the remote, checked against its MD5; a mismatch names the object."""
    key = object_key(md5)
    with store_errors(f"downloading s3://{bucket}/{key}", client):
        data: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
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
    client: S3Client,
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
    client: S3Client,
    bucket: str,
    cache: ObjectCache,
    md5s: Iterable[str],
    progress: Progress = lambda _k: None,
) -> None:
    """Put objects from the cache into the remote under DVC's layout, in parallel."""

    def one(md5: str) -> None:
        with store_errors(f"uploading s3://{bucket}/{object_key(md5)}", client):
            client.put_object(Bucket=bucket, Key=object_key(md5), Body=cache.read(md5))
        progress(1)

    _in_parallel(one, md5s)


def verify_remote(
    client: S3Client, bucket: str, md5s: Iterable[str], progress: Progress = lambda _k: None
) -> None:
    """Read every object back from the remote and compare its MD5 (catches servers that
    store checksum trailers or truncate uploads)."""

    def one(md5: str) -> None:
        download_verified(client, bucket, md5)
        progress(1)

    _in_parallel(one, md5s)
