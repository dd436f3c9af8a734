"""The local stack's generated secrets, each made once and kept 0600 in the state dir:
the object store's access keys, the MLflow and Prefect logins, and the model signing
key. Below the clients (which read them) and the stack (which starts services with
them)."""

from __future__ import annotations

import json
import os
import secrets
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path

from mnistops.errors import BadInput

_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class S3Keys:
    access_key_id: str
    secret_access_key: str = field(repr=False)


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


PRIVATE_UMASK = 0o077
"""files and folders we and the services create are the owner's only"""


def make_private_home(home: Path) -> None:
    """Create the state dir for its owner only (0700), or narrow an existing one."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if home.stat().st_mode & 0o077:
        home.chmod(0o700)


TOOL_FOLDERS = (Path("registry") / ".dvc" / "cache", Path("s3"))
"""folders (in the state dir) whose files a tool keeps at modes of its own: DVC's cache
is read-only (0444, and DVC tells a protected cache file by that mode), SeaweedFS writes
its volume info files 0644. Both folders are 0700, which keeps them from other users."""


def tighten(home: Path) -> int:
    """Take group and other rights off everything in the state dir (databases, objects,
    logs, caches, registry: folders 0700, files 0600 or 0700); return how many entries
    were narrowed."""
    narrowed = 0
    tools = [home / folder for folder in TOOL_FOLDERS]
    for folder, dirs, files in os.walk(home):
        tool_files = any(Path(folder).is_relative_to(t) for t in tools)
        for name in [*dirs, *([] if tool_files else files)]:
            path = Path(folder) / name
            info = path.lstat()
            if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o077:
                path.chmod(stat.S_IMODE(info.st_mode) & 0o700)
                narrowed += 1
    return narrowed


def keys_path(home: Path) -> Path:
    return home / "credentials.json"


class CredentialsError(BadInput):
    """The key file is damaged; the message names it and says what to do."""


MIN_KEY_LENGTH = 32


def load_keys(home: Path) -> S3Keys | None:
    """The stored keys; None if there are none yet. A damaged file is an error, never a
    reason to start the store with other (or no) keys."""
    path = keys_path(home)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        keys = S3Keys(data["s3_access_key_id"], data["s3_secret_access_key"])
        if min(len(keys.access_key_id), len(keys.secret_access_key)) < MIN_KEY_LENGTH:
            raise ValueError(f"a key is shorter than {MIN_KEY_LENGTH} characters")
        if not all(set(k) <= set(_ALPHABET) for k in (keys.access_key_id, keys.secret_access_key)):
            raise ValueError("a key has characters other than letters and digits")
    except (ValueError, KeyError, TypeError) as exc:
        raise CredentialsError(
            f"the S3 key file {path} is damaged ({exc.__class__.__name__}: {exc}). Restore"
            " it from a backup; or delete it to have new keys generated at the next"
            " `mnistops stack up` (the stored objects stay; clients then need the new"
            " `mnistops stack env`)."
        ) from None
    return keys


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


def prefect_auth_path(home: Path) -> Path:
    return home / "prefect-auth"


def ensure_prefect_auth(home: Path) -> str:
    """The embedded Prefect server's login, `admin:<48 random characters>`, made once."""
    path = prefect_auth_path(home)
    if path.is_file():
        value = path.read_text().strip()
        user, _, password = value.partition(":")
        if user and len(password) >= MIN_KEY_LENGTH:
            return value
        raise CredentialsError(
            f"the Prefect login file {path} is damaged. Delete it to have a new login"
            " generated at the next `mnistops stack up` (clients then need the new"
            " `mnistops stack env`)."
        )
    value = f"admin:{_random(48)}"
    write_private(path, value)
    return value


def model_key_path(home: Path) -> Path:
    return home / "model-signing-key"


def ensure_model_key(home: Path) -> str:
    """The key that signs the file record of every registered model (48 random
    characters), made once. Anyone who can write to MLflow but lacks it cannot make a
    version that mnistops loads."""
    path = model_key_path(home)
    if path.is_file():
        value = path.read_text().strip()
        if len(value) >= MIN_KEY_LENGTH:
            return value
        raise CredentialsError(
            f"the model signing key {path} is damaged. Restore it from a backup; or delete it"
            " to have a new one made (every registered model must then be trusted again:"
            " `mnistops models promote VERSION --trust-unsigned`)."
        )
    value = _random(48)
    write_private(path, value)
    return value


@dataclass(frozen=True)
class MlflowAuth:
    username: str
    password: str
    flask_secret_key: str
    """MLflow's basic-auth app needs a static secret for its CSRF protection"""


def mlflow_auth_path(home: Path) -> Path:
    return home / "mlflow-auth.json"


def ensure_mlflow_auth(home: Path) -> MlflowAuth:
    """The embedded MLflow server's admin login (never MLflow's example password), made once."""
    path = mlflow_auth_path(home)
    if path.is_file():
        try:
            auth = MlflowAuth(**json.loads(path.read_text()))
            if len(auth.password) < MIN_KEY_LENGTH:
                raise ValueError("the password is too short")
            return auth
        except (ValueError, TypeError) as exc:
            raise CredentialsError(
                f"the MLflow login file {path} is damaged ({exc}). Restore it from a backup:"
                " the server's user database keeps the password it was first started with."
            ) from None
    auth = MlflowAuth("admin", _random(48), _random(48))
    write_private(path, json.dumps(auth.__dict__, indent=2))
    return auth
