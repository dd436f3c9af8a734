"""A new stack's Prefect database is a copy of a migrated one from the user's cache, and
only ever of one that this user made (or that mnistops ships, the same as Prefect makes)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from mnistops.stack import prefect_db


def revision(database: Path) -> str:
    with sqlite3.connect(f"file:{database}?mode=ro&immutable=1", uri=True) as db:
        (row,) = db.execute("SELECT version_num FROM alembic_version").fetchall()
    return str(row[0])


def block_types(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return int(db.execute("SELECT count(*) FROM block_type").fetchone()[0])


def schema(database: Path) -> tuple:
    """What Prefect's migrations and startup make: tables, indexes and triggers, the
    revision, the block types and their schemas (not the ids and times of their rows)."""
    with sqlite3.connect(f"file:{database}?mode=ro&immutable=1", uri=True) as db:
        found = db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
        # Alembic's batch migrations write a table's constraints in no fixed order
        objects = sorted((kind, name, sorted(lines(sql))) for kind, name, sql in found)
        types = sorted(db.execute("SELECT slug FROM block_type").fetchall())
        schemas = sorted(db.execute("SELECT checksum, version FROM block_schema").fetchall())
    return objects, revision(database), types, schemas


SHIPPED = prefect_db.shipped_template()
"""the template shipped for the installed Prefect (before any test moves it)"""


def lines(sql: str | None) -> list[str]:
    return [line.strip().rstrip(",").strip() for line in (sql or "").splitlines()]


@pytest.fixture
def nothing_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The template is made here, as for a Prefect version mnistops ships none of."""
    monkeypatch.setattr(prefect_db, "shipped_template", lambda: tmp_path / "none-shipped.db.gz")


@pytest.mark.unit
def test_only_a_private_file_of_this_user_is_trusted(tmp_path: Path) -> None:
    mine = tmp_path / "mine.db"
    mine.write_bytes(b"x")
    mine.chmod(0o600)
    assert prefect_db.owned_privately(mine)
    for mode in (0o620, 0o602):
        mine.chmod(mode)
        assert not prefect_db.owned_privately(mine), oct(mode)
    link = tmp_path / "link.db"
    link.symlink_to(mine)
    mine.chmod(0o600)
    assert not prefect_db.owned_privately(link)
    assert not prefect_db.owned_privately(tmp_path / "missing.db")


@pytest.mark.integration
def test_a_new_database_is_a_copy_and_a_planted_or_damaged_template_is_never_used(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    nothing_shipped: None,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = prefect_db.template_path()
    template.parent.mkdir(parents=True, mode=0o700)
    template.write_text("planted by another user: anything but Prefect's database")
    template.chmod(0o666)
    stale = template.parent / ".making-killed"  # a making killed half-way
    stale.mkdir()
    (stale / "prefect.db").write_bytes(b"half")
    first = tmp_path / "a" / "prefect.db"
    first.parent.mkdir()
    assert prefect_db.seed(first, dict(os.environ))
    assert template.stat().st_mode & 0o777 == 0o600 and prefect_db.owned_privately(template)
    assert first.read_bytes() == template.read_bytes() and revision(first)
    assert block_types(first) > 10, "Prefect's block types are registered in it"
    shipped = tmp_path / "shipped.db"
    shipped.write_bytes(gzip.decompress(SHIPPED.read_bytes()))
    assert schema(shipped) == schema(template), (
        "the template mnistops ships is not what this Prefect makes: `make prefect-template`"
    )
    assert first.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in template.parent.iterdir()) == [
        ".prefect-db.lock",
        template.name,
    ], "nothing half-made is left in the cache"

    again = tmp_path / "c" / "prefect.db"
    again.parent.mkdir()
    assert prefect_db.seed(again, dict(os.environ)) and revision(again) == revision(first)
    assert sorted(p.name for p in template.parent.iterdir()) == [
        ".prefect-db.lock",
        template.name,
    ], "checking the template leaves nothing beside it"
    damaged = tmp_path / "damaged.db"
    for content in (template.read_bytes()[:4096], b"\0" * 8192, b""):  # a full disk, ...
        damaged.write_bytes(content)
        assert not prefect_db.migrated(damaged), "a damaged template is made again"

    first.write_bytes(b"a stack's own data")
    assert not prefect_db.seed(first, dict(os.environ)), "an existing database is kept"
    assert first.read_bytes() == b"a stack's own data"

    template.parent.chmod(0o777)
    other = tmp_path / "b" / "prefect.db"
    other.parent.mkdir()
    with caplog.at_level(logging.WARNING, logger=prefect_db.__name__):
        assert not prefect_db.seed(other, dict(os.environ)), "a cache others may write is not used"
    assert not other.exists() and not list(other.parent.iterdir())
    said = [r.getMessage() for r in caplog.records if r.name == prefect_db.__name__]
    assert len(said) == 1 and str(template.parent) in said[0] and "0o777" in said[0], said
    assert "chmod 700" in said[0] and "XDG_CACHE_HOME" in said[0], "it says how to fix it"


@pytest.mark.integration
def test_without_prefects_startup_calls_the_migrations_alone_are_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nothing_shipped: None
) -> None:
    """An upgrade that moved Prefect's private startup calls: the template is then made
    by `prefect server database upgrade` (Prefect registers the block types itself)."""
    from mnistops import compat

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(compat, "PREFECT_DATABASE_WITH_BLOCK_TYPES", "raise SystemExit(1)")
    database = tmp_path / "prefect.db"
    assert prefect_db.seed(database, dict(os.environ))
    assert revision(database) and block_types(database) == 0


@pytest.mark.unit
def test_the_pinned_prefect_has_its_template_shipped() -> None:
    assert SHIPPED.is_file(), f"no {SHIPPED.name}: run `make prefect-template`"


@pytest.mark.unit
def test_an_empty_cache_gets_the_shipped_template_without_making_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", no_process)
    database = tmp_path / "a" / "prefect.db"
    database.parent.mkdir()
    assert prefect_db.seed(database, dict(os.environ))
    template = prefect_db.template_path()
    assert prefect_db.owned_privately(template) and template.stat().st_mode & 0o777 == 0o600
    assert database.read_bytes() == template.read_bytes() == gzip.decompress(SHIPPED.read_bytes())
    assert revision(database) and block_types(database) > 10
    assert sorted(p.name for p in template.parent.iterdir()) == [".prefect-db.lock", template.name]


def stub_database(path: Path) -> bytes:
    """An SQLite file with only Prefect's revision stamp: it passes as migrated, and
    Prefect cannot start on it."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("INSERT INTO alembic_version VALUES (?)", (revision_of_shipped(),))
    return path.read_bytes()


def revision_of_shipped() -> str:
    return revision_in(gzip.decompress(SHIPPED.read_bytes()))


def revision_in(content: bytes) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        database = Path(tmp) / "db"
        database.write_bytes(content)
        return revision(database)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("content", "listed"),
    [
        ("junk", True),
        ("empty", True),
        ("truncated", True),
        ("not a database", True),
        ("a stub database", False),
        ("the real one plus a row", False),
    ],
)
def test_a_damaged_or_replaced_shipped_template_is_never_used(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    content: str,
    listed: bool,
) -> None:
    """A broken installation, or a file put in the shipped one's place: the template is
    made instead, as without one. `listed`: SHA256SUMS lists the file as it is (the
    checks after the checksum are tried too)."""
    packed = SHIPPED.read_bytes()
    real = tmp_path / "real.db"
    real.write_bytes(gzip.decompress(packed))
    with sqlite3.connect(real) as db:
        db.execute("CREATE TABLE planted (x)")
    data = {
        "junk": b"not gzip at all",
        "empty": b"",
        "truncated": packed[: len(packed) // 2],
        "not a database": gzip.compress(b"SQLite format 3\0" + b"\1" * 5000),
        "a stub database": gzip.compress(stub_database(tmp_path / "stub.db")),
        "the real one plus a row": gzip.compress(real.read_bytes()),
    }[content]
    shipped = tmp_path / "shipped" / SHIPPED.name
    shipped.parent.mkdir()
    shipped.write_bytes(data)
    listed_file = shipped if listed else SHIPPED
    (shipped.parent / prefect_db.CHECKSUMS).write_text(
        f"{hashlib.sha256(listed_file.read_bytes()).hexdigest()}  {shipped.name}\n"
    )
    monkeypatch.setattr(prefect_db, "shipped_template", lambda: shipped)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    made = []
    monkeypatch.setattr(prefect_db, "_make", lambda template, env: made.append(template))
    database = tmp_path / "prefect.db"
    with caplog.at_level(logging.WARNING, logger=prefect_db.__name__):
        assert not prefect_db.seed(database, dict(os.environ)), "nothing to copy: Prefect migrates"
    assert made == [prefect_db.template_path()] and not database.exists()
    assert [p.name for p in prefect_db.template_path().parent.iterdir()] == [".prefect-db.lock"]
    said = [r.getMessage() for r in caplog.records if r.name == prefect_db.__name__]
    if not listed:
        assert len(said) == 1 and str(shipped) in said[0] and "reinstall" in said[0], said


@pytest.mark.unit
def test_the_checksums_list_the_shipped_file() -> None:
    sums = (SHIPPED.parent / prefect_db.CHECKSUMS).read_text().splitlines()
    assert f"{hashlib.sha256(SHIPPED.read_bytes()).hexdigest()}  {SHIPPED.name}" in sums
