"""Which failures of the lock's server let a caller go on without the lock: only a
connection never made (no request reached the server). A request sent and not answered
in time may have taken the slot, so it is an error, never "unreachable"."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from mnistops.loop.monitoring import one_window_at_a_time
from mnistops.settings import Settings, load_settings
from mnistops.stack import locks
from tests.helpers import write_stack_config

pytestmark = pytest.mark.unit


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(write_stack_config(tmp_path))


def failing_with(exc: Exception) -> object:
    def request(*_args: object, **_kwargs: object) -> object:
        raise exc

    return request


@pytest.mark.parametrize(
    ("exc", "unreachable"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ConnectTimeout("no answer to the connection"), True),
        (httpx.ReadTimeout("sent, not answered"), False),
        (httpx.RemoteProtocolError("closed mid-answer"), False),
    ],
)
def test_only_a_connection_never_made_is_unreachable(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, exc: Exception, unreachable: bool
) -> None:
    monkeypatch.setattr(locks, "prefect_rest", failing_with(exc))
    with pytest.raises(locks.LockError) as raised:
        locks.check_reachable(settings, "anything")
    assert isinstance(raised.value, locks.LockUnreachable) is unreachable
    assert type(exc).__name__ in str(raised.value)
    advice = "start the stack" if unreachable else "gave no answer"
    assert advice in str(raised.value)


def test_monitoring_goes_on_without_the_lock_only_when_prefect_is_unreachable(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Unreachable: the window is judged (its drift event cannot be sent either, so it
    is judged again later). Slow: the command stops, as another run may hold the lock."""
    monkeypatch.setattr(locks, "prefect_rest", failing_with(httpx.ConnectError("refused")))
    judged = False
    with caplog.at_level(logging.WARNING), one_window_at_a_time(settings):
        judged = True
    assert judged and "judging without the monitoring lock" in caplog.text
    monkeypatch.setattr(locks, "prefect_rest", failing_with(httpx.ReadTimeout("slow")))
    with pytest.raises(locks.LockError, match="ReadTimeout"), one_window_at_a_time(settings):
        pytest.fail("judged without the lock while another run may hold it")
