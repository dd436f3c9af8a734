"""What tests share that is not a fixture: an attacker's hand in the bucket."""

from __future__ import annotations

import gzip
import hashlib
import json

from mnistops.clients import s3_client
from mnistops.data import packs, remote
from mnistops.settings import Settings


def put_object(settings: Settings, key: str, body: bytes) -> None:
    """Write one object to the DVC bucket with the stack's keys, as anyone holding them can."""
    s3_client(settings).put_object(Bucket=settings.s3.buckets.dvc, Key=key, Body=body)


def craft_version(
    settings: Settings,
    tag: str,
    images: dict[str, bytes],
    key: str | None = None,
    filler: bytes = b"",
    **record_changes: object,
) -> str:
    """Publish a version by hand, bypassing every check of `data version`: a pack of the
    given bytes, a manifest naming them by the given paths (any string), and a record
    stored under versions/<key or tag>.json that agrees with the manifest (counts and
    content hash), so that what is tested is the manifest itself. With `filler` (an
    image's bytes), every class of both splits gets one more image. Returns the key."""
    if filler:
        images = {**images}
        for split in packs.SPLIT_NAMES:
            for digit in packs.DIGIT_NAMES:
                images[f"{split}/{digit}/filler.png"] = filler
    pack = b"".join(images.values())
    pack_md5 = packs.md5_bytes(pack)
    rows, offset = [], 0
    counts = {s: dict.fromkeys(packs.DIGIT_NAMES, 0) for s in packs.SPLIT_NAMES}
    for path, data in images.items():
        rows.append([path, hashlib.sha256(data).hexdigest(), pack_md5, offset, len(data)])
        offset += len(data)
        split, digit = (path.split("/") + ["", ""])[:2]
        if split in counts and digit in counts[split]:
            counts[split][digit] += 1
    manifest = gzip.compress(json.dumps({"columns": packs.MANIFEST_COLUMNS, "rows": rows}).encode())
    manifest_md5 = packs.md5_bytes(manifest)
    put_object(settings, remote.object_key(pack_md5), pack)
    put_object(settings, remote.object_key(manifest_md5), manifest)
    record = {
        "tag": tag,
        "message": "crafted",
        "created": "2099-01-01T00:00:00+00:00",
        "content_hash": packs.rows_content_hash(packs.ManifestRow._make(r) for r in rows),
        "counts": counts,
        "files": {packs.MANIFEST: manifest_md5, f"packs/{pack_md5}.pack": pack_md5},
        "previous": None,
        "commit": None,
        "remote": "",
        "format": packs.FORMAT,
        **record_changes,
    }
    object_key = f"{packs.VERSIONS_PREFIX}{key or tag}.json"
    put_object(settings, object_key, json.dumps(record).encode())
    return object_key
