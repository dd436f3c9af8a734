"""The schedule of config/flow.yml: what Prefect's server will plan, and refusals."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from prefect.server.schemas import schedules as server_schedules

from mnistops.flows.deploy import build_schedule
from mnistops.settings import ConfigError, SchedulerSettings, Settings

pytestmark = pytest.mark.unit


def settings_with(**scheduler: object) -> Settings:
    return Settings(scheduler=SchedulerSettings(**scheduler))


def planned(schedule, n: int) -> list[datetime]:
    """The next `n` dates as the Prefect server computes them."""
    server_type = getattr(server_schedules, type(schedule).__name__)
    server = server_type(**schedule.model_dump())
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return asyncio.run(server.get_dates(n=n, start=start, end=start + timedelta(days=5 * 365)))


@pytest.mark.parametrize(
    "rrule",
    ["FREQ=DAILY;BYHOUR=3;BYMINUTE=0", "FREQ=WEEKLY;BYDAY=MO;BYHOUR=3;BYMINUTE=0"],
)
def test_rrule_in_taipei_skips_no_run(rrule: str) -> None:
    dates = planned(
        build_schedule(settings_with(method="rrule", rrule=rrule, timezone="Asia/Taipei")), 60
    )
    assert len(dates) == 60
    local = [d.astimezone(ZoneInfo("Asia/Taipei")) for d in dates]
    assert {(d.hour, d.minute) for d in local} == {(3, 0)}
    step = timedelta(days=1 if "DAILY" in rrule else 7)
    assert all(b - a == step for a, b in zip(dates, dates[1:], strict=False))


def test_cron_and_interval_plan_as_written() -> None:
    cron = planned(build_schedule(settings_with(method="cron", cron="*/15 * * * *")), 5)
    assert all(b - a == timedelta(minutes=15) for a, b in zip(cron, cron[1:], strict=False))
    interval = planned(build_schedule(settings_with(method="interval", interval=90)), 5)
    assert all(b - a == timedelta(seconds=90) for a, b in zip(interval, interval[1:], strict=False))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("scheduler", "key"),
    [
        ({"method": "cron", "cron": "61 * * * *"}, "scheduler.cron"),
        ({"method": "rrule", "rrule": "FREQ=SOMETIMES"}, "scheduler.rrule"),
        ({"timezone": "Mars/Olympus"}, "scheduler.timezone"),
    ],
)
def test_a_bad_schedule_names_the_key(scheduler: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"config/flow.yml: key '{key}'"):
        build_schedule(settings_with(**scheduler))


def test_an_unknown_method_is_refused_when_settings_load() -> None:
    with pytest.raises(ValueError, match="method"):
        SchedulerSettings(method="hourly")
