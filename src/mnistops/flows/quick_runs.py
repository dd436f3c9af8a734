"""Quick runs: a run of the deployment now (what the UI's Quick run does), followed
state by state, and the summary it leaves."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from mnistops.clients import prefect_client
from mnistops.flows.deployment import DeployError, check_server
from mnistops.settings import Settings

CLOCK_MARGIN = timedelta(minutes=5)
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def quick_run(
    settings: Settings, parameters: dict[str, Any], monitoring: bool = False
) -> tuple[str, str]:
    """Start a run of the retraining deployment (or the monitoring one) now; (flow run
    id, its UI URL)."""
    from prefect.exceptions import ObjectNotFound

    check_server(settings)
    name = settings.monitoring.full_name if monitoring else settings.deployment.full_name
    defaults = {} if monitoring else {"skip_if_unchanged": False}
    with prefect_client(settings) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise DeployError(
                f"no deployment {name} at {settings.prefect_api_url};"
                " create it with `mnistops deploy`"
            ) from None
        run = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={**defaults, **parameters},
            tags=["quick-run"],
        )
    ui = settings.prefect_api_url.removesuffix("/api")
    return str(run.id), f"{ui}/runs/flow-run/{run.id}"


def follow(
    settings: Settings,
    flow_run_id: str,
    on_state: Callable[[str, str], None],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> Any:
    """Report each state change of the flow run until it ends; return the final flow run."""

    last = None
    began = time.monotonic()
    with prefect_client(settings) as client:
        while True:
            run = client.read_flow_run(UUID(flow_run_id))
            state = run.state
            current = (
                (state.type.value, state.name or state.type.value.title())
                if state
                else ("PENDING", "Pending")
            )
            if current != last:
                on_state(current[1], (state.message or "") if state else "")
                last = current
            if current[0] in TERMINAL:
                return run
            if timeout_s is not None and time.monotonic() - began > timeout_s:
                raise DeployError(f"flow run {flow_run_id} did not end within {timeout_s:.0f} s")
            time.sleep(poll_s)


def run_summary(settings: Settings, flow_run_id: str, key: str | None = None) -> str | None:
    """The markdown artifact the flow run left (its result), if any."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    from mnistops.flows.retrain import SUMMARY_KEY

    with prefect_client(settings) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]),
                key=ArtifactFilterKey(any_=[key or SUMMARY_KEY]),
            )
        )
    return str(found[-1].data) if found else None


@dataclass(frozen=True)
class FinishedRun:
    run_id: str
    url: str
    state: str
    """the final state's name: Completed, Failed, Crashed, Cancelled"""
    completed: bool
    summary: str | None
    """the markdown the flow run left (its result), if any"""


def run_and_wait(
    settings: Settings,
    parameters: dict[str, Any],
    on_started: Callable[[str, str], None] = lambda _id, _url: None,
    on_state: Callable[[str, str], None] = lambda _name, _message: None,
    monitoring: bool = False,
) -> FinishedRun:
    """Start a run of the deployment (or the monitoring one) now and follow it to its end."""
    from mnistops.flows.monitoring import SUMMARY_KEY as MONITORING_KEY

    run_id, url = quick_run(settings, parameters, monitoring)
    on_started(run_id, url)
    return followed_to_the_end(
        settings, run_id, url, on_state, MONITORING_KEY if monitoring else None
    )


def followed_to_the_end(
    settings: Settings,
    run_id: str,
    url: str,
    on_state: Callable[[str, str], None],
    summary_key: str | None = None,
) -> FinishedRun:
    """Follow a started flow run to its end; what it left."""
    final = follow(settings, run_id, on_state)
    state = final.state
    return FinishedRun(
        run_id,
        url,
        state.name if state else "unknown",
        state is not None and state.type.value == "COMPLETED",
        run_summary(settings, run_id, summary_key),
    )


def triggered_run(
    settings: Settings, data_version: str, after: datetime, timeout_s: float = 60.0
) -> tuple[str, str] | None:
    """(flow run id, its UI URL) of the retraining the publication of `data_version`
    started, once the server's trigger made it; None if it made none within the time.
    Runs expected to start before `after` (less a margin for the server's clock) are
    not looked at."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    deadline = time.monotonic() + timeout_s
    ui = settings.prefect_api_url.removesuffix("/api")
    with prefect_client(settings) as client:
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[settings.deployment.deploy_name])
                ),
                flow_run_filter=FlowRunFilter(
                    expected_start_time=FlowRunFilterExpectedStartTime(after_=after - CLOCK_MARGIN)
                ),
            )
            for run in runs:
                if run.parameters.get("data_version") == data_version:
                    return str(run.id), f"{ui}/runs/flow-run/{run.id}"
            if time.monotonic() > deadline:
                return None
            time.sleep(1.0)
