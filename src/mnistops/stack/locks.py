"""Locks that every machine of the stack sees: Prefect's global concurrency limits.

The champion gate reads the champion, compares and moves the alias; two registrations
doing that at once (a `mnistops train` beside a flow run, two workers on two machines)
could both beat the old champion and the later write would win, worse or not. Every
gate holds one slot of a limit of 1 on the stack's Prefect server while it decides: a
server-side lock with a lease, so a holder that dies frees it when the lease runs out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import quote

from mnistops.clients import prefect_rest
from mnistops.errors import MnistopsError
from mnistops.settings import Settings

LEASE_S = 60
"""a crashed holder blocks the gate for at most this long (Prefect's shortest lease)"""
WAIT_S = 300
RENEW_S = LEASE_S / 3
RETRY_S = 1.0
"""the longest wait between two tries for a busy lock"""
LIMITS = "/v2/concurrency_limits"

log = logging.getLogger(__name__)


class LockError(MnistopsError):
    """The lock could not be taken: Prefect is unreachable, or the gate stayed busy."""


class LockUnreachable(LockError):
    """No connection to the lock's Prefect server could be made (refused, or no answer
    to the connection): no request reached it."""


GATE_HOLDER = "a training or promotion at the champion gate"
GATE_IF_LOST = (
    "another gate may have decided at the same time; check the champion with `mnistops models`"
)


@contextmanager
def held(
    settings: Settings,
    name: str,
    wait_s: float = WAIT_S,
    holder: str = GATE_HOLDER,
    if_lost: str = GATE_IF_LOST,
) -> Iterator[None]:
    """Hold the stack-wide lock `name` for the body of the `with`; `holder` says who
    else holds it, in the line shown while this one waits, and `if_lost` what to check
    when the lease was lost meanwhile.

    Prefect's REST API directly, not its client: the lock is taken by `mnistops train`
    and `models promote`, where importing Prefect cost a second of CPU. The same
    calls as Prefect's `concurrency()`: a slot taken with a lease, renewed by a thread
    while the body runs, given back at the end."""
    _ensure_limit(settings, name)
    lease = _take(settings, name, wait_s, holder)
    renewal = _Renewal(settings, name, lease)
    try:
        yield
    finally:
        lost = renewal.stop()
        with suppress(LockError):  # unreachable now: the lease runs out on its own
            _call(settings, name, "POST", f"{LIMITS}/decrement-with-lease", {"lease_id": lease})
    if lost:
        raise LockError(f"the lock '{name}' was lost while it was held ({lost}): {if_lost}")


def check_reachable(settings: Settings, name: str) -> None:
    """The lock's server answers with our login and the lock is usable (LockError else):
    checked before a training starts, so that it fails then, not after its training."""
    _ensure_limit(settings, name)


def _call(settings: Settings, name: str, method: str, path: str, body: object = None) -> Any:
    """One request to the Prefect server; LockError when it cannot be reached or
    refuses our login."""
    import httpx

    try:
        answer = prefect_rest(settings, method, path, body)
    except httpx.HTTPError as exc:
        # Unreachable only when no connection was made, so no request reached the
        # server; one that timed out after it was sent may have taken the slot.
        where = f"the lock '{name}' needs the Prefect server at {settings.prefect_api_url}"
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            raise LockUnreachable(
                f"{where}: {exc.__class__.__name__}; start the stack or set prefect.api_url"
            ) from None
        raise LockError(
            f"{where}: it took the request but gave no answer ({exc.__class__.__name__});"
            " it is busy or stuck: try again, and see `mnistops stack logs prefect`"
        ) from None
    if answer.status_code == 401:
        raise LockError(
            f"the lock '{name}': the Prefect server at {settings.prefect_api_url} refused"
            " our login; set prefect.auth_string"
        )
    return answer


def _ensure_limit(settings: Settings, name: str) -> None:
    """A global concurrency limit of 1 named `name`, active (created once per server)."""
    answer = _call(settings, name, "GET", f"{LIMITS}/{quote(name, safe='')}")
    if answer.status_code == 404:
        made = _call(settings, name, "POST", f"{LIMITS}/", {"name": name, "limit": 1})
        if made.status_code not in (200, 201, 409):  # 409: made by another process just now
            raise _refused(name, made)
        return
    if answer.status_code != 200:
        raise _refused(name, answer)
    limit = answer.json()
    if limit.get("limit") != 1 or not limit.get("active"):
        raise LockError(
            f"the Prefect concurrency limit '{name}' exists with limit {limit.get('limit')}"
            f" (active: {limit.get('active')}); it must be 1 and active: delete it and"
            " mnistops makes it again"
        )


def _take(settings: Settings, name: str, wait_s: float, holder: str) -> str:
    """The lease of the lock's one slot, waiting while another holder has it (one
    warning line says so: the command is not stuck)."""
    deadline = time.monotonic() + wait_s
    body = {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": LEASE_S}
    waited = False
    while True:
        answer = _call(settings, name, "POST", f"{LIMITS}/increment-with-lease", body)
        if answer.status_code == 200:
            return str(answer.json()["lease_id"])
        if answer.status_code != 423:  # 423 Locked: another holder has the slot
            raise _refused(name, answer)
        if not waited:
            waited = True
            log.warning(
                "waiting for the lock '%s': another process holds it (%s, on this machine"
                " or another); up to %.0f s (one that died frees it within %.0f s)",
                name,
                holder,
                wait_s,
                LEASE_S,
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise LockError(f"the lock '{name}' stayed busy for {wait_s:.0f} s")
        time.sleep(min(left, RETRY_S, _retry_after(answer)))


def _retry_after(answer: Any) -> float:
    try:
        return max(0.05, float(answer.headers.get("Retry-After", RETRY_S)))
    except ValueError:
        return RETRY_S


def _refused(name: str, answer: Any) -> LockError:
    return LockError(
        f"the lock '{name}': the Prefect server answered HTTP {answer.status_code}"
        f" ({answer.text[:200]})"
    )


class _Renewal:
    """Renews the lease every RENEW_S until stopped; a renewal that fails
    is kept, for `held` to report once the body has run."""

    def __init__(self, settings: Settings, name: str, lease: str) -> None:
        self.settings, self.name, self.lease = settings, name, lease
        self.done = threading.Event()
        self.lost = ""
        self.thread = threading.Thread(target=self._renew, name=f"lease {name}", daemon=True)
        self.thread.start()

    def _renew(self) -> None:
        path = f"{LIMITS}/leases/{self.lease}/renew"
        while not self.done.wait(RENEW_S):
            try:
                answer = _call(self.settings, self.name, "POST", path, {"lease_duration": LEASE_S})
            except LockError as exc:
                self.lost = str(exc)
                return
            if answer.status_code != 204:
                self.lost = f"renewing its lease: HTTP {answer.status_code}"
                return

    def stop(self) -> str:
        """Stop renewing; what went wrong with a renewal, if anything."""
        self.done.set()
        self.thread.join()
        return self.lost


def champion_lock_name(model_name: str) -> str:
    return f"mnistops-champion-gate-{model_name}"
