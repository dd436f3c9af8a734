"""The remote: a version's objects and record in the object store.

Packs and manifests live under DVC's own layout (`<remote>/files/md5/ab/cdef...`), so
`dvc pull` in the registry finds them too; the record at `<bucket>/versions/<tag>.json`
is what publishes a version. Every object read back is checked against its MD5, every
record is validated (`packs.record_from_json`) before it is used.
"""

from __future__ import annotations

import json
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
ORDER_PREFIX = "version-order/"
"""`<bucket>/version-order/<n>.json` names the n-th publication: `{"tag": ...}`. Each
number is taken with a conditional write, so every host sees one order of versions,
whatever its clock says; a version's place is the highest number naming it."""
MAX_ORDER_TRIES = 1000


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
    except BotoCoreError as exc:
        raise StoreUnreachable(
            f"{action}: the object store at {client.meta.endpoint_url} cannot be reached:"
            f" {exc}\n{UNREACHABLE_ADVICE}"
        ) from None
    except ClientError as exc:
        raise StoreError(
            f"{action}: the object store at {client.meta.endpoint_url} failed: {exc}"
        ) from None


UNREACHABLE_ADVICE = (
    "Is it running? `mnistops stack status` shows the stack's store (`mnistops stack up`"
    " starts it); an external one is s3.endpoint_url. Once it answers, run the same"
    " command again."
)


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
    """The valid versions of a bucket in the order they were published, and the objects
    that are not valid."""

    records: list[VersionRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """one message per object of versions/ that was not used, naming it and why"""
    places: dict[str, int] = field(default_factory=dict)
    """tag -> its place in the order of publication (absent: published before versions
    were numbered, or written by hand: placed before every numbered one, by its date)"""
    warnings: list[str] = field(default_factory=list)
    """records whose claimed date or predecessor disagrees with the order of publication"""


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
    places, order_problems = read_order(client, bucket)
    listing.problems += order_problems
    listing.places = {r.tag: places[r.tag] for r in listing.records if r.tag in places}
    listing.records.sort(
        key=lambda r: (
            (1, listing.places[r.tag], "") if r.tag in listing.places else (0, 0, r.created)
        )
    )
    listing.warnings = order_warnings(listing.records, listing.places)
    return listing


def order_warnings(records: list[VersionRecord], places: dict[str, int]) -> list[str]:
    """What a record claims that the order of publication contradicts: a date earlier than
    its predecessor's or in the future, or no place at all (then it cannot be `latest`)."""
    from datetime import UTC, datetime, timedelta

    soon = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    warnings = []
    numbered: VersionRecord | None = None
    for before, record in zip([None, *records], records, strict=False):
        if record.tag not in places:
            warnings.append(
                f"{record.tag} has no place in the order of publication (published before"
                " versions were numbered, or written by hand): listed by its date, first"
            )
            continue
        if record.created > soon:
            warnings.append(
                f"{record.tag} claims a date in the future ({record.created[:19]}): listed"
                " where it was published"
            )
        elif before is not None and before.tag in places and record.created < before.created:
            warnings.append(
                f"{record.tag} claims an earlier date ({record.created[:19]}) than"
                f" {before.tag} ({before.created[:19]}) but was published after it (a clock"
                " off on the publishing host?): listed where it was published"
            )
        if numbered is not None and record.previous != numbered.tag:
            warnings.append(
                f"{record.tag} says it follows {record.previous or 'no version'}, but the order"
                f" of publication puts it after {numbered.tag} (its record, or its place in"
                " version-order/, written by hand?)"
            )
        numbered = record
    return warnings


def _order_numbers(client: S3Client, bucket: str) -> list[tuple[int, str]]:
    """(number, key) of every object under version-order/ whose name is a number."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=ORDER_PREFIX)
    found = []
    for page in pages:
        for item in page.get("Contents", []):
            name = item["Key"].removeprefix(ORDER_PREFIX).removesuffix(".json")
            if name.isdigit() and len(name) <= 18:  # 00000001 ... (any number of digits)
                found.append((int(name), item["Key"]))
    return sorted(found)


def read_order(client: S3Client, bucket: str) -> tuple[dict[str, int], list[str]]:
    """tag -> its place (the highest number naming it), and the order objects that are
    not valid (named, not used)."""
    places: dict[str, int] = {}
    problems = []
    with store_errors("reading the order of versions", client):
        for number, key in _order_numbers(client, bucket):
            try:
                entry = json.loads(_read_small(client, bucket, key))
                tag = entry["tag"] if isinstance(entry, dict) else None
                if not isinstance(tag, str) or tag_problem(tag):
                    raise ValueError("no valid tag in it")
            except (ValueError, KeyError) as exc:
                problems.append(f"s3://{bucket}/{key}: {exc}")
                continue
            places[tag] = max(places.get(tag, 0), number)
    return places, problems


def predecessor(client: S3Client, bucket: str, tag: str, place: int) -> str | None:
    """The tag published just before `place` (a version with a record), if any."""
    listing = list_records(client, bucket)
    earlier = [
        r.tag for r in listing.records if r.tag != tag and listing.places.get(r.tag, 0) < place
    ]
    return earlier[-1] if earlier else None


def claim_place(client: S3Client, bucket: str, tag: str) -> int:
    """The next number in the order of publication, taken for `tag` with a conditional
    write: of two hosts publishing at once, each gets its own number."""
    with store_errors(f"numbering version {tag}", client):
        taken = [n for n, _key in _order_numbers(client, bucket)]
        first = (max(taken) if taken else 0) + 1
        for number in range(first, first + MAX_ORDER_TRIES):
            try:
                client.put_object(
                    Bucket=bucket,
                    Key=f"{ORDER_PREFIX}{number:08d}.json",
                    Body=json.dumps({"tag": tag}).encode(),
                    ContentType="application/json",
                    IfNoneMatch="*",
                )
            except ClientError as exc:
                if error_code(exc) in ("PreconditionFailed", "412"):
                    continue
                raise
            return number
    raise StoreError(f"numbering version {tag}: {MAX_ORDER_TRIES} numbers in a row were taken")


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
