"""Locks that every machine of the stack sees: Prefect's global concurrency limits.

The champion gate reads the champion, compares and moves the alias; two registrations
doing that at once (a `mnistops train` beside a flow run, two workers on two machines)
could both beat the old champion and the later write would win, worse or not. Every
gate holds one slot of a limit of 1 on the stack's Prefect server while it decides: a
server-side lock with a lease, so a holder that dies frees it when the lease runs out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress

from mnistops.clients import prefect_api
from mnistops.errors import MnistopsError
from mnistops.settings import Settings

LEASE_S = 60
"""a crashed holder blocks the gate for at most this long"""
WAIT_S = 300


class LockError(MnistopsError):
    """The lock could not be taken: Prefect is unreachable, or the gate stayed busy."""


def _ensure_limit(name: str) -> None:
    """A global concurrency limit of 1 named `name`, active (created once per server)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # made by another process just now
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
                )
            return
    if limit.limit != 1 or not limit.active:
        raise LockError(
            f"the Prefect concurrency limit '{name}' exists with limit {limit.limit}"
            f" (active: {limit.active}); it must be 1 and active: delete it and mnistops"
            " makes it again"
        )


@contextmanager
def held(settings: Settings, name: str, wait_s: float = WAIT_S) -> Iterator[None]:
    """Hold the stack-wide lock `name` for the body of the `with`."""
    import httpx
    from prefect.concurrency.sync import concurrency

    taken = ExitStack()
    try:
        taken.enter_context(prefect_api(settings))
        _ensure_limit(name)
        taken.enter_context(
            concurrency(name, occupy=1, timeout_seconds=wait_s, lease_duration=LEASE_S, strict=True)
        )
    except TimeoutError:
        taken.close()
        raise LockError(f"the lock '{name}' stayed busy for {wait_s:.0f} s") from None
    except httpx.HTTPError as exc:
        taken.close()
        raise LockError(
            f"the lock '{name}' needs the Prefect server at {settings.prefect_api_url}:"
            f" {exc.__class__.__name__}; start the stack or set prefect.api_url"
        ) from None
    with taken:
        yield


def champion_lock_name(model_name: str) -> str:
    return f"mnistops-champion-gate-{model_name}"
