"""The signed file record of a registered model: which files, byte for byte (path ->
SHA-256), signed with the stack's model key over the model's source, so that a version
of other files, or tags copied from another version, do not verify. `model_files`
checks a version's record before it reads anything of its files."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from mnistops.errors import BadInput, MnistopsError
from mnistops.tracking.contract import FILES_TAG, SIGNATURE_TAG

if TYPE_CHECKING:
    from mnistops.settings import Settings

MLFLOW_ADDED = frozenset({"registered_model_meta"})
"""what MLflow adds to a downloaded model folder (left out of the record)"""


class ModelRefused(MnistopsError):
    """The files are not a model mnistops wrote, or not the ones it registered; the
    message names the file and why. Never worth another try."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(folder: Path) -> dict[str, str]:
    """path -> SHA-256 of every file below `folder` (MLflow's own download marker left
    out). A link or anything but a regular file is refused by name."""
    record: dict[str, str] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted([*dirs, *files]):
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise ModelRefused(f"{relative} is a link or not a regular file")
            if relative not in MLFLOW_ADDED:
                record[relative] = _sha256(path)
    return record


def encode_record(record: dict[str, str]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def sign(key: bytes, source: str, record_json: str) -> str:
    """HMAC-SHA256 of the model's source (its logged model, `models:/m-...`) and its file
    record: tags copied onto a version of other files do not verify."""
    return hmac.new(key, f"{source}\n{record_json}".encode(), hashlib.sha256).hexdigest()


def record_tags(key: bytes, record: dict[str, str], source: str) -> dict[str, str]:
    """The tags that make a version of `source` "registered by mnistops"."""
    encoded = encode_record(record)
    return {FILES_TAG: encoded, SIGNATURE_TAG: sign(key, source, encoded)}


def no_key_message(where: str) -> str:
    return (
        "no model signing key: with an MLflow server of your own, set"
        f" model_registry.signing_key ({where}) to the same random string of 32 or more"
        " characters on every machine that trains or loads models"
    )


def signing_key(settings: Settings) -> bytes:
    """The key that signs what this run registers; BadInput before any work without one."""
    from mnistops.clients import model_signing_key

    key = model_signing_key(settings)
    if key is None:
        raise BadInput(no_key_message(settings.where("model_registry.signing_key")))
    return key


def signed_record(
    tags: dict[str, str], key: bytes | None, source: str, version: str = "VERSION"
) -> dict[str, str]:
    """The version's file record, once its signature (over `source` and the record) is
    checked; ModelRefused says why it is not "registered by mnistops" (and names the
    command to trust `version`)."""
    encoded, signature = tags.get(FILES_TAG), tags.get(SIGNATURE_TAG)
    if not encoded or not signature:
        raise ModelRefused(
            "not registered by mnistops (it has no signed file record); if you trust its"
            f" files, `mnistops models promote {version} --trust-unsigned` records them"
        )
    if key is None:
        raise ModelRefused("its file record cannot be checked: " + no_key_message("settings"))
    if not hmac.compare_digest(sign(key, source, encoded), signature):
        raise ModelRefused(
            "not registered by mnistops: its file record is not signed with this stack's"
            " model key for its files (changed or copied by hand, or signed by another"
            " stack)"
        )
    try:
        record = json.loads(encoded)
    except ValueError:
        raise ModelRefused("its file record is not JSON") from None
    if not isinstance(record, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in record.items()
    ):
        raise ModelRefused("its file record is not a map of paths to hashes")
    return record


def record_problem(
    tags: dict[str, str], key: bytes | None, source: str, version: str = "VERSION"
) -> str | None:
    """Why a version will be refused, judged from its tags and source alone (no
    download); None when its record is signed for its source. The files themselves are
    checked when loaded."""
    try:
        signed_record(tags, key, source, version)
    except ModelRefused as exc:
        return str(exc)
    return None


def check_files(folder: Path, record: dict[str, str]) -> None:
    """The downloaded files are exactly the recorded ones, byte for byte."""
    found = file_record(folder)
    extra = sorted(set(found) - set(record))
    if extra:
        raise ModelRefused(f"{extra[0]} is not one of the files registered with it")
    missing = sorted(set(record) - set(found))
    if missing:
        raise ModelRefused(f"{missing[0]}, registered with it, is missing")
    for path, digest in sorted(record.items()):
        if not hmac.compare_digest(found[path], digest):
            raise ModelRefused(f"{path} differs from the file registered (SHA-256 mismatch)")
