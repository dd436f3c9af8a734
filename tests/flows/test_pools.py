"""Work pools against the session's Prefect server: `deploy` creates every pool of
`deployment.pools`, the deployment trains on its pool's device and moves when
`deployment.pool_name` changes; a worker is refused a pool the server does not have."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mnistops import stack
from mnistops.clients import prefect_client
from mnistops.errors import BadInput
from mnistops.flows.deployment import deploy
from mnistops.flows.workers import check_engine, device_warning, engine_path, worker_env
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


@pytest.mark.integration
@pytest.mark.bad_input
def test_a_worker_for_a_pool_the_server_lacks_is_refused(machine: dict) -> None:
    missing = f"nope-{machine['suffix']}"
    done = run_cli("worker", "--pool", missing, config_dir=machine["config"], timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join(done.stderr.split())
    assert f"work pool '{missing}' does not exist" in said
    assert "run `mnistops deploy` first" in said
    assert machine["cpu"] in said and machine["gpu"] in said, "the pools that exist are listed"
    assert "Traceback" not in done.stderr
    assert "Ctrl-C stops it" not in done.stdout, "no worker is announced before the refusal"
    assert missing not in pool_names(load_settings(machine["config"]))


@pytest.mark.integration
def test_a_cuda_pools_worker_without_a_gpu_warns_and_starts(machine: dict) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    config: Path = machine["config"]
    done = run_cli("worker", "--pool", machine["gpu"], "--detach", config_dir=config, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    said = " ".join(done.stderr.split())
    assert f"warning: pool {machine['gpu']} trains on device cuda" in said
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"worker for pool {machine['gpu']} started" in done.stdout


@pytest.mark.unit
def test_only_a_cuda_pool_on_a_machine_without_cuda_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    settings = Settings()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no usable CUDA GPU" in (device_warning(settings, "mnist-gpu") or "")
    assert device_warning(settings, "mnist-cpu") is None
    assert device_warning(settings, "a-pool-not-in-the-settings") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_warning(settings, "mnist-gpu") is None


@pytest.mark.unit
def test_a_workers_flow_runs_find_its_own_python_first(tmp_path: Path) -> None:
    import os
    import sys

    here = str(Path(sys.executable).parent)
    assert engine_path(f"/usr/bin{os.pathsep}{here}{os.pathsep}") == f"{here}{os.pathsep}/usr/bin"
    assert engine_path("") == here
    assert worker_env(Settings(home=tmp_path))["PATH"].split(os.pathsep)[0] == here
    check_engine()  # this interpreter has its `python` beside it


@pytest.mark.unit
def test_an_interpreter_without_its_own_python_beside_it_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3.11"))
    with pytest.raises(BadInput, match=r"no .*/python; run mnistops from a virtual environment"):
        check_engine()
    other = tmp_path / "python"  # as a system's `python` beside its `python3` may be
    other.write_text("#!/bin/sh\necho /usr/lib/another-python\n")
    other.chmod(0o755)
    with pytest.raises(BadInput, match=r"python is not this interpreter's environment"):
        check_engine()
