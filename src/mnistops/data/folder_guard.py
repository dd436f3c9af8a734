"""Who may change a dataset folder, and whether it is whole: one `data ingest`, `data add`
or `data version` at a time, and no publishing of a folder an ingest left unfinished."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mnistops.data.images import InvalidDataset
from mnistops.errors import BadInput

UNFINISHED_INGEST = ".ingest-unfinished"
"""in a dataset folder while `data ingest` writes it; left there when it was interrupted"""


def check_ingest_finished(root: Path) -> None:
    """A folder an interrupted `data ingest` left is refused: its splits may be partial
    (a test split of 5,939 images published as a version, in an outside try)."""
    if (root / UNFINISHED_INGEST).exists():
        raise InvalidDataset(
            [
                (
                    root,
                    "an `mnistops data ingest` into it did not finish (interrupted?), so a"
                    " split may be partial: run `mnistops data ingest` again (without --fast"
                    " after a full one), then publish",
                )
            ]
        )


class DatasetBusy(BadInput):
    """Another `data ingest`, `data add` or `data version` is using the same dataset folder."""


@contextmanager
def dataset_in_use(folder: Path, locks: Path, command: str) -> Iterator[None]:
    """One `data ingest`, `data add` or `data version` at a time on a dataset folder (a lock
    in `locks`, the state dir's, named after the folder and released when the process
    ends, however it ends); the other one is refused. Nothing is written beside the dataset."""
    name = hashlib.sha256(str(folder.absolute()).encode()).hexdigest()[:16]
    refusal = DatasetBusy(
        f"{folder} is being changed or published by another `mnistops data ingest`,"
        f" `mnistops data add` or `mnistops data version`; wait for it to finish, then"
        f" run `mnistops {command}` again"
    )
    with held_or_refused(locks / f"dataset-{name}.lock", refusal):
        yield


@contextmanager
def held_or_refused(lock: Path, refusal: Exception) -> Iterator[None]:
    """An exclusive lock on the file `lock` for the body, released when the process ends
    however it ends; `refusal` is raised at once when another process holds it."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise refusal from None
        yield
