"""Validation of PNG folders: every bad input is refused with the file named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistops.data import images, scan_index

pytestmark = pytest.mark.unit


def png(
    path: Path, pixels: np.ndarray | None = None, mode: str = "L", size: tuple[int, int] = (28, 28)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels is None:
        pixels = np.random.default_rng(abs(hash(str(path))) % 2**32).integers(
            0, 255, (size[1], size[0]), dtype=np.uint8
        )
    img = Image.fromarray(pixels, mode="L")
    if mode != "L":
        img = img.convert(mode)
    img.save(path)
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "MNIST"
    for split in ("train", "test"):
        for digit in range(10):
            for n in range(2):
                png(root / split / str(digit) / f"{n}.png")
    return root


def test_a_good_dataset_passes(dataset: Path, tmp_path: Path) -> None:
    entries = images.scan(dataset, tmp_path / "index.json")
    assert len(entries) == 40
    assert images.counts(entries)["test"] == {d: 2 for d in range(10)}
    again = images.scan(dataset, tmp_path / "index.json")
    assert [e.sha256 for e in again] == [e.sha256 for e in entries], "index gives the same hashes"


def _break(dataset: Path, case: str) -> Path:
    target = dataset / "train" / "3" / "bad.png"
    if case == "truncated":
        good = png(dataset / "train" / "3" / "tmp.png")
        target.write_bytes(good.read_bytes()[:60])
        good.unlink()
    elif case == "zero-byte":
        target.write_bytes(b"")
    elif case == "text":
        target.write_text("this is not an image")
    elif case == "16-bit":
        Image.fromarray(np.full((28, 28), 40000, dtype=np.uint16)).save(target)
    elif case in ("RGB", "RGBA"):
        png(target, mode=case)
    elif case == "wrong size":
        png(target, size=(32, 32))
    elif case == "not png":
        target = dataset / "train" / "3" / "bad.jpg"
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(target, format="JPEG")
    elif case == "label folder":
        target = png(dataset / "train" / "x" / "0.png").parent
    elif case == "in train and test":
        pixels = np.asarray(Image.open(dataset / "test" / "5" / "0.png"))
        target = png(dataset / "train" / "5" / "copy.png", pixels=pixels)
    elif case == "empty class":
        for f in (dataset / "test" / "7").iterdir():
            f.unlink()
        target = dataset / "test" / "7"
    return target


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("truncated", "damaged"),
        ("zero-byte", "empty file"),
        ("text", "not an image"),
        ("16-bit", "expected 8-bit grayscale"),
        ("RGB", "mode RGB"),
        ("RGBA", "mode RGBA"),
        ("wrong size", "size 32x32"),
        ("not png", "not a .png file"),
        ("label folder", "label folder must be one of 0-9"),
        ("in train and test", "the same image is in test"),
        ("empty class", "empty class"),
    ],
)
def test_bad_input_is_refused_with_the_file_named(
    dataset: Path, tmp_path: Path, case: str, reason: str
) -> None:
    target = _break(dataset, case)
    with pytest.raises(images.InvalidDataset) as info:
        images.scan(dataset, tmp_path / "index.json")
    message = str(info.value)
    assert f"{target}: " in message and reason in message, message
    assert "nothing was recorded" in message


@pytest.mark.bad_input
def test_many_problems_show_twenty_and_a_count(dataset: Path, tmp_path: Path) -> None:
    for n in range(25):
        (dataset / "train" / "1" / f"bad{n}.png").write_bytes(b"")
    with pytest.raises(images.InvalidDataset) as info:
        images.scan(dataset, tmp_path / "index.json")
    assert len(info.value.problems) == 25
    assert "... and 5 more" in str(info.value)


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A small PNG file that declares side x side pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * 4096)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.security
@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("bomb", "size 5000x5000, expected 28x28 (not decoded)"),
        ("giant bomb", "decompression bomb"),
        ("link to /dev/zero", "leads outside"),
        ("link outside", "leads outside"),
        ("fifo", "not a regular file"),
        ("too large", "larger than the"),
        ("undecodable name", "not valid UTF-8"),
        ("control character", "control"),
    ],
)
def test_untrusted_files_are_refused_by_name(
    dataset: Path, tmp_path: Path, case: str, reason: str
) -> None:
    folder = dataset / "train" / "4"
    if case == "bomb":
        target = bomb_png(folder / "bomb.png", side=5000)
    elif case == "giant bomb":
        target = bomb_png(folder / "bomb.png")
    elif case == "link to /dev/zero":
        target = folder / "zero.png"
        target.symlink_to("/dev/zero")
    elif case == "link outside":
        target = folder / "outside.png"
        target.symlink_to(png(tmp_path / "elsewhere" / "x.png"))
    elif case == "fifo":
        target = folder / "pipe.png"
        os.mkfifo(target)
    elif case == "too large":
        target = folder / "big.png"
        target.write_bytes(b"\x89PNG" + b"\0" * (2 << 20))
    elif case == "undecodable name":
        target = Path(os.fsdecode(bytes(folder) + b"/bad\xff.png"))
        target.write_bytes(png(tmp_path / "ok.png").read_bytes())
    else:
        target = png(folder / "bad\x1b[2J.png")
    with pytest.raises(images.InvalidDataset) as info:
        images.scan(dataset, tmp_path / "index.json")
    message = str(info.value)
    assert images.shown_name(str(target)) in message and reason in message, message
    assert "\x1b" not in message
    message.encode("utf-8")


@pytest.mark.security
def test_a_link_inside_the_folder_to_a_regular_file_is_read(dataset: Path, tmp_path: Path) -> None:
    extra = png(dataset / "train" / "4" / "extra-source.png")
    os.rename(extra, dataset / "train" / ".hidden-source.png")
    (dataset / "train" / "4" / "linked.png").symlink_to(dataset / "train" / ".hidden-source.png")
    entries = images.scan(dataset, tmp_path / "index.json")
    assert "train/4/linked.png" in {e.key for e in entries}


@pytest.mark.security
@pytest.mark.bad_input
def test_data_add_refuses_bad_names_bombs_and_links_by_name(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    source = tmp_path / "new"
    good = png(source / "3" / "fine.png")
    bomb_png(source / "3" / "bomb.png")
    (source / "5").mkdir()
    (source / "5" / "zero.png").symlink_to("/dev/zero")
    Path(os.fsdecode(bytes(source) + b"/7/caf\xe9.png")).parent.mkdir()
    Path(os.fsdecode(bytes(source) + b"/7/caf\xe9.png")).write_bytes(good.read_bytes())
    result = run_cli("data", "add", str(source), config_dir=tmp_path, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr  # bad input
    text = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    for expected in ("bomb.png", "decompression bomb", "zero.png", "outside", "caf\\xe9.png"):
        assert expected in text, text
    assert not (tmp_path / "data").exists(), "nothing is copied when one file is refused"


def test_the_scan_index_keeps_the_entries_of_other_folders(dataset: Path, tmp_path: Path) -> None:
    """`train --data-dir` scans another folder with the same index: the dataset's own
    entries stay, so the next `data version` decodes nothing again."""
    index = tmp_path / "index.json"
    images.scan(dataset, index)
    other = tmp_path / "other"
    for split in ("train", "test"):
        for digit in range(10):
            png(other / split / str(digit) / "0.png")
    images.scan(other, index)
    kept = json.loads(index.read_text())
    assert sum(k.startswith(str(dataset)) for k in kept) == 40
    assert sum(k.startswith(str(other)) for k in kept) == 20


def test_a_scan_of_the_dataset_keeps_what_ingest_indexed_beside_its_splits(
    dataset: Path, tmp_path: Path
) -> None:
    """ingest indexes `train_v2` too; `data version` scans only train and test, and
    must leave those entries for the `data add` that merges train_v2 later."""
    index = tmp_path / "index.json"
    new = [png(dataset / "train_v2" / str(d) / "1.png") for d in range(10)]
    scan_index.remember(index, [(p, *images.check_file(p)[1:]) for p in new])
    images.scan(dataset, index)
    kept = json.loads(index.read_text())
    assert all(str(p) in kept for p in new)
    assert sum(k.startswith(str(dataset / "train") + os.sep) for k in kept) == 20


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("first", "second"),
    [("caf\u00e9.png", "cafe\u0301.png"), ("seven.png", "Seven.png")],
    ids=["unicode forms", "case"],
)
def test_names_that_are_one_file_elsewhere_are_refused_both_named(
    dataset: Path, tmp_path: Path, first: str, second: str
) -> None:
    """café.png written two ways (NFC, NFD), or two names that differ in case, are two
    files here and one on macOS or Windows: a pull there would lose an image."""
    png(dataset / "train" / "7" / first)
    png(dataset / "train" / "7" / second)
    with pytest.raises(images.InvalidDataset) as refused:
        images.scan(dataset, tmp_path / "index.json")
    message = str(refused.value)
    assert "folds case or Unicode forms" in message, message
    assert first in message and second in message, message


def test_data_add_reads_only_what_the_index_does_not_vouch_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files ingest wrote (in the index, unchanged) are not decoded again; a changed file,
    one rewritten with its old size and mtime, and one reached through a link leading
    out of the folder are checked as before."""
    source = tmp_path / "new"
    known, changed = png(source / "1" / "known.png"), png(source / "2" / "changed.png")
    rewritten = png(source / "4" / "rewritten.png")
    outside = png(tmp_path / "elsewhere" / "3" / "linked.png")
    (source / "3").symlink_to(outside.parent)
    linked = source / "3" / "linked.png"
    index = scan_index.ScanIndex(tmp_path / "index.json")
    for path in (known, changed, linked, rewritten):
        sha = images.check_file(outside if path == linked else path)[1]
        index.remember(path.absolute(), path.lstat(), sha, "recorded")
    changed.write_bytes(b"not a png")
    # the same size and mtime, other bytes (a careless or crafted rewrite: `touch -r`)
    before = rewritten.stat()
    rewritten.write_bytes(b"x" * before.st_size)
    os.utime(rewritten, ns=(before.st_atime_ns, before.st_mtime_ns))
    checked: list[Path] = []
    real = images.check_files

    def spy(paths: list[Path], root: Path | None = None) -> list[tuple[str | None, str, str]]:
        checked.extend(paths)
        return real(paths, root)

    monkeypatch.setattr(images, "check_files", spy)
    found = images.check_files_indexed([known, changed, linked, rewritten], source, index)
    assert checked == [changed, linked, rewritten]
    assert found[0] == (None, images.check_file(known)[1], "recorded")
    assert found[1][0] == "not an image (cannot be decoded)"
    assert found[2][0] and "outside" in found[2][0], found[2]
    assert found[3][0] == "not an image (cannot be decoded)"


def test_a_file_rewritten_between_validation_and_packing_is_refused_then_named(
    dataset: Path, tmp_path: Path
) -> None:
    """A PNG rewritten with its old size and mtime after the scan: packing finds other
    bytes and refuses; the next scan reads it again and names the problem."""
    from mnistops.data import packs, registry

    index = tmp_path / "index.json"
    entries = images.scan(dataset, index)
    victim = dataset / "train" / "3" / "0.png"
    before = victim.stat()
    victim.write_bytes(b"x" * before.st_size)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    cache = packs.ObjectCache(tmp_path / "cache")
    with pytest.raises(registry.VersionRefused, match="changed after it was validated"):
        registry._packed(cache, entries, {}, "v9")
    with pytest.raises(images.InvalidDataset) as refused:
        images.scan(dataset, index)
    assert f"{victim}: not an image (cannot be decoded)" in str(refused.value)


def test_a_published_file_rewritten_behind_the_index_is_read_again(
    dataset: Path, tmp_path: Path
) -> None:
    """Packing re-reads only new images: a file of an earlier version rewritten with its
    old size and mtime must be caught by the scan itself, and a file put back (`cp -p`)
    must pass again instead of being refused for what it held in between."""
    index = tmp_path / "index.json"
    images.scan(dataset, index)
    victim = dataset / "train" / "0" / "1.png"
    good, before = victim.read_bytes(), victim.stat()

    def rewrite(data: bytes) -> None:
        victim.write_bytes(data)
        os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))

    rewrite(b"x" * before.st_size)
    with pytest.raises(images.InvalidDataset) as refused:
        images.scan(dataset, index)
    assert f"{victim}: not an image (cannot be decoded)" in str(refused.value)
    rewrite(good)
    assert len(images.scan(dataset, index)) == 40
