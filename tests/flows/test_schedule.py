"""The schedule of config/flow.yml: what Prefect's server will plan, and refusals."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from prefect.server.schemas import schedules as server_schedules

from mnistops.flows.schedules import build_schedule, next_runs
from mnistops.settings import ConfigError, SchedulerSettings, Settings, load_settings

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
def test_a_bad_schedule_names_the_file_and_key(tmp_path: Path, scheduler: dict, key: str) -> None:
    (tmp_path / "flow.yml").write_text(yaml.safe_dump({"scheduler": scheduler}))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'flow.yml'}: key '{key}'"):
        build_schedule(load_settings(tmp_path))


TUTORIAL_FLOW_YML = """
RFS_NAME: mnist-flow-files
deployment:
  flow_name: MNIST
  flow_py_name: flow.py
  deploy_name: mnist-retraining
  pool_name: mnist-cpu
  queue_name: default
scheduler:
  method: rrule
  timezone: Asia/Taipei
  interval: 600
  cron: "*/15 * * * *"
  rrule: "FREQ=WEEKLY;BYDAY=MO,WE,FR;UNTIL=20240731T160000Z"
experiment_name: MNIST
model_registry:
  name: mnist-classifier
"""


@pytest.mark.bad_input
def test_the_tutorials_flow_yml_is_read_and_its_past_rrule_refused(tmp_path: Path) -> None:
    (tmp_path / "flow.yml").write_text(TUTORIAL_FLOW_YML)
    (tmp_path / "dataset.yml").write_text("dvc_remote: minio\ntrain_data_path: data/train\n")
    settings = load_settings(tmp_path)
    notes = " ".join(settings.notes)
    for key in ("'RFS_NAME'", "'deployment.flow_py_name'", "'dvc_remote'", "'train_data_path'"):
        assert f"key {key} is ignored" in notes, notes
    assert settings.deployment.flow_name == "MNIST"
    with pytest.raises(ConfigError) as refused:
        next_runs(settings)
    message = str(refused.value)
    assert f"{tmp_path / 'flow.yml'}: key 'scheduler.rrule'" in message
    assert "never fires again" in message and "UNTIL, 2024-07-31 16:00 UTC, has passed" in message


@pytest.mark.bad_input
def test_a_cron_that_never_fires_is_refused() -> None:
    with pytest.raises(ConfigError, match="scheduler.cron': the schedule never fires again"):
        next_runs(settings_with(method="cron", cron="0 3 31 2 *"))


def test_next_runs_are_the_next_three_dates() -> None:
    dates = next_runs(settings_with(method="cron", cron="0 3 * * *"))
    now = datetime.now(UTC)
    assert len(dates) == 3 and now < dates[0] < now + timedelta(days=1)
    assert all(b - a == timedelta(days=1) for a, b in zip(dates, dates[1:], strict=False))


def test_an_unknown_method_is_refused_when_settings_load() -> None:
    with pytest.raises(ValueError, match="method"):
        SchedulerSettings(method="hourly")
