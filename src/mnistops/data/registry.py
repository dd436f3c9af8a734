"""The data registry: a git repo and DVC project whose remote is the object store.

`publish` makes a version (validate, pack, `dvc add`, `dvc push`, read back, commit,
record, annotated tag); `diff`, like `pulling.pull` and `reader.list_versions`, needs
only the object store, so it works on a machine that has no copy of the registry.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mnistops.clients import library_defaults, s3_keys
from mnistops.data import folder_guard, images, manifests, packs, remote, scan_index
from mnistops.data.reader import (
    RegistryError,
    VersionRefused,
    bucket_of,
    cache_of,
    check_tag,
    find_record,
    load_manifest,
    remember_record,
    store_client,
)
from mnistops.logs import quiet_libraries
from mnistops.settings import Settings

DATASET_DIR = "dataset"
RECORD_FILE = "version.json"
DVC_REMOTE = "storage"
ProgressFor = Callable[[str, int], Callable[[int], None]]
Report = Callable[[str], None]


def _no_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _k: None


@dataclass(frozen=True)
class ClassChange:
    split: str
    label: int
    added: int
    removed: int
    from_feedback: int = 0
    """of the added, images labelled through the service's /feedback"""


FEEDBACK_NAME = "feedback-"
"""file names of images added from /feedback labels (`data add --feedback`)"""


@dataclass(frozen=True)
class PublishResult:
    record: packs.VersionRecord
    changes: list[ClassChange]
    new_images: int
    new_objects: int
    new_bytes: int


def _git(registry: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(registry), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RegistryError(f"git {' '.join(args)} failed in {registry}: {result.stderr.strip()}")
    return result.stdout.strip()


def ensure_registry(settings: Settings) -> Path:
    """Create the git+DVC registry if missing, and point its DVC remote at the stack's bucket."""
    from dvc.repo import Repo

    quiet_libraries()

    registry = settings.registry_dir
    if not (registry / ".git").is_dir():
        registry.mkdir(parents=True, exist_ok=True)
        _git(registry, "init", "-q", "-b", "main")
        _git(registry, "config", "user.name", "mnistops")
        _git(registry, "config", "user.email", "mnistops@localhost")
    if not (registry / ".dvc").is_dir():
        with contextlib.redirect_stdout(io.StringIO()):
            Repo.init(str(registry))
        _git(registry, "add", ".dvc", ".dvcignore")
        _git(registry, "commit", "-q", "-m", "Data registry: git + DVC")
    repo = Repo(str(registry))
    try:
        with repo.config.edit(level="repo") as conf:
            conf["remote"][DVC_REMOTE] = {"url": f"s3://{bucket_of(settings)}/{remote.DVC_PREFIX}"}
            conf["core"]["remote"] = DVC_REMOTE
            conf["core"]["autostage"] = True
        # Machine-specific: the endpoint and keys stay out of git (config.local, mode 0600).
        with repo.config.edit(level="local") as conf:
            local = {"endpointurl": settings.s3_endpoint, "region": settings.s3.region}
            keys = s3_keys(settings)
            if keys:
                local.update(
                    access_key_id=keys.access_key_id, secret_access_key=keys.secret_access_key
                )
            conf["remote"][DVC_REMOTE] = local
    finally:
        repo.close()
    local_config = registry / ".dvc" / "config.local"
    if local_config.exists():
        local_config.chmod(0o600)
    if _git(registry, "status", "--porcelain", ".dvc/config"):
        _git(registry, "add", ".dvc/config")
        _git(registry, "commit", "-q", "-m", "DVC remote: the object store")
    return registry


def changes_between(
    old: list[manifests.ManifestRow], new: list[manifests.ManifestRow]
) -> list[ClassChange]:
    """Images added and removed per split and digit (an image is its bytes: a renamed one
    is neither)."""
    before = Counter((r.split, r.label, r.sha256) for r in old)
    after = Counter((r.split, r.label, r.sha256) for r in new)
    added = Counter((s, d) for (s, d, _), n in (after - before).items() for _ in range(n))
    removed = Counter((s, d) for (s, d, _), n in (before - after).items() for _ in range(n))
    new_keys = after - before
    feedback = Counter(
        (r.split, r.label)
        for r in new
        if r.key.rsplit("/", 1)[-1].startswith(FEEDBACK_NAME)
        and new_keys[(r.split, r.label, r.sha256)] > 0
    )
    return [
        ClassChange(
            split,
            digit,
            added[(split, digit)],
            removed[(split, digit)],
            min(feedback[(split, digit)], added[(split, digit)]),
        )
        for split in images.VERSION_SPLITS
        for digit in range(10)
    ]


def diff(settings: Settings, tag_a: str, tag_b: str) -> list[ClassChange]:
    """Images added and removed per class going from version A to version B."""
    rows_a = load_manifest(settings, find_record(settings, tag_a))
    rows_b = load_manifest(settings, find_record(settings, tag_b))
    return changes_between(rows_a, rows_b)


INTERRUPT_AT_ENV = "MNISTOPS_TEST_INTERRUPT_AT"
"""tests only: a publish step name; the command gets SIGINT right after that step"""
PAUSE_AT_ENV = "MNISTOPS_TEST_PAUSE_AT"
"""tests only: a publish step name; the command stops itself (SIGSTOP) right after it"""


def _step_done(step: str) -> None:
    if os.environ.get(INTERRUPT_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the signal is handled here, as a Ctrl-C between two steps
    if os.environ.get(PAUSE_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGSTOP)


@contextlib.contextmanager
def _publishing(settings: Settings) -> Iterator[None]:
    """One `data version` at a time per registry (across processes, and across machines
    that share the registry's folder)."""
    lock = settings.registry_dir.parent / f".{settings.registry_dir.name}.publish.lock"
    refusal = RegistryError(
        f"another `mnistops data version` is publishing into {settings.registry_dir};"
        " wait for it to finish, then run this again"
    )
    with folder_guard.held_or_refused(lock, refusal):
        yield


def publish(
    settings: Settings,
    tag: str,
    message: str,
    force: bool = False,
    progress_for: ProgressFor = _no_progress,
    report: Report = lambda _m: None,
) -> PublishResult:
    """Validate the dataset, record it with DVC, push, read back, commit, tag, record.

    One publisher at a time per registry. Nothing is tagged or recorded in the bucket
    unless every object is on the remote and reads back with its hash. The record in
    the bucket is written last: it is what publishes. An interruption before it leaves
    no tag (a leftover of a killed run is moved by the next one) and re-running the
    same command finishes the job; after it, the version is complete.
    """
    check_tag(tag)
    locks = settings.home / "locks"
    with (
        _publishing(settings),
        folder_guard.dataset_in_use(settings.mnist_dir, locks, "data version"),
    ):
        return _publish(settings, tag, message, force, progress_for, report)


def _publish(
    settings: Settings,
    tag: str,
    message: str,
    force: bool,
    progress_for: ProgressFor,
    report: Report,
) -> PublishResult:
    from dvc.repo import Repo

    quiet_libraries()

    if tag == "latest":
        raise VersionRefused("'latest' names the newest version; choose another tag (e.g. v1.0)")
    library_defaults()  # DVC's boto reads the checksum setting from the environment only
    client = store_client(settings)
    bucket = bucket_of(settings)
    try:
        existing = remote.read_record(client, bucket, tag)
    except packs.CorruptRecord as exc:
        if not force:
            raise VersionRefused(f"{exc}\nReplace it with --force.") from None
        existing = None
    if existing is not None and not force:
        raise VersionRefused(
            f"data version '{tag}' exists already (published {existing.created});"
            " choose another tag, or --force to replace it. If its retraining did not"
            " start, start one with `mnistops run`"
        )
    folder_guard.check_ingest_finished(settings.mnist_dir)
    entries = images.scan(
        settings.mnist_dir,
        scan_index.index_path(settings.home),
        progress_for("validating", 0),
    )
    digest = packs.content_hash(entries)
    records = remote.list_records(client, bucket).records
    previous = next((r for r in reversed(records) if r.tag != tag), None)
    if previous is not None and previous.content_hash == digest:
        raise VersionRefused(
            f"nothing changed since {previous.tag}: the dataset in "
            f"{settings.mnist_dir} is identical to it"
        )
    _step_done("validated")
    cache = cache_of(settings)
    old_rows = load_manifest(settings, previous, client) if previous else []
    if previous:
        remote.fetch(client, bucket, cache, previous.files.values())
    known = {row.sha256: row.location for row in old_rows}
    locations = _packed(cache, entries, known, tag)
    manifest_md5 = cache.put(manifests.build_manifest(entries, locations))
    rows = manifests.parse_manifest(cache.read(manifest_md5))
    files = manifests.dataset_files(manifest_md5, rows)
    stored = set(previous.files.values()) if previous else set()
    new_md5s = [m for m in files.values() if m not in stored]

    _step_done("packed")
    registry = ensure_registry(settings)
    _lay_out_dataset(registry / DATASET_DIR, files, cache)
    report(
        f"pushing {len(new_md5s)} new object{'' if len(new_md5s) == 1 else 's'}"
        f" to s3://{bucket}/{remote.DVC_PREFIX}"
    )
    unfinished = (
        f"Nothing was tagged. Once the object store is back, run"
        f" `mnistops data version {tag}` again to finish."
    )
    repo = Repo(str(registry))
    try:
        repo.add(str(registry / DATASET_DIR))
        try:
            # Our upload shows progress; `dvc push` then finds those objects on the remote
            # and sends what DVC itself needs (the folder listing), as `dvc push` would.
            remote.upload(client, bucket, cache, new_md5s, progress_for("pushing", len(new_md5s)))
            repo.push(remote=DVC_REMOTE)
        except packs.StoreError as exc:
            raise RegistryError(f"{exc}\n{unfinished}") from None
        except Exception as exc:  # noqa: BLE001  DVC's own errors: named, nothing published
            raise RegistryError(
                f"pushing the data to {settings.s3_endpoint} failed ({type(exc).__name__}:"
                f" {exc}). {unfinished}"
            ) from None
    finally:
        repo.close()
    _step_done("pushed")
    try:
        remote.verify_remote(client, bucket, files.values(), progress_for("verifying", len(files)))
    except packs.StoreError as exc:
        raise RegistryError(
            f"{exc}\nNothing was tagged; run `mnistops data version {tag}` again to finish."
        ) from None

    _step_done("verified")
    # A version replaced with --force keeps its place in the history: its date and
    # the version before it (so it does not become 'latest', and v2.0 not its past).
    record = packs.VersionRecord(
        tag=tag,
        message=message,
        created=existing.created
        if existing
        else datetime.now(UTC).isoformat(timespec="milliseconds"),
        content_hash=digest,
        counts={
            s: {str(d): n for d, n in per.items()} for s, per in images.counts(entries).items()
        },
        files=files,
        previous=existing.previous if existing else (previous.tag if previous else None),
        remote=f"s3://{bucket}/{remote.DVC_PREFIX}",
        format=packs.FORMAT,
    )
    (registry / RECORD_FILE).write_text(record.to_json() + "\n")
    _git(registry, "add", f"{DATASET_DIR}.dvc", ".gitignore", RECORD_FILE)
    if _git(registry, "status", "--porcelain"):
        _git(registry, "commit", "-q", "-m", f"{tag}: {message}")
    record.commit = _git(registry, "rev-parse", "HEAD")
    _step_done("committed")
    # No record names this tag in the bucket (or --force): a tag of that name here is a
    # leftover of an interrupted publish, and is moved.
    _git(registry, "tag", "-a", "-f", tag, "-m", message)
    try:
        _step_done("tagged")
        _record(client, bucket, record, replacing=existing is not None)
    except BaseException:
        _git(registry, "tag", "-d", tag)
        raise
    _step_done("recorded")
    remember_record(settings, record)
    new_bytes = sum(cache.path(m).stat().st_size for m in new_md5s)
    return PublishResult(
        record,
        changes_between(_rows_before(settings, record, previous, old_rows, client), rows),
        new_images=sum(1 for e in entries if e.sha256 not in known),
        new_objects=len(new_md5s),
        new_bytes=new_bytes,
    )


def _packed(
    cache: packs.ObjectCache,
    entries: list[images.ImageEntry],
    known: dict[str, packs.Location],
    tag: str,
) -> dict[str, packs.Location]:
    """The new images packed, exactly as they were validated (a file removed or changed
    since is refused by name: what is pushed is what was checked)."""
    try:
        return packs.build_packs(cache, entries, known)
    except packs.DatasetChanged as exc:
        raise VersionRefused(
            f"{exc}: nothing was published. Run `mnistops data version {tag}` again once"
            " nothing else changes the folder"
        ) from None


def _record(
    client: remote.S3Client, bucket: str, record: packs.VersionRecord, replacing: bool
) -> None:
    """Publish: the version's place in the order every host sees (a version replaced with
    --force keeps its own), then its record, which is what makes it a version."""
    if not replacing or record.tag not in remote.read_order(client, bucket)[0]:
        place = remote.claim_place(client, bucket, record.tag)
        # the version just before it in the order every host sees (another host may have
        # published between the start of this publish and now)
        record.previous = remote.predecessor(client, bucket, record.tag, place)
    remote.write_record(client, bucket, record, create_only=not replacing)


def _rows_before(
    settings: Settings,
    record: packs.VersionRecord,
    newest: packs.VersionRecord | None,
    newest_rows: list[manifests.ManifestRow],
    client: remote.S3Client,
) -> list[manifests.ManifestRow]:
    """The manifest of the version the record says came before it (for --force on an
    older tag that is not the newest other version)."""
    if record.previous is None:
        return []
    if newest is not None and newest.tag == record.previous:
        return newest_rows
    try:
        return load_manifest(settings, find_record(settings, record.previous, client), client)
    except (RegistryError, packs.StoreError):
        return []


def _lay_out_dataset(folder: Path, files: dict[str, str], cache: packs.ObjectCache) -> None:
    """Make dataset/ hold exactly the version's manifest and packs (copies from the cache)."""
    if folder.exists():
        shutil.rmtree(folder)
    for name, md5 in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache.path(md5), target)
