"""The prediction log read back from the object store: every batch of the days asked
for, its signature and contents checked (`records`); an object that fails is named and
skipped, never used. `mnistops predictions` summarises what was logged, and with
`--quarantine` moves the refused objects aside."""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from mnistops.data.remote import store_errors
from mnistops.loop import records
from mnistops.settings import Settings

QUARANTINE_PREFIX = "quarantine/"
"""refused objects of the log are moved here, out of every reader's way"""


@dataclass
class Batches:
    """The checked tables of one kind of batch, and the objects refused (name, why)."""

    tables: list[Any] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    """the object of each table"""
    refused: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(table.num_rows for table in self.tables)


def read_batches(settings: Settings, prefix: str, since: datetime | None = None) -> Batches:
    """Every batch under `prefix` of the days from `since` on, rows before `since` left
    out, in the order they were written."""
    found = Batches()
    for name, table in each_batch(settings, prefix, since, found.refused):
        found.tables.append(table)
        found.names.append(name)
    return found


def each_batch(
    settings: Settings, prefix: str, since: datetime | None, refused: list[tuple[str, str]]
) -> Iterator[tuple[str, Any]]:
    """(object name, checked table) of each batch, one at a time (what reads a long span
    of the log holds one batch in memory, not all); refused objects are added to
    `refused` with the reason."""
    import pyarrow.compute as pc

    from mnistops.clients import s3_client

    key = records.log_key(log_signing_key(settings))
    client = s3_client(settings)
    bucket = settings.s3.buckets.dvc
    first_day = since.date() if since else None
    with store_errors(f"reading the prediction log in s3://{bucket}/{prefix}", client):
        listed = _listed(client, bucket, prefix)
    for name, size in listed:
        day = records.day_of(name)
        if day is None:
            refused.append((name, "not a name mnistops writes"))
            continue
        if first_day is not None and day < first_day:
            continue
        if size > records.MAX_OBJECT_BYTES:
            refused.append((name, f"{size} bytes, over {records.MAX_OBJECT_BYTES}"))
            continue
        with store_errors(f"reading s3://{bucket}/{name}", client):
            got = client.get_object(Bucket=bucket, Key=name)
            data = got["Body"].read()
        try:
            records.check_signature(key, name, data, got.get("Metadata") or {})
            table = records.read_batch(name, data)
        except records.BatchRefused as exc:
            refused.append((name, str(exc)))
            continue
        if since is not None:
            table = table.filter(pc.greater_equal(table["time"], _utc(since)))
        yield name, table


def log_signing_key(settings: Settings, doing: str = "checked") -> bytes:
    """The model signing key, which the log's key is derived from; BadInput without one."""
    from mnistops.clients import model_signing_key
    from mnistops.errors import BadInput
    from mnistops.tracking.model_record import no_key_message

    key = model_signing_key(settings)
    if key is None:
        where = settings.where("model_registry.signing_key")
        raise BadInput(f"the prediction log cannot be {doing}: {no_key_message(where)}")
    return key


def _listed(client: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    items = [
        (item["Key"], int(item["Size"])) for page in pages for item in page.get("Contents", [])
    ]
    return sorted(items)


def _utc(when: datetime) -> Any:
    import pyarrow as pa

    return pa.scalar(int(records.timestamp(when) * 1000), pa.timestamp("ms", tz="UTC"))


@dataclass
class Summary:
    """What `mnistops predictions` prints."""

    since: datetime | None
    images: int
    requests: int
    per_version: Counter[str]
    per_digit: Counter[int]
    labels: int
    first: datetime | None
    last: datetime | None
    refused: list[tuple[str, str]]


def summary(settings: Settings, since: datetime | None = None) -> Summary:
    """How many answers were logged from `since` on, per model version and per digit."""
    import pyarrow.compute as pc

    labels = read_batches(settings, records.FEEDBACK_PREFIX, since)
    per_version: Counter[str] = Counter()
    per_digit: Counter[int] = Counter()
    requests: set[str] = set()
    times: list[datetime] = []
    refused: list[tuple[str, str]] = []
    images = 0
    for _name, table in each_batch(settings, records.PREDICTIONS_PREFIX, since, refused):
        images += table.num_rows
        if not table.num_rows:
            continue
        joined = pc.binary_join_element_wise(table["model_name"], table["model_version"], " v")
        per_version.update(_counts(joined))
        per_digit.update(_counts(table["digit"]))
        requests.update(table["request_id"].unique().to_pylist())
        times += [pc.min(table["time"]).as_py(), pc.max(table["time"]).as_py()]
    labelled = {
        key
        for table in labels.tables
        for key in zip(table["request_id"].to_pylist(), table["item"].to_pylist(), strict=True)
    }
    return Summary(
        since,
        images,
        len(requests),
        per_version,
        per_digit,
        len(labelled),
        min(times) if times else None,
        max(times) if times else None,
        refused + labels.refused,
    )


def _counts(column: Any) -> dict[Any, int]:
    import pyarrow.compute as pc

    counted = pc.value_counts(column).to_pylist()
    return {entry["values"]: entry["counts"] for entry in counted}


def parse_since(text: str | None, option: str = "--since") -> datetime | None:
    """A date (2026-12-03) or time (2026-12-03T14:00, UTC unless it says) of an option."""
    from mnistops.errors import BadInput

    if text is None:
        return None
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(
            f"{option} {text!r}: expected a date (2026-12-03) or a time (2026-12-03T14:00)"
        ) from None
    return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)


def quarantine(settings: Settings, refused: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Move refused objects of the log to `quarantine/<sha256 of the name>` (a name of
    our own: a crafted name never becomes a key that readers might resolve), their name
    and why in the object's metadata; (object, where it went) of each. Copy first, then
    delete: interrupted, it is done again the same way."""
    from mnistops.clients import s3_client

    client = s3_client(settings)
    bucket = settings.s3.buckets.dvc
    moved = []
    for name, why in refused:
        if not name.startswith((records.PREDICTIONS_PREFIX, records.FEEDBACK_PREFIX)):
            continue
        raw = name.encode("utf-8", "surrogateescape")
        target = QUARANTINE_PREFIX + hashlib.sha256(raw).hexdigest()
        metadata = {
            "mnistops-name": base64.urlsafe_b64encode(raw[:700]).decode(),
            "mnistops-refused": _printable(why)[:500],
        }
        with store_errors(f"moving a refused object of the log to s3://{bucket}/{target}", client):
            client.copy_object(
                Bucket=bucket,
                Key=target,
                CopySource={"Bucket": bucket, "Key": name},
                Metadata=metadata,
                MetadataDirective="REPLACE",
            )
            client.delete_object(Bucket=bucket, Key=name)
        moved.append((name, target))
    return moved


def _printable(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
