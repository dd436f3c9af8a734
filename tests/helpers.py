"""What tests share that is not a fixture: an attacker's hand in the bucket."""

from __future__ import annotations

import gzip
import hashlib
import json

from mnistops.data import store
from mnistops.settings import Settings
from mnistops.stack.endpoints import s3_client


def put_object(settings: Settings, key: str, body: bytes) -> None:
    """Write one object to the DVC bucket with the stack's keys, as anyone holding them can."""
    s3_client(settings).put_object(Bucket=settings.s3.buckets.dvc, Key=key, Body=body)


def craft_version(
    settings: Settings,
    tag: str,
    images: dict[str, bytes],
    key: str | None = None,
    **record_changes: object,
) -> str:
    """Publish a version by hand, bypassing every check of `data version`: a pack of the
    given bytes, a manifest naming them by the given paths (any string), and a record
    stored under versions/<key or tag>.json. Returns the object key of the record."""
    pack = b"".join(images.values())
    pack_md5 = store.md5_bytes(pack)
    rows, offset = [], 0
    for path, data in images.items():
        rows.append([path, hashlib.sha256(data).hexdigest(), pack_md5, offset, len(data)])
        offset += len(data)
    manifest = gzip.compress(json.dumps({"columns": store.MANIFEST_COLUMNS, "rows": rows}).encode())
    manifest_md5 = store.md5_bytes(manifest)
    put_object(settings, store.object_key(pack_md5), pack)
    put_object(settings, store.object_key(manifest_md5), manifest)
    record = {
        "tag": tag,
        "message": "crafted",
        "created": "2099-01-01T00:00:00+00:00",
        "content_hash": hashlib.sha256(pack).hexdigest(),
        "counts": {"train": {"0": len(images)}, "test": {"0": 0}},
        "files": {store.MANIFEST: manifest_md5, f"packs/{pack_md5}.pack": pack_md5},
        "previous": None,
        "commit": None,
        "remote": "",
        "format": store.FORMAT,
        **record_changes,
    }
    object_key = f"{store.VERSIONS_PREFIX}{key or tag}.json"
    put_object(settings, object_key, json.dumps(record).encode())
    return object_key
