"""What is read from the object store is untrusted: records, manifests and the paths they
name are validated before use. Hand-made attacks first, then Hypothesis fuzzes the parsers."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnistops.data import images, manifests, packs

pytestmark = [pytest.mark.unit, pytest.mark.security]

SHA = "a" * 64
MD5 = "b" * 32
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def record_dict(**changes: object) -> dict:
    data = {
        "tag": "v1.0",
        "message": "first",
        "created": "2026-11-27T09:00:00+00:00",
        "content_hash": SHA,
        "counts": {split: {str(d): 3 for d in range(10)} for split in ("train", "test")},
        "files": {packs.MANIFEST: MD5, f"packs/{'c' * 32}.pack": "c" * 32},
        "previous": None,
        "commit": "d" * 40,
        "remote": "s3://dvc/registry",
        "format": packs.FORMAT,
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def counts_with(split: str, digit: str, value: object) -> dict:
    counts = record_dict()["counts"]
    counts[split] = {**counts[split], digit: value}
    return counts


def manifest(rows: list, columns: list | None = None) -> bytes:
    document = {"columns": columns or manifests.MANIFEST_COLUMNS, "rows": rows}
    return gzip.compress(json.dumps(document).encode())


def refused(text: str | bytes, tag: str | None = "v1.0") -> str:
    with pytest.raises(packs.CorruptRecord) as info:
        packs.record_from_json(text, tag)
    return str(info.value)


def test_a_valid_record_round_trips() -> None:
    record = packs.record_from_json(json.dumps(record_dict()), "v1.0")
    assert packs.record_from_json(record.to_json(), "v1.0") == record
    assert record.images == {"train": 30, "test": 30}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"tag": "../../../home/victim"}, "not a usable tag"),
        ({"tag": "v2.0"}, "claims the tag 'v2.0'"),
        ({"tag": "latest"}, "not a usable tag"),
        ({"previous": "../x"}, "'previous'"),
        ({"content_hash": "../../etc"}, "content_hash"),
        ({"commit": "HEAD; rm -rf /"}, "commit"),
        ({"counts": counts_with("train", "0", True)}, "counts.train.0"),
        ({"counts": counts_with("train", "0", "12")}, "counts.train.0"),
        ({"counts": counts_with("test", "7", 0)}, "counts.test.7': no image"),
        ({"counts": counts_with("train", "11", 1)}, "counts.train"),
        ({"counts": {"train": record_dict()["counts"]["train"]}}, "'counts' must map"),
        ({"counts": {"../x": {"0": 1}}}, "counts"),
        ({"files": {packs.MANIFEST: "../../../../tmp/x"}}, "not an MD5"),
        ({"files": {"packs/../../x.pack": MD5, packs.MANIFEST: MD5}}, "not a manifest or pack"),
        ({"files": {f"packs/{'e' * 32}.pack": MD5, packs.MANIFEST: MD5}}, "not a manifest or"),
        ({"files": {"packs/x.pack": MD5}}, "must name the manifest"),
        ({"message": "hi\x1b]0;pwned\x07"}, "control characters"),
        ({"created": "yesterday"}, "isoformat"),
        ({"tag": ...}, "keys missing: tag"),
        ({"extra": 1}, "unknown: extra"),
        ({"format": 99}, "format 99"),
    ],
)
def test_a_crafted_record_is_refused_with_the_reason(changes: dict, reason: str) -> None:
    message = refused(json.dumps(record_dict(**changes)))
    assert reason in message, message
    assert "\x1b" not in message


@pytest.mark.parametrize(
    "text",
    [b"not json", b"\xff\xfe", b"[1, 2]", b"null", b"[" * 100000, b" " * (2 << 20)],
)
def test_a_record_that_is_not_a_json_object_is_refused(text: bytes) -> None:
    refused(text)


def good_row(path: str = "train/3/1.png", offset: int = 0, length: int = 10) -> list:
    return [path, SHA, MD5, offset, length]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (good_row("train/0/../../../../venv/site-packages/zz.pth"), "not train|test"),
        (good_row("/etc/passwd"), "not train|test"),
        (good_row("train/0/../x.png"), "not train|test"),
        (good_row("train/0/.."), "is not a .png"),
        (good_row("train/10/x.png"), "not train|test"),
        (good_row("val/1/x.png"), "not train|test"),
        (good_row("train/1/a\\b.png"), "slash"),
        (good_row("train/1/a\nb.png"), "control"),
        (good_row("train/1/a\udcff.png"), "not valid UTF-8"),
        (good_row("train/1/.mnistops-version.json"), "is not a .png"),
        (good_row("train/1/" + "x" * 300 + ".png"), "longer than 255"),
        (good_row(offset=-1), "'offset'"),
        (good_row(length=0), "'length'"),
        (good_row(length=True), "'length'"),
        (good_row(offset=1.5), "'offset'"),
        (["train/1/a.png", SHA, "../../x", 0, 1], "'pack'"),
        (["train/1/a.png", "x", MD5, 0, 1], "'sha256'"),
        (["train/1/a.png"], "columns"),
    ],
)
def test_a_crafted_manifest_row_is_refused(row: list, reason: str) -> None:
    with pytest.raises(packs.CorruptRecord) as info:
        manifests.parse_manifest(manifest([good_row("test/1/ok.png"), row]))
    assert reason in str(info.value) and "row 2" in str(info.value), info.value


def test_manifest_refuses_duplicates_foreign_packs_layouts_and_bombs() -> None:
    twice = manifest([good_row(), good_row()])
    with pytest.raises(packs.CorruptRecord, match="listed twice"):
        manifests.parse_manifest(twice)
    record = packs.record_from_json(json.dumps(record_dict()), "v1.0")
    with pytest.raises(packs.CorruptRecord, match="not one of the version's files"):
        manifests.parse_manifest(manifest([good_row()]), record)
    with pytest.raises(packs.CorruptRecord, match="unknown manifest layout"):
        manifests.parse_manifest(manifest([], columns=["path"]))
    with pytest.raises(packs.CorruptRecord, match="not gzip"):
        manifests.parse_manifest(b"plain text")
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = bomb.compress(b"\0" * (packs.MAX_MANIFEST_BYTES + 1)) + bomb.flush()
    assert len(data) < 1 << 20
    with pytest.raises(packs.CorruptRecord, match="decompresses to more than"):
        manifests.parse_manifest(data)
    dense = gzip.compress(b'{"rows": [' + b"[]," * 8_000_000 + b'[]], "columns": []}')
    assert len(dense) < 1 << 20
    with pytest.raises(packs.CorruptRecord, match="far more JSON values"):
        manifests.parse_manifest(dense)


def test_a_manifest_must_hold_what_its_record_says() -> None:
    rows = [
        [f"{split}/{d}/x.png", SHA, "c" * 32, 0, 10]
        for split in ("train", "test")
        for d in range(10)
    ]
    counts = {split: {str(d): 1 for d in range(10)} for split in ("train", "test")}
    parsed = [manifests.ManifestRow._make(r) for r in rows]
    content = manifests.rows_content_hash(parsed)
    record = packs.record_from_json(
        json.dumps(record_dict(counts=counts, content_hash=content)), "v1.0"
    )
    assert manifests.parse_manifest(manifest(rows), record) == parsed
    with pytest.raises(packs.CorruptRecord, match="images per class"):
        manifests.parse_manifest(manifest(rows[1:]), record)
    lying = packs.record_from_json(json.dumps(record_dict(counts=counts)), "v1.0")
    with pytest.raises(packs.CorruptRecord, match="content hash"):
        manifests.parse_manifest(manifest(rows), lying)


def test_rows_outside_their_pack_are_refused(tmp_path: Path) -> None:
    cache = packs.ObjectCache(tmp_path)
    pack = cache.put(b"0123456789")
    rows = [manifests.ManifestRow("train/1/a.png", SHA, pack, 5, 10)]
    with pytest.raises(packs.CorruptRecord, match="outside pack"):
        manifests.check_rows(rows, cache)


def test_paths_and_object_ids_stay_inside_their_folder(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert manifests.path_inside(root, "train/1/a.png") == root / "train/1/a.png"
    for bad in ("../x", "train/../../x", "/etc/passwd"):
        with pytest.raises(packs.CorruptRecord, match="outside"):
            manifests.path_inside(root, bad)
    os.symlink(tmp_path, root / "link")
    with pytest.raises(packs.CorruptRecord, match="outside"):
        manifests.path_inside(root, "link/x")
    cache = packs.ObjectCache(root)
    for bad in ("../../../../tmp/xx", "a" * 31, "A" * 32, "g" * 32):
        with pytest.raises(packs.CorruptRecord, match="not an object id"):
            cache.path(bad)


# --- fuzzing: whatever the bytes, the parsers answer with a record or CorruptRecord ------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
field_values = {
    "tag": st.sampled_from(["v1.0", "../v1", "v1.0/..", "", "latest", "a" * 70]) | st.text(),
    "content_hash": st.sampled_from([SHA, "A" * 64, "a" * 63]) | st.text(),
    "files": st.sampled_from([record_dict()["files"], {packs.MANIFEST: MD5}]) | json_values,
    "counts": st.sampled_from([record_dict()["counts"]]) | json_values,
}


@FUZZ
@given(
    st.fixed_dictionaries({}, optional={k: v for k, v in field_values.items()}),
    st.sampled_from(["v1.0", None]),
)
def test_fuzz_record_fields(changes: dict, expected: str | None) -> None:
    text = json.dumps(record_dict(**changes))
    try:
        record = packs.record_from_json(text, expected)
    except packs.CorruptRecord:
        return
    assert packs.tag_problem(record.tag) is None
    assert expected in (None, record.tag)
    assert packs.SHA256_PATTERN.fullmatch(record.content_hash)
    assert all(packs.MD5_PATTERN.fullmatch(m) for m in record.files.values())


@FUZZ
@given(st.binary(max_size=2000) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_record_bytes(data: bytes) -> None:
    with contextlib.suppress(packs.CorruptRecord):
        packs.record_from_json(data)


path_parts = st.sampled_from(["train", "test", "..", ".", "", "0", "9", "x.png", "a/b"])
paths = st.lists(path_parts, min_size=1, max_size=5).map("/".join) | st.text(max_size=40)


@FUZZ
@given(
    st.lists(
        st.tuples(paths, st.sampled_from([SHA, "x"]), st.sampled_from([MD5, "../y"]))
        .flatmap(lambda t: st.tuples(st.just(t), st.integers(-2, 99), st.integers(-2, 99)))
        .map(lambda t: [*t[0], t[1], t[2]]),
        max_size=6,
    )
)
def test_fuzz_manifest_rows_never_lead_outside(rows: list) -> None:
    try:
        parsed = manifests.parse_manifest(manifest(rows))
    except packs.CorruptRecord:
        return
    root = "/dest"
    for row in parsed:
        path = os.path.normpath(f"{root}/{row.key}")
        assert path == f"{root}/{row.key}" and path.count("/") == 4
        assert row.split in ("train", "test") and 0 <= row.label <= 9


@FUZZ
@given(st.binary(max_size=500))
def test_fuzz_manifest_bytes(data: bytes) -> None:
    for candidate in (data, gzip.compress(data)):
        with contextlib.suppress(packs.CorruptRecord):
            manifests.parse_manifest(candidate)


@FUZZ
@given(st.text(max_size=30) | st.binary(max_size=30).map(os.fsdecode))
def test_fuzz_file_names(name: str) -> None:
    if images.name_problem(name) is None:
        assert "/" not in name and name not in (".", "..") and not name.startswith(".")
        assert name.encode("utf-8").decode() == name and name.isprintable()
        assert os.path.normpath(f"/d/{name}") == f"/d/{name}"


def test_a_cached_record_of_an_older_format_is_read_again(tmp_path: Path) -> None:
    """A record this machine kept in an older format is not an error: it is ignored and
    the object store asked again."""
    from mnistops.data import reader, registry
    from mnistops.settings import Settings

    settings = Settings(home=tmp_path)
    folder = tmp_path / "cache" / "versions"
    folder.mkdir(parents=True)
    (folder / "v1.0.json").write_text(json.dumps(record_dict(format=0)))
    assert reader.cached_record(settings, "v1.0") is None
    (folder / "v1.0.json").write_text(json.dumps(record_dict()))
    assert reader.cached_record(settings, "v1.0").tag == "v1.0"
    with pytest.raises(registry.RegistryError, match="not a usable tag"):
        reader.cached_record(settings, "../x")
