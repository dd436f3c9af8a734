"""The retraining deployment: schedule, work pool, trigger, concurrency, zombie runs.

`deploy` creates the process work pools of `deployment.pools` that are missing and creates
or updates the deployment of the `MNIST` flow, on the pool `deployment.pool_name` and
training on that pool's device, with the schedule of `config/flow.yml`, a concurrency limit of 1 (a
run that finds another running waits in the queue: ENQUEUE) and a trigger on the event
that `mnistops data version` emits. A deployment that already matches is left untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from mnistops.clients import prefect_auth, prefect_client, prefect_rest
from mnistops.errors import MnistopsError
from mnistops.flows.events import DRIFT_EVENT, PUBLISHED_EVENT
from mnistops.flows.schedules import build_schedule, describe_schedule, next_runs
from mnistops.settings import Settings

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

SCHEDULE_SLUG = "mnistops-schedule"
# A flow run's process sends a heartbeat every HEARTBEAT_S (Prefect's minimum is 30);
# the automation below marks a run CRASHED when none came for UNRESPONSIVE_S. So a run
# whose worker machine or process died is CRASHED at most about 30 + 75 + a few seconds
# of the server's trigger loop after its last sign of life, and its slot is freed.
HEARTBEAT_S = 30
UNRESPONSIVE_S = 75
ZOMBIE_AUTOMATION = "mnistops: crash unresponsive flow runs"
# How a process worker starts a flow run: Prefect's own engine, run by the `python` its
# worker finds first on its PATH (`mnistops worker` puts its interpreter there). Without
# a command, Prefect 3.9's process worker starts a supervisor that imports Prefect, then
# replaces itself with this same engine, which imports it again: about 3 s of CPU and
# 3-5 s before each run's first step (bench/flow_overhead.py).
ENGINE_COMMAND = "python -m prefect.engine"
JOB_VARIABLES = {"command": ENGINE_COMMAND}


class DeployError(MnistopsError):
    """The Prefect server refused or cannot be reached; the message says which."""


@dataclass(frozen=True)
class DeployResult:
    deployment_id: str
    full_name: str
    action: str
    """created, updated or unchanged"""
    schedule: str
    pools_created: list[str]
    next_runs: list[str] = dataclasses.field(default_factory=list)
    """when the schedule fires next (computed as the server plans it)"""
    next_scheduled: str | None = None
    """the next scheduled flow run the server has planned already, if any"""
    monitoring: str = ""
    """the monitoring deployment: its name, created/updated/unchanged, its schedule"""


def default_parameters(settings: Settings) -> dict[str, Any]:
    """What every run of the deployment uses unless it says otherwise: the newest data and
    the deploying machine's hyp.yml, with the device of the deployment's pool (a worker
    serves the pool of its machine's hardware). A run someone asks for (the UI's Quick
    run, `prefect deployment run`, `mnistops run`) trains."""
    hyperparameters = settings.hyperparameter.model_dump()
    hyperparameters["device"] = settings.deployment.device
    return {
        "data_version": "latest",
        "hyperparameters": hyperparameters,
        "skip_if_unchanged": False,
    }


AUTOMATIC_RUN_PARAMETERS = {"skip_if_unchanged": True}
SCHEDULED_RUN_PARAMETERS = {**AUTOMATIC_RUN_PARAMETERS, "started_by": "the schedule"}
EVENT_RUN_PARAMETERS = {
    **AUTOMATIC_RUN_PARAMETERS,
    # the version the event announces, not `latest`: a version published right after
    # it, or one whose record claims a later date, never hides it
    "data_version": "{{ event.payload.tag }}",
    "started_by": "the publication of {{ event.payload.tag }}",
}
"""what the schedule and the new-data trigger add: a run nobody asked for by hand trains
nothing when a registered model already learned this data with this recipe"""
DRIFT_RUN_PARAMETERS = {
    **AUTOMATIC_RUN_PARAMETERS,
    # drift says the world moved, not which data has it: train on the newest version
    # (nothing is trained when a model already learned it, with whatever recipe; `data
    # add --feedback` and `data version` bring what the service saw)
    "data_version": "latest",
    "any_recipe": True,
    "started_by": "drift found by monitoring ({{ event.payload.model }})",
}
MONITORING_SLUG = "mnistops-monitoring"


def _triggers(settings: Settings) -> list[Any]:
    from prefect.events import DeploymentEventTrigger

    triggers = [
        DeploymentEventTrigger(
            name="new data version", expect={PUBLISHED_EVENT}, parameters=EVENT_RUN_PARAMETERS
        )
    ]
    if settings.monitoring.retrain_on_drift:
        triggers.append(
            DeploymentEventTrigger(
                name="drift", expect={DRIFT_EVENT}, parameters=DRIFT_RUN_PARAMETERS
            )
        )
    return triggers


def _runner_deployment(settings: Settings) -> Any:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from mnistops.flows.retrain import mnist_flow

    dep = settings.deployment
    flow = mnist_flow.with_options(name=dep.flow_name)
    return flow.to_deployment(
        name=dep.deploy_name,
        schedules=[
            DeploymentScheduleCreate(
                schedule=build_schedule(settings),
                parameters=SCHEDULED_RUN_PARAMETERS,
                slug=SCHEDULE_SLUG,
            )
        ],
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        parameters=default_parameters(settings),
        triggers=_triggers(settings),
        description="Retrain the MNIST classifier on the newest data version (mnistops)",
        tags=["mnistops"],
        work_pool_name=dep.pool_name,
        work_queue_name=dep.queue_name,
        job_variables=JOB_VARIABLES,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def _monitoring_deployment(settings: Settings) -> Any:
    """`MNIST monitoring` every `monitoring.interval_s`, on the retraining's pool; one run
    at a time (a run due while one runs is dropped: the next covers its window)."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.types.entrypoint import EntrypointType

    from mnistops.flows.monitoring import monitoring_flow

    mon = settings.monitoring
    return monitoring_flow.with_options(name=mon.flow_name).to_deployment(
        name=mon.deploy_name,
        schedules=[
            DeploymentScheduleCreate(
                schedule=IntervalSchedule(interval=timedelta(seconds=mon.interval_s)),
                slug=MONITORING_SLUG,
            )
        ],
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
        ),
        description="Judge the served model's logged answers for drift (mnistops)",
        tags=["mnistops"],
        work_pool_name=settings.deployment.pool_name,
        work_queue_name=settings.deployment.queue_name,
        job_variables=JOB_VARIABLES,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def _deploy_monitoring(settings: Settings, client: SyncPrefectClient) -> str:
    """Create or update the monitoring deployment; what was done, for a message."""
    from prefect.exceptions import ObjectNotFound

    mon = settings.monitoring
    wanted = _monitoring_deployment(settings)
    try:
        existing = client.read_deployment_by_name(mon.full_name)
    except ObjectNotFound:
        existing = None
    every = f"every {mon.interval_s} s"
    if existing is not None and _same_monitoring(existing, wanted):
        return f"{mon.full_name}: unchanged; {every}"
    wanted.apply(work_pool_name=settings.deployment.pool_name)
    return f"{mon.full_name}: {'updated' if existing else 'created'}; {every}"


def _same_monitoring(existing: Any, wanted: Any) -> bool:
    (schedule,) = wanted.schedules
    options = existing.concurrency_options
    return (
        len(existing.schedules) == 1
        # the interval, not its anchor: a new schedule is anchored at the time it is made
        and existing.schedules[0].schedule.interval == schedule.schedule.interval
        and existing.schedules[0].active
        and existing.entrypoint == wanted.entrypoint
        and existing.work_pool_name == wanted.work_pool_name
        and existing.work_queue_name == wanted.work_queue_name
        and existing.job_variables == wanted.job_variables
        and _concurrency_limit(existing) == 1
        and options is not None
        and options.collision_strategy == wanted.concurrency_options.collision_strategy
        and existing.description == wanted.description
    )


def ensure_pools(settings: Settings, client: SyncPrefectClient) -> list[str]:
    """Create the process work pools of `deployment.pools` that are missing; the names of
    those created. A pool of another type is refused before any is created."""
    missing = [name for name in settings.deployment.pools if not _is_process_pool(client, name)]
    return [name for name in missing if _create_pool(client, name)]


def _is_process_pool(client: SyncPrefectClient, name: str) -> bool:
    """The pool exists and is a process pool (False: missing; another type: an error)."""
    from prefect.exceptions import ObjectNotFound

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        return False
    if pool.type != "process":
        raise DeployError(
            f"work pool '{pool.name}' exists with type '{pool.type}'; mnistops needs a process"
            " pool: rename it in deployment.pools"
        )
    return True


def _create_pool(client: SyncPrefectClient, name: str) -> bool:
    """Create a process pool; False if another `deploy` made it since we looked."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    try:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
    except ObjectAlreadyExists:
        return False
    return True


def _trigger_of(automation: Any) -> tuple[list[str], list[Any], bool]:
    """What a deployment trigger's automation does: the events it expects, the
    parameters its run gets, whether it is on."""
    parameters = [getattr(a, "parameters", None) for a in automation.actions]
    return (sorted(automation.trigger.expect), parameters, automation.enabled)


def _matches(existing: Any, wanted: Any, automations: list[Any]) -> bool:
    """The deployment on the server is what `deploy` would make: every field it sets."""
    from prefect.utilities.callables import parameter_schema

    from mnistops.flows.retrain import mnist_flow

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
        and existing.job_variables == wanted.job_variables
        and existing.parameters == wanted.parameters
        and _schema(existing.parameter_openapi_schema)
        == _schema(parameter_schema(mnist_flow).model_dump())
        and _concurrency_limit(existing) == 1
        and options is not None
        and options.collision_strategy == wanted.concurrency_options.collision_strategy
        and existing.description == wanted.description
        and sorted(existing.tags) == sorted(wanted.tags)
        and sorted(_trigger_of(a) for a in automations) == sorted(wanted_triggers)
    )


def _schema(schema: dict[str, Any] | None) -> dict[str, Any]:
    """A parameter schema as the server keeps it: without its empty keys."""
    return {key: value for key, value in (schema or {}).items() if value not in (None, [], {})}


def _concurrency_limit(deployment: Any) -> int | None:
    limit = getattr(deployment, "global_concurrency_limit", None)
    return limit.limit if limit is not None else None


def check_server(settings: Settings, timeout_s: float = 5.0) -> None:
    """The server answers, and takes our login when it asks for one."""
    import httpx

    auth = prefect_auth(settings)
    try:
        health = prefect_rest(settings, "GET", "/health", timeout_s=timeout_s)
        answer = prefect_rest(settings, "GET", "/admin/version", timeout_s=timeout_s)
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
    if health.status_code != 200 or answer.status_code != 200:
        raise DeployError(f"the Prefect server at {settings.prefect_api_url} is not healthy")


def deploy(settings: Settings) -> DeployResult:
    """Create or update the deployment (idempotent). Config errors come before any change."""
    upcoming = next_runs(settings)
    check_server(settings)
    with prefect_client(settings) as client:
        result = _deploy(settings, client)
        monitoring = _deploy_monitoring(settings, client)
    return dataclasses.replace(
        result,
        next_runs=[d.isoformat() for d in upcoming],
        next_scheduled=next_run(settings),
        monitoring=monitoring,
    )


def _deploy(settings: Settings, client: SyncPrefectClient) -> DeployResult:
    from prefect.exceptions import ObjectNotFound

    wanted = _runner_deployment(settings)
    pools_created = ensure_pools(settings, client)
    ensure_zombie_automation(client)
    try:
        existing = client.read_deployment_by_name(settings.deployment.full_name)
    except ObjectNotFound:
        existing = None
    if existing is not None:
        automations = client.read_resource_related_automations(f"prefect.deployment.{existing.id}")
        if _matches(existing, wanted, automations):
            return DeployResult(
                str(existing.id),
                settings.deployment.full_name,
                "unchanged",
                describe_schedule(settings),
                pools_created,
            )
    deployment_id = wanted.apply(work_pool_name=settings.deployment.pool_name)
    return DeployResult(
        str(deployment_id),
        settings.deployment.full_name,
        "updated" if existing is not None else "created",
        describe_schedule(settings),
        pools_created,
    )


def ensure_zombie_automation(client: SyncPrefectClient) -> None:
    """Prefect's documented zombie-run detection (self-hosted servers have no built-in
    one): a run that stops sending heartbeats is set to CRASHED. Created once per server."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if client.read_automations_by_name(ZOMBIE_AUTOMATION):
        return
    automation = AutomationCore(
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
                name=None,
                state=StateType.CRASHED,
                message=f"no heartbeat for {UNRESPONSIVE_S} s: the worker or its machine died",
                force=False,
            )
        ],
    )
    client.create_automation(automation)


def next_run(settings: Settings) -> str | None:
    """When the next scheduled run is due, as the server has planned it."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_client(settings) as client:
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
    due = runs[0].expected_start_time if runs else None
    return due.isoformat() if due else None
