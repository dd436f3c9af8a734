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

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mnistops.data.images import (
    DIGIT_FILE_BYTES,
    ImageEntry,
    ImageRefused,
    read_regular,
)
from mnistops.errors import BadInput, MnistopsError

PACK_BYTES = 4 * 1024 * 1024
MANIFEST = "manifest.json.gz"
VERSIONS_PREFIX = "versions/"
FORMAT = 1
Progress = Callable[[int], None]


class StoreError(MnistopsError):
    """The object store could not give or take what a version needs."""


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


# --- untrusted input: records, manifests and paths read from the store ----------------
#
# Whoever can write one object to the bucket must not be able to make a pull, a training
# or a flow run write outside its destination, or break the listing of other versions.
# Everything read from the store or from the local caches goes through these checks
# before it is used; nothing else in the package parses these formats.

TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SPLIT_NAMES = ("train", "test")
DIGIT_NAMES = tuple(str(d) for d in range(10))
MD5_PATTERN = re.compile(r"[0-9a-f]{32}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
COMMIT_PATTERN = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
PACK_FILE = re.compile(r"packs/([0-9a-f]{32})\.pack")
MAX_RECORD_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
"""a manifest decompresses to at most this (MNIST's 70,000 rows take about 12 MB)"""
MIN_BYTES_PER_VALUE = 16
"""a real manifest row spends over 30 bytes per JSON value; far denser text (millions of
empty lists or small numbers) would take gigabytes to parse and is refused before"""
MAX_NAME_BYTES = 255
MAX_COUNT = 10**9
MAX_MESSAGE = 10_000
RECORD_REQUIRED = frozenset({"tag", "message", "created", "content_hash", "counts", "files"})
RECORD_OPTIONAL = frozenset({"previous", "commit", "remote", "format"})


class DatasetChanged(BadInput):
    """A file of the dataset changed between its validation and its packing: what would
    be pushed is not what was validated."""


class CorruptRecord(StoreError):
    """A version record or manifest failed validation; it is never used."""


def shown(text: str, limit: int = 80) -> str:
    """`text` safe to print: control characters escaped, long text cut."""
    safe = text if text.isprintable() else ascii(text)[1:-1]
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def tag_problem(tag: object) -> str | None:
    """Why `tag` is not a usable version tag (also a git tag and a file name), or None."""
    if not isinstance(tag, str):
        return f"a tag must be text, not {type(tag).__name__}"
    if (
        not TAG_PATTERN.fullmatch(tag)
        or ".." in tag
        or tag.endswith((".", ".lock"))
        or tag == "latest"
    ):
        return (
            f"'{shown(tag)}' is not a usable tag: 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit, no '..', not 'latest' (for example v1.0)"
        )
    return None


def _text(data: dict[str, Any], key: str, limit: int, allow: str = "") -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be text, not {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"'{key}' is longer than {limit} characters")
    if not all(c.isprintable() or c in allow for c in value):
        raise ValueError(f"'{key}' holds control characters")
    return value


def _count(value: object, where: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{where} must be a whole number between 0 and {MAX_COUNT}")
    return value


def _check_counts(counts: object) -> dict[str, dict[str, int]]:
    """Both splits, every digit, each with at least one image (what `data version` checks
    before it publishes)."""
    if not isinstance(counts, dict) or set(counts) != set(SPLIT_NAMES):
        raise ValueError(f"'counts' must map the splits {', '.join(SPLIT_NAMES)} to digits")
    for split, per in counts.items():
        if not isinstance(per, dict) or set(per) != set(DIGIT_NAMES):
            raise ValueError(f"'counts.{split}' must map each digit 0-9 to its images")
        for digit, n in per.items():
            if _count(n, f"'counts.{split}.{digit}'") == 0:
                raise ValueError(f"'counts.{split}.{digit}': no image of this digit")
    return counts


def _check_files(files: object) -> dict[str, str]:
    if not isinstance(files, dict) or MANIFEST not in files or len(files) > 100_000:
        raise ValueError(f"'files' must name the manifest ({MANIFEST}) and the packs")
    for name, md5 in files.items():
        if not isinstance(md5, str) or not MD5_PATTERN.fullmatch(md5):
            raise ValueError(f"'files.{shown(str(name))}' is not an MD5 (32 hex digits)")
        pack = PACK_FILE.fullmatch(name) if isinstance(name, str) else None
        if name != MANIFEST and (pack is None or pack.group(1) != md5):
            raise ValueError(f"'files' names '{shown(str(name))}', not a manifest or pack")
    return files


def record_from_json(text: str | bytes, expected_tag: str | None = None) -> VersionRecord:
    """A version record, validated field by field; CorruptRecord says what is wrong.

    `expected_tag` is the tag the record was stored under (its object key or file name):
    a record that claims another tag is refused, so it cannot name a file elsewhere.
    """
    where = f"version record {shown(expected_tag)}" if expected_tag else "version record"
    try:
        if len(text) > MAX_RECORD_BYTES:
            raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format", 0) != FORMAT:
            raise CorruptRecord(
                f"{where} was written in format {shown(str(data.get('format', 0)))};"
                f" this mnistops reads format {FORMAT}. Publish it again with this version"
                " (`mnistops data version TAG --force`), or use the mnistops that wrote it."
            )
        missing = RECORD_REQUIRED - set(data)
        unknown = set(data) - RECORD_REQUIRED - RECORD_OPTIONAL
        if missing or unknown:
            raise ValueError(
                f"keys missing: {', '.join(sorted(missing)) or 'none'};"
                f" unknown: {', '.join(shown(str(k)) for k in sorted(unknown)) or 'none'}"
            )
        problem = tag_problem(data["tag"])
        if problem:
            raise ValueError(f"'tag': {problem}")
        if expected_tag is not None and data["tag"] != expected_tag:
            raise ValueError(f"it claims the tag '{shown(data['tag'])}'")
        previous = data.get("previous")
        if previous is not None and tag_problem(previous):
            raise ValueError(f"'previous': {tag_problem(previous)}")
        commit = data.get("commit")
        if commit is not None and (
            not isinstance(commit, str) or not COMMIT_PATTERN.fullmatch(commit)
        ):
            raise ValueError("'commit' is not a git commit id")
        content = data["content_hash"]
        if not isinstance(content, str) or not SHA256_PATTERN.fullmatch(content):
            raise ValueError("'content_hash' is not a SHA-256 (64 hex digits)")
        datetime.fromisoformat(_text(data, "created", 64))
        record = VersionRecord(
            tag=data["tag"],
            message=_text(data, "message", MAX_MESSAGE, allow="\n\t"),
            created=data["created"],
            content_hash=content,
            counts=_check_counts(data["counts"]),
            files=_check_files(data["files"]),
            previous=previous,
            commit=commit,
            remote=_text(data, "remote", 1000) if "remote" in data else "",
            format=FORMAT,
        )
    except CorruptRecord:
        raise
    except (ValueError, RecursionError) as exc:
        raise CorruptRecord(f"{where} is invalid ({exc}); it was not used") from None
    return record


def content_hash(entries: Iterable[ImageEntry]) -> str:
    """Identity of a dataset: sorted paths and the SHA-256 of each file."""
    return content_digest((e.key, e.sha256) for e in entries)


def content_digest(pairs: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for key, sha in sorted(pairs):
        digest.update(f"{key}\t{sha}\n".encode())
    return digest.hexdigest()


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class ObjectCache:
    """Content-addressed local copies of packs and manifests, by MD5."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, md5: str) -> Path:
        if not MD5_PATTERN.fullmatch(md5):
            raise CorruptRecord(f"'{shown(md5)}' is not an object id (an MD5: 32 hex digits)")
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
        try:
            data = read_regular(entry.path, DIGIT_FILE_BYTES)
        except (OSError, ImageRefused) as exc:
            raise DatasetChanged(
                f"{entry.path}: removed or replaced after it was validated ({exc})"
            ) from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise DatasetChanged(f"{entry.path}: changed after it was validated")
        pending.append((entry.sha256, data))
        locations[entry.sha256] = Location("", 0, 0)
        size += len(data)
        if size >= PACK_BYTES:
            flush()
    flush()
    return locations
