"""The state dir of a stack: where its process records, logs and locks live."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mnistops.clients import s3_keys
from mnistops.credentials import (
    CredentialsError,
    S3Keys,
    ensure_keys,
    load_keys,
    make_private_home,
)
from mnistops.errors import MnistopsError
from mnistops.settings import Settings

Report = Callable[[str], None]


def no_report(_message: str) -> None:
    """The default `report`: say nothing."""


class StackError(MnistopsError):
    """The stack could not be brought to the state asked for; the message says why."""


def run_dir(settings: Settings) -> Path:
    return settings.home / "run"


def log_dir(settings: Settings) -> Path:
    return settings.home / "logs"


@contextmanager
def state_lock(settings: Settings) -> Iterator[None]:
    """One `up`, `down` or worker start at a time per state dir."""
    make_private_home(settings.home)
    with open(settings.home / "stack.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def stack_keys(settings: Settings, create: bool) -> S3Keys | None:
    """The object store's keys: generated in the state dir for our own store (made
    with `create`), the configured ones for an external store."""
    if settings.s3.endpoint_url is None:
        try:
            return ensure_keys(settings.home) if create else load_keys(settings.home)
        except CredentialsError as exc:
            raise StackError(str(exc)) from None
    return s3_keys(settings)
