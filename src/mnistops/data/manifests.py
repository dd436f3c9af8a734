"""A version's manifest: one row per image (path, SHA-256, and where its bytes lie in
which pack), written at publish and read back as untrusted input: every row checked,
paths kept inside their folder, the rows matched against the version's record."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from mnistops.data.images import (
    ImageEntry,
    name_problem,
)
from mnistops.data.packs import (
    DIGIT_NAMES,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MD5_PATTERN,
    MIN_BYTES_PER_VALUE,
    SHA256_PATTERN,
    SPLIT_NAMES,
    CorruptRecord,
    Location,
    ObjectCache,
    StoreError,
    VersionRecord,
    content_digest,
    shown,
)

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


MAX_IMAGE_BYTES = 16 << 20


def image_path_problem(path: object) -> str | None:
    """Why a manifest path is not `train|test/<digit>/<file name>`, or None."""
    if not isinstance(path, str):
        return "the path is not text"
    parts = path.split("/")
    if len(parts) != 3 or parts[0] not in SPLIT_NAMES or parts[1] not in DIGIT_NAMES:
        return f"'{shown(path)}' is not train|test/<digit>/<file name>"
    return name_problem(parts[2])


def _gunzip(data: bytes, limit: int) -> bytes:
    """gzip-decompressed `data`, refused past `limit` bytes (a gzip bomb stops there)."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"not gzip data ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ValueError(f"it decompresses to more than {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise ValueError("the gzip data is truncated or followed by other data")
    return out


def _manifest_row(raw: object, packs: set[str] | None) -> ManifestRow:
    if not isinstance(raw, list) or len(raw) != len(MANIFEST_COLUMNS):
        raise ValueError(f"not a list of the {len(MANIFEST_COLUMNS)} columns")
    path, sha, pack, offset, length = raw
    problem = image_path_problem(path)
    if problem:
        raise ValueError(problem)
    if not isinstance(sha, str) or not SHA256_PATTERN.fullmatch(sha):
        raise ValueError("'sha256' is not a SHA-256 (64 hex digits)")
    if not isinstance(pack, str) or not MD5_PATTERN.fullmatch(pack):
        raise ValueError("'pack' is not an MD5 (32 hex digits)")
    if packs is not None and pack not in packs:
        raise ValueError(f"pack {pack} is not one of the version's files")
    if type(offset) is not int or offset < 0:
        raise ValueError("'offset' must be a whole number >= 0")
    if type(length) is not int or not 0 < length <= MAX_IMAGE_BYTES:
        raise ValueError(f"'length' must be a whole number between 1 and {MAX_IMAGE_BYTES}")
    return ManifestRow(path, sha, pack, offset, length)


def parse_manifest(data: bytes, record: VersionRecord | None = None) -> list[ManifestRow]:
    """The rows of a manifest, each validated; CorruptRecord names the first bad row.

    With `record`, every pack must be one of the record's files. Offsets are checked
    against the packs' sizes by `check_rows`, once the packs are here.
    """
    where = f"the manifest of version {record.tag}" if record else "the manifest"
    packs = {md5 for name, md5 in record.files.items() if name != MANIFEST} if record else None
    try:
        text = _gunzip(data, MAX_MANIFEST_BYTES)
        values = text.count(b",") + text.count(b"[") + text.count(b"{")
        if values * MIN_BYTES_PER_VALUE > len(text) + 1024:
            raise ValueError("far more JSON values than a manifest of images holds")
        document = json.loads(text)
        if not isinstance(document, dict) or document.get("columns") != MANIFEST_COLUMNS:
            raise ValueError("unknown manifest layout")
        raw_rows = document.get("rows")
        if not isinstance(raw_rows, list):
            raise ValueError("'rows' is not a list")
    except (ValueError, RecursionError, MemoryError) as exc:
        raise CorruptRecord(f"{where} is invalid ({exc}); it was not used") from None
    rows: list[ManifestRow] = []
    seen: dict[str, str] = {}
    for number, raw in enumerate(raw_rows, 1):
        try:
            row = _manifest_row(raw, packs)
            same = seen.get(folded_key(row.key))
            if same == row.key:
                raise ValueError(f"'{row.key}' is listed twice")
            if same is not None:
                raise ValueError(
                    f"'{shown(row.key)}' and '{shown(same)}' are one file on a disk that"
                    " folds case or Unicode forms (macOS, Windows)"
                )
        except ValueError as exc:
            message = f"{where} is invalid (row {number}: {exc}); it was not used"
            raise CorruptRecord(message) from None
        seen[folded_key(row.key)] = row.key
        rows.append(row)
    if record is not None:
        _check_matches_record(rows, record, where)
    return rows


def folded_key(key: str) -> str:
    """What a path is on a disk that folds case and Unicode forms (macOS, Windows): two
    paths with the same folded key are one file there."""
    import unicodedata

    return unicodedata.normalize("NFC", key).lower()


def rows_content_hash(rows: Iterable[ManifestRow]) -> str:
    """The content hash of a manifest's images: the same as `content_hash` of the files."""
    return content_digest((row.key, row.sha256) for row in rows)


def _check_matches_record(rows: list[ManifestRow], record: VersionRecord, where: str) -> None:
    """The manifest holds what its record says: the same images per class and the same
    content hash (which names the version's array cache: a record that lies about it
    must not make another version's cache)."""
    found: dict[str, dict[str, int]] = {s: dict.fromkeys(DIGIT_NAMES, 0) for s in SPLIT_NAMES}
    for row in rows:
        found[row.split][str(row.label)] += 1
    if found != record.counts:
        raise CorruptRecord(f"{where} does not hold the images per class its record lists")
    if rows_content_hash(rows) != record.content_hash:
        raise CorruptRecord(f"{where} does not match the record's content hash")


def path_inside(root: Path, relative: str) -> Path:
    """`root/relative`, refused unless it stays under `root` once resolved (symlinks too)."""
    target = root / relative
    if not target.resolve().is_relative_to(root.resolve()):
        raise CorruptRecord(f"'{shown(relative)}' would lead outside {root}; nothing was written")
    return target


def dataset_files(manifest_md5: str, rows: list[ManifestRow]) -> dict[str, str]:
    """The files of the DVC-tracked dataset/ folder of a version: name -> MD5."""
    files = {MANIFEST: manifest_md5}
    for pack in sorted({row.pack for row in rows}):
        files[f"packs/{pack}.pack"] = pack
    return files


def check_rows(rows: list[ManifestRow], cache: ObjectCache) -> None:
    """Every image of the manifest matches its SHA-256 (packs were verified by MD5)."""
    packs: dict[str, bytes] = {}
    for row in rows:
        pack = packs.get(row.pack) or packs.setdefault(row.pack, cache.read(row.pack))
        if row.offset + row.length > len(pack):
            raise CorruptRecord(
                f"{row.key}: bytes {row.offset}-{row.offset + row.length} lie outside pack"
                f" {row.pack} ({len(pack)} bytes); the version is corrupt and was not used"
            )
        data = pack[row.offset : row.offset + row.length]
        if hashlib.sha256(data).hexdigest() != row.sha256:
            raise StoreError(
                f"{row.key}: its bytes in pack {row.pack} do not match"
                " the manifest; the version is corrupt"
            )
