"""A new stack's Prefect database (SQLite) starts as a copy of an empty, migrated one.

Prefect migrates a new database at its first start (over a hundred migrations), then
registers its block types in it: about 5 s of processor time and as long a wait on two
cores, for every new state dir. The result is the same for every stack of one Prefect
version, so it is made once per machine into the user's cache (`$XDG_CACHE_HOME/mnistops`,
else `~/.cache/mnistops`) and copied. Prefect still checks the copy when it starts, and
runs any migration it lacks.

A first stack on a machine need not make it either: mnistops ships the template of the
Prefect version it pins (`resources/prefect/`, gzipped, made by `make prefect-template`
with Prefect's own migrations), which is unpacked into the cache when the cache has
none, and only when its SHA-256 is the one `SHA256SUMS` beside it lists (a damaged
installation, or another file put in its place, is never used; whoever can write the
installed package can change its code too).
From an empty cache, a new stack's `stack up` took 8-9 s longer making the template
(19.2 and 19.8 s against 10.6 and 11.2 s, alternating). Another Prefect version has no
shipped template and makes its own, as before.

The cache is the user's own: a template another user could have written (a file or
folder not owned by this user, or writable by others) is never copied, nor one that is
not a migrated SQLite database (a truncated copy); a new one is made in its place, or,
where that cannot be, Prefect migrates the database itself.
"""

from __future__ import annotations

import fcntl
import gzip
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing
from importlib import resources
from importlib.metadata import version
from pathlib import Path

from mnistops.checksums import read_sums, sha256_of, write_sum

MAKE_TIMEOUT_S = 300

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mnistops"


TEMPLATE_FORMAT = 2
"""1: migrated; 2: migrated, with the block types"""


def template_path() -> Path:
    return cache_dir() / f"prefect-{version('prefect')}-{TEMPLATE_FORMAT}.db"


CHECKSUMS = "SHA256SUMS"
"""beside the shipped templates: `sha256sum` lines of each"""


def shipped_template() -> Path:
    """Where mnistops ships the template of the installed Prefect version, if it does."""
    folder = Path(str(resources.files("mnistops") / "resources" / "prefect"))
    return folder / f"{template_path().name}.gz"


def owned_privately(path: Path) -> bool:
    """The path is this user's, and nobody else may write it."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022 and not path.is_symlink()


def migrated(database: Path) -> bool:
    """The file is an SQLite database that Prefect's migrations stamped (not a truncated
    or damaged copy, which would stop Prefect from starting)."""
    try:
        # immutable: read as a plain file, leaving no -wal or -shm file beside it
        with closing(sqlite3.connect(f"file:{database}?mode=ro&immutable=1", uri=True)) as db:
            rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return False
    return len(rows) == 1


def seed(database: Path, env: dict[str, str]) -> bool:
    """Copy the template to `database` when that does not exist yet, making the
    template first if there is none; True when `database` was seeded. `env` is the
    server's environment (without its database settings). Any failure leaves `database`
    absent, and Prefect makes it at its start as before."""
    if database.exists():
        return False
    template = template_path()
    try:
        folder = _private_folder(template.parent)
        if folder is None:
            return False
        with _making_lock(folder):
            if not (owned_privately(template) and migrated(template)):
                for stale in folder.glob(".making-*"):  # of a making killed half-way
                    shutil.rmtree(stale, ignore_errors=True)
                if not _unpack_shipped(template):
                    _make(template, env)
        partial = database.with_name(database.name + ".partial")
        shutil.copyfile(template, partial)
        os.chmod(partial, 0o600)
        os.replace(partial, database)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _private_folder(folder: Path) -> Path | None:
    """The cache folder, made for this user only; None (and one warning line) when it is
    somebody else's or others may write it."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if owned_privately(folder):
        return folder
    info = folder.lstat()
    log.warning(
        "the cache folder %s is not this user's alone (owner uid %d, mode %s), so its"
        " Prefect database is not used: each new stack migrates its own (seconds). Fix:"
        " chmod 700 %s if it is yours, or set XDG_CACHE_HOME to a folder of your own",
        folder,
        info.st_uid,
        oct(info.st_mode & 0o777),
        folder,
    )
    return None


class _making_lock:
    """One process makes the template; another waits for it, then copies it."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".prefect-db.lock"

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)


def _checksum_ok(source: Path) -> bool:
    """The shipped file is the one `write_shipped` wrote: its SHA-256 is in SHA256SUMS
    beside it (a damaged or replaced file in the installation is never unpacked)."""
    try:
        if read_sums(source.parent / CHECKSUMS).get(source.name) == sha256_of(source):
            return True
    except OSError:
        return False
    log.warning(
        "the Prefect database shipped with mnistops (%s) does not match its checksum in %s:"
        " it is not used, and one is made instead (seconds); reinstall mnistops to fix it",
        source,
        CHECKSUMS,
    )
    return False


def _unpack_shipped(template: Path) -> bool:
    """Put the shipped template of this Prefect version in place; False when none is
    shipped, its checksum does not match, or it is not a migrated database unpacked."""
    source = shipped_template()
    if not source.is_file() or not _checksum_ok(source):
        return False
    with tempfile.TemporaryDirectory(prefix=".making-", dir=template.parent) as tmp:
        unpacked = Path(tmp) / "prefect.db"
        try:
            with gzip.open(source) as packed, unpacked.open("wb") as out:
                shutil.copyfileobj(packed, out)
        except (OSError, EOFError):
            return False
        if not migrated(unpacked):
            return False
        os.chmod(unpacked, 0o600)
        os.replace(unpacked, template)
    return True


def write_shipped(env: dict[str, str] | None = None) -> Path:
    """Make the template of the installed Prefect version with Prefect's migrations and
    write it, compacted and gzipped, where `shipped_template` finds it (`make
    prefect-template`, after a change of Prefect's pin)."""
    target = shipped_template()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prefect-template-") as tmp:
        made = Path(tmp) / template_path().name
        _make(made, dict(os.environ) if env is None else env)
        compact = Path(tmp) / "compact.db"
        with closing(sqlite3.connect(made)) as db:
            db.execute("VACUUM INTO ?", (str(compact),))
        with compact.open("rb") as source, gzip.GzipFile(target, "wb", 9, mtime=0) as out:
            shutil.copyfileobj(source, out)
    write_sum(target.parent / CHECKSUMS, target)
    return target


def _make(template: Path, env: dict[str, str]) -> None:
    """Migrate an empty database and register Prefect's block types in it, as Prefect's
    first start does (or, if Prefect's startup calls moved, migrate it with Prefect's own
    command), then put it in place."""
    from mnistops.compat import PREFECT_DATABASE_WITH_BLOCK_TYPES

    ways = (
        [sys.executable, "-c", PREFECT_DATABASE_WITH_BLOCK_TYPES],
        [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
    )
    for n, command in enumerate(ways):
        with tempfile.TemporaryDirectory(prefix=".making-", dir=template.parent) as tmp:
            made = Path(tmp) / "prefect.db"
            try:
                subprocess.run(
                    command,
                    env={
                        **env,
                        "PREFECT_HOME": tmp,
                        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{made}",
                    },
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=MAKE_TIMEOUT_S,
                    check=True,
                )
            except subprocess.CalledProcessError:
                if n == len(ways) - 1:
                    raise
                continue
            os.chmod(made, 0o600)
            os.replace(made, template)
            return
