"""The retraining deployment: schedule, work pool, trigger; workers; quick runs; events.

`deploy` creates the process work pool if missing and creates or updates the deployment
of the `MNIST` flow with the schedule of `config/flow.yml`, a concurrency limit of 1 (a
run that finds another running waits in the queue: ENQUEUE) and a trigger on the event
that `mnistops data version` emits. A deployment that already matches is left untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mnistops.settings import ConfigError, Settings
from mnistops.stack.endpoints import prefect_api

PUBLISHED_EVENT = "mnistops.data.version.published"
ENTRYPOINT = "mnistops.flows.retrain.mnist_flow"
SCHEDULE_SLUG = "mnistops-schedule"
# How often a worker asks for work (Prefect's default is 10 s): the delay of a quick run.
WORKER_POLL_S = 2
# A flow run's process sends a heartbeat every HEARTBEAT_S (Prefect's minimum is 30);
# the automation below marks a run CRASHED when none came for UNRESPONSIVE_S. So a run
# whose worker machine or process died is CRASHED at most about 30 + 75 + a few seconds
# of the server's trigger loop after its last sign of life, and its slot is freed.
HEARTBEAT_S = 30
UNRESPONSIVE_S = 75
ZOMBIE_AUTOMATION = "mnistops: crash unresponsive flow runs"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class DeployError(Exception):
    """The Prefect server refused or cannot be reached; the message says which."""


@dataclass(frozen=True)
class DeployResult:
    deployment_id: str
    full_name: str
    action: str
    """created, updated or unchanged"""
    schedule: str
    pool_created: bool
    next_runs: list[str] = dataclasses.field(default_factory=list)


def build_schedule(settings: Settings):
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


def next_runs(settings: Settings, count: int = 3) -> list:
    """The next `count` times the schedule fires, computed as the Prefect server plans
    them; ConfigError naming the key when it never fires again or cannot be planned."""
    import datetime as dt
    import re

    from prefect._vendor.croniter.croniter import CroniterBadDateError
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
        dates = asyncio.run(server.get_dates(n=count, start=now))
    except CroniterBadDateError:
        dates = []
    except ValueError as exc:
        raise ConfigError(f"{where}: Prefect cannot plan this schedule ({exc})") from None
    if not dates:
        raise ConfigError(f"{where}: the schedule never fires again (no date matches it)")
    return dates


def describe_schedule(settings: Settings) -> str:
    sched = settings.scheduler
    value = {"interval": f"every {sched.interval} s", "cron": sched.cron, "rrule": sched.rrule}
    return f"{sched.method} {value[sched.method]} ({sched.timezone})"


def full_name(settings: Settings) -> str:
    return f"{settings.deployment.flow_name}/{settings.deployment.deploy_name}"


def default_parameters(settings: Settings) -> dict[str, Any]:
    """What every run of the deployment uses unless it says otherwise: the newest data and
    the deploying machine's hyp.yml. A run someone asks for (the UI's Quick run,
    `prefect deployment run`, `mnistops run`) trains."""
    return {
        "data_version": "latest",
        "hyperparameters": settings.hyperparameter.model_dump(),
        "skip_if_unchanged": False,
    }


AUTOMATIC_RUN_PARAMETERS = {"skip_if_unchanged": True}
"""what the schedule and the new-data trigger add: a run nobody asked for by hand trains
nothing when a registered model already learned this data with this recipe"""


def _runner_deployment(settings: Settings):
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events import DeploymentEventTrigger
    from prefect.types.entrypoint import EntrypointType

    from mnistops.flows.retrain import mnist_flow

    dep = settings.deployment
    flow = mnist_flow.with_options(name=dep.flow_name)
    return flow.to_deployment(
        name=dep.deploy_name,
        schedules=[
            DeploymentScheduleCreate(
                schedule=build_schedule(settings),
                parameters=AUTOMATIC_RUN_PARAMETERS,
                slug=SCHEDULE_SLUG,
            )
        ],
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        parameters=default_parameters(settings),
        triggers=[
            DeploymentEventTrigger(
                name="new data version",
                expect={PUBLISHED_EVENT},
                parameters={"data_version": "latest", **AUTOMATIC_RUN_PARAMETERS},
            )
        ],
        description="Retrain the MNIST classifier on the newest data version (mnistops)",
        tags=["mnistops"],
        work_pool_name=dep.pool_name,
        work_queue_name=dep.queue_name,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def ensure_pool(settings: Settings) -> bool:
    """Create the process work pool if it is missing; True if it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(settings.deployment.pool_name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(name=settings.deployment.pool_name, type="process")
            )
            return True
    if pool.type != "process":
        raise DeployError(
            f"work pool '{pool.name}' exists with type '{pool.type}'; mnistops needs a process"
            " pool: choose another deployment.pool_name"
        )
    return False


def _trigger_of(automation) -> tuple:
    """What a deployment trigger's automation does: the events it expects, the
    parameters its run gets, whether it is on."""
    parameters = [getattr(a, "parameters", None) for a in automation.actions]
    return (sorted(automation.trigger.expect), parameters, automation.enabled)


def _matches(existing, wanted, automations: list) -> bool:
    """The deployment on the server is what `deploy` would make: every field it sets."""
    (schedule,) = wanted.schedules
    same_schedule = len(existing.schedules) == 1 and (
        existing.schedules[0].schedule.model_dump() == schedule.schedule.model_dump()
        and existing.schedules[0].active
        and existing.schedules[0].parameters == schedule.parameters
    )
    options = existing.concurrency_options
    wanted_triggers = [(sorted(t.expect), [t.parameters], True) for t in wanted.triggers]
    return (
        same_schedule
        and existing.entrypoint == wanted.entrypoint
        and existing.work_pool_name == wanted.work_pool_name
        and existing.work_queue_name == wanted.work_queue_name
        and existing.parameters == wanted.parameters
        and _concurrency_limit(existing) == 1
        and options is not None
        and options.collision_strategy == wanted.concurrency_options.collision_strategy
        and existing.description == wanted.description
        and sorted(existing.tags) == sorted(wanted.tags)
        and sorted(_trigger_of(a) for a in automations) == sorted(wanted_triggers)
    )


def _concurrency_limit(deployment) -> int | None:
    limit = getattr(deployment, "global_concurrency_limit", None)
    return limit.limit if limit is not None else None


def check_server(settings: Settings, timeout_s: float = 5.0) -> None:
    """The server answers, and takes our login when it asks for one."""
    import httpx

    from mnistops.stack.endpoints import prefect_auth

    api = settings.prefect_api_url.rstrip("/")
    auth = prefect_auth(settings)
    try:
        healthy = httpx.get(f"{api}/health", timeout=timeout_s).status_code == 200
        answer = httpx.get(
            f"{api}/admin/version",
            timeout=timeout_s,
            auth=tuple(auth.split(":", 1)) if auth else None,
        )
    except httpx.HTTPError as exc:
        raise DeployError(
            f"the Prefect server at {settings.prefect_api_url} cannot be reached"
            f" ({exc.__class__.__name__}); start the stack (`mnistops stack up`) or set"
            " prefect.api_url"
        ) from None
    if answer.status_code == 401:
        raise DeployError(
            f"the Prefect server at {settings.prefect_api_url} refused "
            + ("our login" if auth else "a request without a login")
            + ": set prefect.auth_string (MNISTOPS_PREFECT__AUTH_STRING) to its USER:PASSWORD;"
            " for a mnistops stack, `mnistops stack env` prints it"
        )
    if not healthy or answer.status_code != 200:
        raise DeployError(f"the Prefect server at {settings.prefect_api_url} is not healthy")


def deploy(settings: Settings) -> DeployResult:
    """Create or update the deployment (idempotent). Config errors come before any change."""
    upcoming = next_runs(settings)
    check_server(settings)
    with prefect_api(settings):
        result = _deploy(settings)
    return dataclasses.replace(result, next_runs=[d.isoformat() for d in upcoming])


def _deploy(settings: Settings) -> DeployResult:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    wanted = _runner_deployment(settings)
    pool_created = ensure_pool(settings)
    ensure_zombie_automation()
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_deployment_by_name(full_name(settings))
        except ObjectNotFound:
            existing = None
        if existing is not None:
            automations = client.read_resource_related_automations(
                f"prefect.deployment.{existing.id}"
            )
            if _matches(existing, wanted, automations):
                return DeployResult(
                    str(existing.id),
                    full_name(settings),
                    "unchanged",
                    describe_schedule(settings),
                    pool_created,
                )
    deployment_id = wanted.apply(work_pool_name=settings.deployment.pool_name)
    return DeployResult(
        str(deployment_id),
        full_name(settings),
        "updated" if existing is not None else "created",
        describe_schedule(settings),
        pool_created,
    )


def ensure_zombie_automation() -> None:
    """Prefect's documented zombie-run detection (self-hosted servers have no built-in
    one): a run that stops sending heartbeats is set to CRASHED. Created once per server."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return
    except ValueError:
        pass
    Automation(
        name=ZOMBIE_AUTOMATION,
        description="Marks a flow run CRASHED when its process stops sending heartbeats.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=UNRESPONSIVE_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {UNRESPONSIVE_S} s: the worker or its machine died",
            )
        ],
    ).create()


def next_run(settings: Settings) -> str | None:
    """When the next scheduled run is due, as the server has planned it."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_api(settings), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[settings.deployment.deploy_name])
            ),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=1,
        )
    return runs[0].expected_start_time.isoformat() if runs else None


# --- workers -----------------------------------------------------------------------------


def worker_env(settings: Settings, config_dir: Path | None) -> dict[str, str]:
    """The environment of a worker and of the flow runs it starts: the stack's client
    variables, absolute paths for state and config (runs start in a temp dir)."""
    from mnistops.settings import default_config_dir
    from mnistops.stack.endpoints import client_env

    env = {**os.environ, **client_env(settings)}
    env["PREFECT_API_URL"] = settings.prefect_api_url
    env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
    env["PREFECT_WORKER_QUERY_SECONDS"] = str(WORKER_POLL_S)
    env["PREFECT_WORKER_PREFETCH_SECONDS"] = "5"
    env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_S)
    env["MNISTOPS_HOME"] = str(settings.home)
    env["MNISTOPS_DATA_DIR"] = str(settings.data_dir)
    folder = (config_dir or default_config_dir()).absolute()
    if folder.is_dir():
        env["MNISTOPS_CONFIG_DIR"] = str(folder)
    return env


def worker_command(pool: str) -> list[str]:
    prefect = Path(sys.executable).parent / "prefect"
    return [str(prefect), "worker", "start", "--pool", pool, "--type", "process"]


# --- quick runs --------------------------------------------------------------------------


def quick_run(settings: Settings, parameters: dict[str, Any]) -> tuple[str, str]:
    """Start a run of the deployment now; (flow run id, its UI URL)."""
    check_server(settings)
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        with prefect_api(settings):
            run = run_deployment(
                full_name(settings),
                parameters={"skip_if_unchanged": False, **parameters},
                timeout=0,
                tags=["quick-run"],
            )
    except ObjectNotFound:
        raise DeployError(
            f"no deployment {full_name(settings)} at {settings.prefect_api_url};"
            " create it with `mnistops deploy`"
        ) from None
    ui = settings.prefect_api_url.removesuffix("/api")
    return str(run.id), f"{ui}/runs/flow-run/{run.id}"


def follow(
    settings: Settings,
    flow_run_id: str,
    on_state: Callable[[str, str], None],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
):
    """Report each state change of the flow run until it ends; return the final flow run."""
    from prefect import get_client

    last = None
    began = time.monotonic()
    with prefect_api(settings), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            current = (state.type.value, state.name) if state else ("PENDING", "Pending")
            if current != last:
                on_state(current[1], (state.message or "") if state else "")
                last = current
            if current[0] in TERMINAL:
                return run
            if timeout_s is not None and time.monotonic() - began > timeout_s:
                raise DeployError(f"flow run {flow_run_id} did not end within {timeout_s:.0f} s")
            time.sleep(poll_s)


def run_summary(settings: Settings, flow_run_id: str) -> str | None:
    """The markdown artifact the flow run left (its result), if any."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect_api(settings), get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return str(found[-1].data) if found else None


# --- events ------------------------------------------------------------------------------


def listening_deployment(settings: Settings) -> str | None:
    """The deployment whose trigger starts a retraining on a new data version, if any."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with prefect_api(settings), get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(full_name(settings))
        except ObjectNotFound:
            return None
        automations = client.read_resource_related_automations(
            f"prefect.deployment.{deployment.id}"
        )
    listens = any(PUBLISHED_EVENT in a.trigger.expect and a.enabled for a in automations)
    return full_name(settings) if listens else None


def emit_published(settings: Settings, tag: str, content_hash: str, timeout_s: float = 10) -> None:
    """Tell Prefect a data version was published (its deployment trigger starts a run)."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event(
        event=PUBLISHED_EVENT,
        resource={"prefect.resource.id": f"mnistops.data-version.{tag}", "tag": tag},
        payload={"tag": tag, "content_hash": content_hash},
    )

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    with prefect_api(settings):
        asyncio.run(asyncio.wait_for(send(), timeout_s))
