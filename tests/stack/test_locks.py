"""The stack-wide lock (a Prefect global concurrency limit of 1, taken with a lease): one
holder at a time, the next waits for it, a busy or unreachable lock is a clear error,
and a lease lost while held is reported."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest

from mnistops.clients import prefect_rest
from mnistops.pipeline import check_ready
from mnistops.settings import HyperParameters, Settings
from mnistops.stack import locks
from tests.helpers import closed_port

pytestmark = pytest.mark.integration


def active_slots(settings: Settings, name: str) -> int:
    return int(
        prefect_rest(settings, "GET", f"/v2/concurrency_limits/{name}").json()["active_slots"]
    )


def test_one_holder_at_a_time_and_the_next_waits(
    stack_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"test-lock-{uuid.uuid4().hex[:8]}"
    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with locks.held(stack_settings, name):
            order.append("first in")
            inside.set()
            time.sleep(1.5)
            order.append("first out")

    holder = threading.Thread(target=first)
    holder.start()
    assert inside.wait(30)
    caplog.set_level(logging.WARNING, logger=locks.__name__)
    assert active_slots(stack_settings, name) == 1
    with (
        pytest.raises(locks.LockError, match=f"the lock '{name}' stayed busy for 0 s"),
        locks.held(stack_settings, name, wait_s=0.3),
    ):
        order.append("never")
    with locks.held(stack_settings, name, wait_s=30):
        order.append("second in")
    holder.join()
    assert order == ["first in", "first out", "second in"]
    assert active_slots(stack_settings, name) == 0, "every slot was given back"
    waiting = [r.getMessage() for r in caplog.records if r.name == locks.__name__]
    assert len(waiting) == 2, f"one line per wait, not per try: {waiting}"
    assert all(f"waiting for the lock '{name}'" in line for line in waiting)


def test_a_lease_lost_while_held_is_reported(
    stack_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(locks, "RENEW_S", 0.2)
    name = f"test-lock-{uuid.uuid4().hex[:8]}"
    with locks.held(stack_settings, name):
        time.sleep(0.7)  # renewed a few times: still held
        assert active_slots(stack_settings, name) == 1
    taken: list[str] = []
    take = locks._take
    monkeypatch.setattr(locks, "_take", lambda *a: taken.append(take(*a)) or taken[-1])
    with (
        pytest.raises(locks.LockError, match="was lost while it was held.*HTTP 410"),
        locks.held(stack_settings, name),
    ):
        revoked = prefect_rest(
            stack_settings,
            "POST",
            "/v2/concurrency_limits/decrement-with-lease",
            {"lease_id": taken[-1]},
        )
        assert revoked.status_code == 204, revoked.text
        time.sleep(0.7)


def test_a_limit_changed_by_hand_is_named(stack_settings: Settings) -> None:
    name = f"test-lock-{uuid.uuid4().hex[:8]}"
    made = prefect_rest(
        stack_settings, "POST", "/v2/concurrency_limits/", {"name": name, "limit": 3}
    )
    assert made.status_code == 201, made.text
    with (
        pytest.raises(locks.LockError, match=f"'{name}' exists with limit 3.*must be 1"),
        locks.held(stack_settings, name),
    ):
        pass


def test_an_unreachable_server_is_named(stack_settings: Settings) -> None:
    with closed_port() as port:
        nowhere = stack_settings.model_copy(
            update={
                "prefect": stack_settings.prefect.model_copy(
                    update={"api_url": f"http://127.0.0.1:{port}/api"}
                )
            }
        )
        began = time.monotonic()
        with (
            pytest.raises(locks.LockError, match=f"127.0.0.1:{port}/api: ConnectError"),
            locks.held(nowhere, "anything"),
        ):
            pass
        with pytest.raises(locks.LockError, match=f"127.0.0.1:{port}/api: ConnectError"):
            check_ready(nowhere, HyperParameters())  # before any training, not after it
    assert time.monotonic() - began < 10
