"""Work pools against the session's Prefect server: `deploy` creates every pool of
`deployment.pools`, the deployment trains on its pool's device and moves when
`deployment.pool_name` changes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import yaml

from mnistops import stack
from mnistops.clients import prefect_client
from mnistops.flows.deployment import deploy
from mnistops.settings import Settings, load_settings
from tests.helpers import client_config, run_cli


@pytest.fixture(scope="module")
def machine(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A machine that uses the session's stack, with pools and a deployment of its own
    (names no other test uses), deployed once with the `mnistops deploy` command."""
    suffix = uuid.uuid4().hex[:6]
    cpu, gpu = f"cpu-{suffix}", f"gpu-{suffix}"
    config = client_config(stack_settings, tmp_path_factory.mktemp("pools"))
    deployment = {
        "deploy_name": f"pools-{suffix}",
        "pools": {cpu: "cpu", gpu: "cuda"},
        "pool_name": cpu,
    }
    (config / "flow.yml").write_text(yaml.safe_dump({"deployment": deployment}))
    deployed = run_cli("deploy", config_dir=config, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    yield {"config": config, "cpu": cpu, "gpu": gpu, "deployed": deployed.stdout, "suffix": suffix}
    settings = load_settings(config)
    stack.down(settings)
    with prefect_client(settings) as client:
        client.delete_deployment(client.read_deployment_by_name(settings.deployment.full_name).id)
        for pool in (cpu, gpu):
            client.delete_work_pool(pool)


def served(settings: Settings) -> tuple[str, str]:
    """The pool of the deployment on the server, and the device its runs train on."""
    with prefect_client(settings) as client:
        deployment = client.read_deployment_by_name(settings.deployment.full_name)
    return deployment.work_pool_name, deployment.parameters["hyperparameters"]["device"]


def pool_names(settings: Settings) -> set[str]:
    with prefect_client(settings) as client:
        return {pool.name for pool in client.read_work_pools()}


@pytest.mark.integration
def test_deploy_creates_every_pool_and_trains_on_the_pools_device(machine: dict) -> None:
    said = " ".join(machine["deployed"].split())
    assert f"work pool {machine['cpu']} (process, device cpu) created" in said
    assert f"work pool {machine['gpu']} (process, device cuda) created" in said
    settings = load_settings(machine["config"])
    assert {machine["cpu"], machine["gpu"]} <= pool_names(settings)
    assert served(settings) == (machine["cpu"], "cpu")


@pytest.mark.integration
def test_the_pool_setting_moves_the_deployment(
    machine: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNISTOPS_DEPLOYMENT__POOL_NAME", machine["gpu"])
    on_gpu = load_settings(machine["config"])
    moved = deploy(on_gpu)
    assert (moved.action, moved.pools_created) == ("updated", [])
    assert served(on_gpu) == (machine["gpu"], "cuda")
    assert deploy(on_gpu).action == "unchanged"
    monkeypatch.delenv("MNISTOPS_DEPLOYMENT__POOL_NAME")
    on_cpu = load_settings(machine["config"])
    assert deploy(on_cpu).action == "updated"
    assert served(on_cpu) == (machine["cpu"], "cpu")
