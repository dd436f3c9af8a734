"""The retraining flow against the real stack: deploy, a worker elsewhere, quick runs,
a schedule that fires, retries, and a new data version that starts a run."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

from mnistops import stack
from mnistops.clients import prefect_client
from mnistops.settings import Settings, load_settings
from tests.helpers import client_config, run_cli, write_flow_yml

pytestmark = pytest.mark.integration


def flow_config(suffix: str, **scheduler: object) -> dict:
    return {
        "deployment": {
            "flow_name": "MNIST",
            "deploy_name": f"retrain-{suffix}",
            "pools": {f"pool-{suffix}": "cpu"},
            "pool_name": f"pool-{suffix}",
            "queue_name": "default",
        },
        "scheduler": {
            "method": "cron",
            "cron": "0 3 * * *",
            "timezone": "Asia/Taipei",
            **scheduler,
        },
        "experiment_name": f"MNIST-{suffix}",
        "developer_name": "flow-tester",
        "model_registry": {"name": f"mnist-{suffix}"},
    }


FAST_HYP = {"hyperparameter": {"n_epochs": 1, "batch_size": 64}}


@pytest.fixture(scope="module")
def machines(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A publisher that deploys, and a worker machine with only the stack's variables, an
    empty HOME and state dir, in its own working dir, serving the pool."""
    suffix = uuid.uuid4().hex[:6]
    bucket = f"dvc-{suffix}"
    publisher = client_config(stack_settings, tmp_path_factory.mktemp("publisher"), bucket=bucket)
    write_flow_yml(publisher, flow_config(suffix))
    (publisher / "hyp.yml").write_text(yaml.safe_dump(FAST_HYP))
    for args in (("data", "ingest", "--fast"), ("data", "version", "v1.0", "-m", "first")):
        done = run_cli(*args, config_dir=publisher)
        assert done.returncode == 0, done.stdout + done.stderr

    worker_root = tmp_path_factory.mktemp("worker-machine")
    worker_config = client_config(stack_settings, worker_root)
    config = yaml.safe_load((worker_config / "stack.yml").read_text())
    config["s3"]["buckets"] = {"dvc": bucket}
    (worker_config / "stack.yml").write_text(yaml.safe_dump(config))
    write_flow_yml(worker_config, flow_config(suffix))
    home = worker_root / "home"
    home.mkdir()
    worker_env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    deployed = run_cli("deploy", config_dir=publisher)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    started = run_cli(
        "worker", "--detach", config_dir=worker_config, env=worker_env, cwd=worker_root
    )
    assert started.returncode == 0, started.stdout + started.stderr
    yield {"publisher": publisher, "worker": worker_config, "suffix": suffix, "deployed": deployed}
    stack.down(load_settings(worker_config))


def mlflow_runs(config_dir: Path) -> list:
    settings = load_settings(config_dir)
    client = MlflowClient(settings.mlflow_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])


def deployment_runs(settings: Settings, deploy_name: str) -> list:
    with prefect_client(settings) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deploy_name]))
        )


def run_logs(config_dir: Path, output: str) -> list:
    """The Prefect logs of the flow run whose id `mnistops run` printed."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flow_run_id = next(
        line.split()[2].rstrip(":") for line in output.splitlines() if line.startswith("flow run ")
    )
    with prefect_client(load_settings(config_dir)) as client:
        return client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def test_deploy_is_idempotent(machines: dict) -> None:
    assert "created" in machines["deployed"].stdout
    again = run_cli("deploy", config_dir=machines["publisher"])
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout
    status = run_cli("stack", "status", config_dir=machines["worker"])
    assert status.returncode == 0
    (worker,) = [
        s for s in stack.status(load_settings(machines["worker"])) if s.name.startswith("worker-")
    ]
    assert worker.name == f"worker-pool-{machines['suffix']}" and worker.healthy


def test_quick_run_completes_on_the_worker(machines: dict) -> None:
    """The worker's shell has no virtual environment on its PATH (the fixture's worker
    gets the suite's PATH): the deployment's `python -m prefect.engine` is still the
    worker's own interpreter."""
    publisher = machines["publisher"]
    settings, client = load_settings(publisher), None
    with prefect_client(settings) as prefect:
        deployment = prefect.read_deployment_by_name(settings.deployment.full_name)
    assert deployment.job_variables == {"command": "python -m prefect.engine"}
    mlflow.set_tracking_uri(settings.mlflow_uri)
    client = MlflowClient(settings.mlflow_uri)
    done = run_cli("run", "--wait", config_dir=publisher, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Completed" in done.stdout
    run_line = next(line for line in done.stdout.splitlines() if line.startswith("flow run "))
    flow_run_id = run_line.split()[2].rstrip(":")
    (run,) = [
        r for r in mlflow_runs(publisher) if r.data.tags.get("prefect_flow_run_id") == flow_run_id
    ]
    assert run.data.tags["phase"] == "retraining"
    assert run.data.tags["prefect_flow_run_name"]
    assert run.info.status == "FINISHED"
    version = client.get_model_version_by_alias(settings.model_registry.name, "champion")
    assert version.run_id == run.info.run_id  # the first model: the gate moved champion to it
    with prefect_client(settings) as prefect:
        artifacts = prefect.read_artifacts()
    assert any(
        a.key == "mnist-retraining"
        and str(a.flow_run_id) == flow_run_id
        and run.info.run_id in a.data
        for a in artifacts
    )


def test_a_quick_run_from_the_ui_trains(machines: dict) -> None:
    """The UI's Quick run (and `prefect deployment run`) creates a flow run from the
    deployment with its default parameters: it trains, even on data a model has learned."""
    publisher = machines["publisher"]
    settings = load_settings(publisher)
    before = len(mlflow_runs(publisher))
    with prefect_client(settings) as client:
        deployment = client.read_deployment_by_name(
            f"{settings.deployment.flow_name}/{settings.deployment.deploy_name}"
        )
        assert deployment.parameters["skip_if_unchanged"] is False
        (schedule,) = deployment.schedules
        assert schedule.parameters == {"skip_if_unchanged": True, "started_by": "the schedule"}
        flow_run = client.create_flow_run_from_deployment(deployment.id)

    def finished():
        with prefect_client(settings) as client:
            run = client.read_flow_run(flow_run.id)
        return run if run.state and run.state.is_final() else None

    run = wait_for(finished, 600, "the UI's quick run to finish")
    assert run.state.type.value == "COMPLETED", run.state
    trained = [
        r for r in mlflow_runs(publisher) if r.data.tags.get("prefect_flow_run_id") == str(run.id)
    ]
    assert len(trained) == 1 and trained[0].info.status == "FINISHED"
    assert len(mlflow_runs(publisher)) == before + 1
    # Not the first model: the flow's summary shows the gate's evidence against the champion.
    with prefect_client(settings) as client:
        (summary,) = [a for a in client.read_artifacts() if a.flow_run_id == run.id]
    for row in ("| compared with | v", "| p-value |", "| errors |", "| worst digit |"):
        assert row in summary.data, summary.data


def pulling_tries(publisher: Path, data_version: str) -> tuple[int, list[str]]:
    """Run the deployment on `data_version`, which fails: how often its "Pulling dataset"
    task ran, and the run's log lines."""
    done = run_cli(
        "run", "--data-version", data_version, "--wait", config_dir=publisher, timeout=600
    )
    assert done.returncode == 1
    assert "Failed" in done.stdout
    flow_run_id = next(
        line.split()[2].rstrip(":")
        for line in done.stdout.splitlines()
        if line.startswith("flow run ")
    )
    with prefect_client(load_settings(publisher)) as client:
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            LogFilter,
            LogFilterFlowRunId,
        )

        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    pulling = next(t for t in tasks if t.name.startswith("Pulling dataset"))
    return pulling.run_count, [log.message for log in logs]


@pytest.mark.slow("Prefect's retries of a task wait between tries, on a worker that polls")
def test_a_failing_task_retries_only_what_may_pass(machines: dict) -> None:
    """A version that does not exist is an answer that cannot change: one try. A version
    whose objects the store cannot give is tried again three times, then fails."""
    from mnistops.clients import s3_client
    from mnistops.data import remote
    from tests.helpers import craft_version

    publisher = machines["publisher"]
    tries, logs = pulling_tries(publisher, "v9")
    assert tries == 1, "a refused version is not tried again"
    assert any("no data version 'v9'" in line for line in logs)

    settings = load_settings(publisher)
    filler = next((settings.mnist_dir / "test" / "1").glob("*.png")).read_bytes()
    craft_version(settings, "holes", {}, filler=filler, created="2000-01-01T00:00:00")
    record = remote.read_record(s3_client(settings), settings.s3.buckets.dvc, "holes")
    assert record is not None
    pack = next(m for path, m in record.files.items() if path.startswith("packs/"))
    s3_client(settings).delete_object(Bucket=settings.s3.buckets.dvc, Key=remote.object_key(pack))
    tries, logs = pulling_tries(publisher, "holes")
    assert tries == 4, "the first try and three retries"
    assert any(remote.object_key(pack) in line for line in logs), logs


@pytest.mark.security
def test_a_crafted_version_fails_the_run_and_writes_nothing_outside(
    machines: dict, tmp_path: Path
) -> None:
    """An attacker with the S3 keys publishes a version whose manifest leads outside: the
    worker's run fails naming it, and nothing is written where the manifest points."""
    from tests.helpers import craft_version

    publisher = machines["publisher"]
    outside = tmp_path / "site-packages"
    escape = f"train/0/{'/'.join(['..'] * 30)}{outside}/zz.pth"
    settings = load_settings(publisher)
    filler = next((settings.mnist_dir / "test" / "0").glob("*.png")).read_bytes()
    craft_version(
        settings, "evil", {escape: b"import os\n"}, filler=filler, created="2000-01-01T00:00:00"
    )
    done = run_cli("run", "--data-version", "evil", "--wait", config_dir=publisher, timeout=600)
    assert done.returncode == 1 and "Failed" in done.stdout, done.stdout + done.stderr
    logs = run_logs(publisher, done.stdout)
    assert any("not train|test/<digit>/<file name>" in log.message for log in logs)
    assert not outside.exists()


@pytest.mark.slow("two versions, two runs picked up by the worker, two trainings")
def test_each_new_data_version_is_trained_by_its_own_run(machines: dict) -> None:
    """Two versions published one right after the other: the trigger starts a run for
    each, with the version its event names (not `latest`), and both are trained."""
    import numpy as np
    from PIL import Image

    publisher = machines["publisher"]
    settings = load_settings(publisher)
    before = {r.id for r in deployment_runs(settings, f"retrain-{machines['suffix']}")}
    added = run_cli("data", "add", str(settings.mnist_dir / "train_v2"), config_dir=publisher)
    assert added.returncode == 0, added.stderr
    published = run_cli("data", "version", "v2.0", "-m", "more", config_dir=publisher)
    assert published.returncode == 0, published.stderr
    dep = settings.deployment
    said = " ".join(published.stdout.split())
    assert f"sent: {dep.flow_name}/{dep.deploy_name} starts a retraining" in said
    pixels = np.random.default_rng(21).integers(0, 255, (28, 28), np.uint8)
    Image.fromarray(pixels, mode="L").save(settings.mnist_dir / "train" / "7" / "quick.png")
    right_after = run_cli("data", "version", "v2.1", "-m", "one more", config_dir=publisher)
    assert right_after.returncode == 0, right_after.stderr

    def both_triggered_runs_completed() -> dict[str, object] | None:
        runs = [
            r
            for r in deployment_runs(settings, f"retrain-{machines['suffix']}")
            if r.id not in before
        ]
        done = {r.parameters.get("data_version"): r for r in runs if r.state and r.state.is_final()}
        return done if {"v2.0", "v2.1"} <= set(done) else None

    finished = wait_for(both_triggered_runs_completed, 420, "a run for each new version")
    for tag in ("v2.0", "v2.1"):
        run = finished[tag]
        assert run.state.is_completed(), (tag, run.state)
        assert run.parameters["started_by"] == f"the publication of {tag}"
        trained = [r for r in mlflow_runs(publisher) if r.data.tags.get("data_version") == tag]
        assert trained and trained[0].data.tags["phase"] == "retraining", tag


def test_a_schedule_fires_and_skips_when_nothing_is_new(machines: dict, tmp_path: Path) -> None:
    """An interval of a few seconds: the server plans runs, the worker runs them; with no new
    data since the champion, the run says so and trains nothing."""
    publisher = machines["publisher"]
    scheduled = tmp_path / "config"
    scheduled.mkdir()
    for name in ("stack.yml", "hyp.yml", "flow.yml"):
        (scheduled / name).write_text((publisher / name).read_text())
    config = flow_config(machines["suffix"], method="interval", interval=5)
    config["deployment"]["deploy_name"] = f"every-5s-{machines['suffix']}"
    write_flow_yml(scheduled, config)
    deployed = run_cli("deploy", config_dir=scheduled)
    assert deployed.returncode == 0, deployed.stderr
    settings = load_settings(scheduled)
    mlflow_before = len(mlflow_runs(publisher))
    try:
        completed = wait_for(
            lambda: next(
                (
                    r
                    for r in deployment_runs(settings, config["deployment"]["deploy_name"])
                    if r.state and r.state.is_completed()
                ),
                None,
            ),
            240,
            "a scheduled run to complete",
        )
        assert "quick-run" not in completed.tags
        assert completed.auto_scheduled
    finally:
        with prefect_client(settings) as client:
            dep = client.read_deployment_by_name(f"MNIST/{config['deployment']['deploy_name']}")
            client.delete_deployment(dep.id)
    assert len(mlflow_runs(publisher)) == mlflow_before  # nothing new: nothing trained


def test_forcing_cuda_without_a_gpu_fails_the_run_clearly(machines: dict) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    publisher = machines["publisher"]
    done = run_cli("run", "--device", "cuda", "--wait", config_dir=publisher, timeout=600)
    assert done.returncode == 1
    logs = run_logs(publisher, done.stdout)
    assert any("no usable CUDA GPU" in log.message for log in logs)


@pytest.mark.slow("two trainings one after the other, the second waiting for the first")
@pytest.mark.faults
def test_two_quick_runs_at_once_never_train_in_parallel(machines: dict) -> None:
    """The deployment's limit of 1 (ENQUEUE): the second run waits for the first."""
    publisher = machines["publisher"]
    started = [
        run_cli("run", "--data-version", "v1.0", config_dir=publisher, timeout=120)
        for _ in range(2)
    ]
    assert all(s.returncode == 0 for s in started), [s.stderr for s in started]
    ids = [s.stdout.split()[2].rstrip(":") for s in started]
    settings = load_settings(publisher)

    def finished() -> list:
        with prefect_client(settings) as client:
            runs = [client.read_flow_run(i) for i in ids]
        return runs if all(r.state and r.state.is_final() for r in runs) else []

    runs = wait_for(finished, 600, "both quick runs to end")
    assert [r.state.type.value for r in runs] == ["COMPLETED", "COMPLETED"]
    trainings = sorted(
        (r.info.start_time, r.info.end_time)
        for r in mlflow_runs(publisher)
        if r.data.tags.get("prefect_flow_run_id") in ids
    )
    assert len(trainings) == 2
    (first_start, first_end), (second_start, _) = trainings
    assert first_end <= second_start, "two trainings overlapped"
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert spans[0][1] <= spans[1][0], "two flow runs were RUNNING at the same time"


@pytest.mark.faults
def test_stack_up_starts_again_the_workers_stack_down_stopped(machines: dict) -> None:
    worker_config = machines["worker"]
    worker_settings = load_settings(worker_config)
    (before,) = stack.worker_records(worker_settings)
    down = run_cli("stack", "down", config_dir=worker_config)
    assert down.returncode == 0 and before.name in down.stdout, down.stdout + down.stderr
    assert stack.worker_records(worker_settings) == []
    up = run_cli("stack", "up", config_dir=worker_config)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"starting {before.name} again" in " ".join(up.stdout.split())
    (after,) = stack.worker_records(worker_settings)
    assert after.pid != before.pid and after.name == before.name
    again = run_cli("stack", "up", config_dir=worker_config)
    assert "again" not in again.stdout, "started once, not at every up"
    assert [r.pid for r in stack.worker_records(worker_settings)] == [after.pid]


def test_a_cancelled_run_ends_its_mlflow_run_killed(machines: dict) -> None:
    """Cancelled from Prefect (the UI's Cancel) mid-training: the flow's hook ends its
    MLflow run KILLED, not FAILED and not RUNNING."""
    from prefect.states import Cancelling

    publisher = machines["publisher"]
    settings = load_settings(publisher)
    started = run_cli("run", "--epochs", "400", config_dir=publisher, timeout=120)
    assert started.returncode == 0, started.stderr
    flow_run_id = started.stdout.split()[2].rstrip(":")

    def training():
        found = [
            r
            for r in mlflow_runs(publisher)
            if r.data.tags.get("prefect_flow_run_id") == flow_run_id
        ]
        return found[0] if found else None

    wait_for(training, 300, "the training to start")
    with prefect_client(settings) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(), force=True)

    def ended():
        run = training()
        return run if run is not None and run.info.status != "RUNNING" else None

    run = wait_for(ended, 180, "the MLflow run to end")
    assert run.info.status == "KILLED", (run.info.status, run.data.tags.get("error"))
    reason = run.data.tags["error"]
    assert reason.startswith("interrupted") or "CANCEL" in reason.upper(), reason
