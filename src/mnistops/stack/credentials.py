"""Access keys for the embedded object store, generated once, kept 0600 in the state dir."""

from __future__ import annotations

import json
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class S3Keys:
    access_key_id: str
    secret_access_key: str


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def write_private(path: Path, text: str) -> None:
    """Write a file that only the owner may read, never visible with wider rights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def keys_path(home: Path) -> Path:
    return home / "credentials.json"


def load_keys(home: Path) -> S3Keys | None:
    path = keys_path(home)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return S3Keys(data["s3_access_key_id"], data["s3_secret_access_key"])


def ensure_keys(home: Path) -> S3Keys:
    """The stack's S3 keys, generating random ones (32 and 48 characters) at first use."""
    keys = load_keys(home)
    if keys is None:
        keys = S3Keys(access_key_id="MO" + _random(30), secret_access_key=_random(48))
        write_private(
            keys_path(home),
            json.dumps(
                {
                    "s3_access_key_id": keys.access_key_id,
                    "s3_secret_access_key": keys.secret_access_key,
                },
                indent=2,
            ),
        )
    return keys


def seaweed_identities(keys: S3Keys) -> str:
    """SeaweedFS `-s3.config` file: one admin identity, no anonymous access."""
    return json.dumps(
        {
            "identities": [
                {
                    "name": "mnistops",
                    "credentials": [
                        {"accessKey": keys.access_key_id, "secretKey": keys.secret_access_key}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        },
        indent=2,
    )
