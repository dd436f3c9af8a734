"""`mnistops deploy` leaves a deployment alone only when it is exactly what it would make:
a change of any field it sets (on the server, by hand or by an older mnistops) is seen."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
from prefect.utilities.callables import parameter_schema

from mnistops.flows.deployment import _matches, _runner_deployment, _schema, default_parameters
from mnistops.flows.retrain import mnist_flow
from mnistops.settings import DeploymentSettings, Device, HyperParameters, Settings

pytestmark = pytest.mark.unit


def as_served(wanted: Any) -> tuple[SimpleNamespace, list[SimpleNamespace]]:
    """The deployment and its trigger's automation as the Prefect server returns them."""
    (schedule,) = wanted.schedules
    existing = SimpleNamespace(
        schedules=[
            SimpleNamespace(
                schedule=schedule.schedule, active=True, parameters=dict(schedule.parameters)
            )
        ],
        entrypoint=wanted.entrypoint,
        work_pool_name=wanted.work_pool_name,
        work_queue_name=wanted.work_queue_name,
        job_variables=dict(wanted.job_variables),
        parameters=copy.deepcopy(wanted.parameters),
        parameter_openapi_schema={
            k: v
            for k, v in parameter_schema(mnist_flow).model_dump().items()
            if k not in ("required", "definitions")
        },
        global_concurrency_limit=SimpleNamespace(limit=1),
        concurrency_options=SimpleNamespace(
            collision_strategy=wanted.concurrency_options.collision_strategy
        ),
        description=wanted.description,
        tags=list(wanted.tags),
    )
    automations = [
        SimpleNamespace(
            trigger=SimpleNamespace(expect=set(t.expect)),
            actions=[SimpleNamespace(parameters=dict(t.parameters))],
            enabled=True,
        )
        for t in wanted.triggers
    ]
    return existing, automations


@pytest.fixture(scope="module")
def wanted() -> Any:
    return _runner_deployment(Settings())


def test_the_deployment_it_would_make_matches(wanted: Any) -> None:
    existing, automations = as_served(wanted)
    assert _matches(existing, wanted, automations)


CHANGES = {
    "schedule paused": lambda d, a: setattr(d.schedules[0], "active", False),
    "schedule parameters": lambda d, a: d.schedules[0].parameters.clear(),
    "a second schedule": lambda d, a: d.schedules.append(d.schedules[0]),
    "entrypoint": lambda d, a: setattr(d, "entrypoint", "elsewhere:flow"),
    "work pool": lambda d, a: setattr(d, "work_pool_name", "other-pool"),
    "queue": lambda d, a: setattr(d, "work_queue_name", "other-queue"),
    "job variables (an older mnistops: Prefect's supervisor)": lambda d, a: d.job_variables.clear(),
    "default parameters": lambda d, a: d.parameters.update(skip_if_unchanged=True),
    "parameter schema (an older flow)": lambda d, a: d.parameter_openapi_schema["properties"].pop(
        "n_epochs"
    ),
    "concurrency limit": lambda d, a: setattr(d, "global_concurrency_limit", None),
    "collision strategy": lambda d, a: setattr(
        d.concurrency_options, "collision_strategy", "CANCEL_NEW"
    ),
    "description": lambda d, a: setattr(d, "description", "changed"),
    "tags": lambda d, a: d.tags.append("extra"),
    "trigger disabled": lambda d, a: setattr(a[0], "enabled", False),
    "trigger parameters": lambda d, a: a[0].actions[0].parameters.clear(),
    "trigger removed": lambda d, a: a.clear(),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_change_is_seen(wanted: Any, change: str) -> None:
    existing, automations = as_served(wanted)
    CHANGES[change](existing, automations)
    assert not _matches(existing, wanted, automations)


def test_a_schema_is_compared_without_its_empty_keys() -> None:
    assert _schema({"title": "x", "required": [], "definitions": {}}) == {"title": "x"}
    assert _schema(None) == {}
    assert _schema({"required": ["a"]}) == {"required": ["a"]}


def on_pool(pool: str, device: Device = "auto") -> Settings:
    """The default settings with the deployment on `pool` and hyp.yml's `device`."""
    return Settings(
        deployment=DeploymentSettings(pool_name=pool), hyperparameter=HyperParameters(device=device)
    )


@pytest.mark.parametrize(
    ("pool", "device"), [("mnist-cpu", "cpu"), ("mnist-gpu", "cuda")], ids=["cpu", "gpu"]
)
def test_the_deployment_trains_on_its_pools_device(pool: str, device: str) -> None:
    asked: Device
    for asked in ("auto", "cpu", "cuda"):
        parameters = default_parameters(on_pool(pool, asked))
        assert parameters["hyperparameters"]["device"] == device, f"hyp.yml said {asked}"


def test_moving_the_deployment_to_another_pool_is_seen() -> None:
    on_cpu = _runner_deployment(on_pool("mnist-cpu"))
    on_gpu = _runner_deployment(on_pool("mnist-gpu"))
    assert on_gpu.work_pool_name == "mnist-gpu"
    existing, automations = as_served(on_cpu)
    assert not _matches(existing, on_gpu, automations)
    existing.work_pool_name = "mnist-gpu"
    assert not _matches(existing, on_gpu, automations), "the device parameter changed too"
