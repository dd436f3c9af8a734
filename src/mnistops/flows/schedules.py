"""The schedule of the retraining deployment, from `scheduler` in config/flow.yml:
built as Prefect builds it, checked, and planned as the Prefect server plans it."""

from __future__ import annotations

import asyncio
import zoneinfo
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from mnistops.compat import is_cron_without_dates
from mnistops.settings import ConfigError, Settings


def build_schedule(settings: Settings) -> Any:
    """The Prefect schedule of `scheduler`; ConfigError naming the key if it is wrong."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, RRuleSchedule

    sched = settings.scheduler
    try:
        zoneinfo.ZoneInfo(sched.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{settings.where('scheduler.timezone')}: unknown time zone '{sched.timezone}'"
            " (an IANA name such as UTC or Asia/Taipei)"
        ) from None
    try:
        if sched.method == "interval":
            return IntervalSchedule(
                interval=timedelta(seconds=sched.interval), timezone=sched.timezone
            )
        if sched.method == "cron":
            return CronSchedule(cron=sched.cron, timezone=sched.timezone)
        return RRuleSchedule(rrule=sched.rrule, timezone=sched.timezone)
    except (ValidationError, ValueError) as exc:
        reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ConfigError(f"{settings.where(f'scheduler.{sched.method}')}: {reason}") from None


def next_runs(settings: Settings, count: int = 3) -> list[datetime]:
    """The next `count` times the schedule fires, computed as the Prefect server plans
    them; ConfigError naming the key when it never fires again or cannot be planned."""
    import datetime as dt
    import re

    from prefect.server.schemas import schedules as planned

    schedule = build_schedule(settings)
    method = settings.scheduler.method
    where = settings.where(f"scheduler.{method}")
    now = dt.datetime.now(dt.UTC)
    until = re.search(r"UNTIL=(\d{8}T\d{6})Z?", settings.scheduler.rrule or "")
    if method == "rrule" and until:
        end = dt.datetime.strptime(until.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
        if end <= now:
            raise ConfigError(
                f"{where}: the schedule never fires again (its UNTIL, {end:%Y-%m-%d %H:%M}"
                " UTC, has passed); give it an UNTIL in the future or none"
            )
    server = getattr(planned, type(schedule).__name__).model_validate(schedule.model_dump())
    try:
        dates: list[datetime] = asyncio.run(server.get_dates(n=count, start=now))
    except Exception as exc:
        if not is_cron_without_dates(exc):
            if isinstance(exc, ValueError):
                raise ConfigError(f"{where}: Prefect cannot plan this schedule ({exc})") from None
            raise
        dates = []
    if not dates:
        raise ConfigError(f"{where}: the schedule never fires again (no date matches it)")
    return dates


def describe_schedule(settings: Settings) -> str:
    """The schedule in words, e.g. `cron 0 3 * * * (UTC)`."""
    sched = settings.scheduler
    value = {"interval": f"every {sched.interval} s", "cron": sched.cron, "rrule": sched.rrule}
    return f"{sched.method} {value[sched.method]} ({sched.timezone})"
