"""No secret leaks: after the whole demo, the generated S3 secret and model signing key
appear in no log, no MLflow param or tag, no Prefect parameter and not in `stack status`."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from mnistops.clients import prefect_client
from mnistops.credentials import load_keys, model_key_path
from tests.helpers import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.security]


def secrets_of(settings) -> list[str]:
    keys = load_keys(settings.home)
    assert keys is not None and len(keys.secret_access_key) >= 32
    model_key = model_key_path(settings.home).read_text().strip()
    assert len(model_key) >= 32
    return [keys.secret_access_key, model_key]


def test_no_secret_in_logs_runs_parameters_or_status(demo_run: dict) -> None:
    settings, config_dir = demo_run["settings"], demo_run["config_dir"]
    secrets = secrets_of(settings)
    places: dict[str, str] = {"demo output": demo_run["result"].stdout + demo_run["result"].stderr}

    logs = sorted((settings.home / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"s3", "mlflow", "prefect", "worker-mnist-cpu"}
    for path in logs:
        places[str(path)] = path.read_text(errors="replace")

    client = MlflowClient(settings.mlflow_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    for run in client.search_runs([experiment.experiment_id]):
        places[f"run {run.info.run_id} params"] = repr(run.data.params)
        places[f"run {run.info.run_id} tags"] = repr(run.data.tags)
    for version in client.search_model_versions(f"name = '{settings.model_registry.name}'"):
        places[f"model version {version.version} tags"] = repr(version.tags)

    with prefect_client(settings) as prefect:
        for deployment in prefect.read_deployments():
            places[f"deployment {deployment.name}"] = repr(
                (deployment.parameters, deployment.job_variables, deployment.pull_steps)
            )
        for flow_run in prefect.read_flow_runs():
            places[f"flow run {flow_run.name}"] = repr(
                (flow_run.parameters, flow_run.job_variables)
            )
        for log in prefect.read_logs():
            places.setdefault("prefect logs", "")
            places["prefect logs"] += log.message + "\n"

    status = run_cli("stack", "status", config_dir=config_dir)
    assert status.returncode == 0, status.stderr
    places["stack status"] = status.stdout + status.stderr

    leaks = [where for where, text in places.items() for s in secrets if s in text]
    assert not leaks, f"a secret appears in: {leaks}"
    assert "prefect logs" in places and len(places) > 10


def test_the_state_dir_is_private_and_telemetry_off(demo_run: dict) -> None:
    """After the whole demo (services, worker, flow runs, caches, registry): no other user
    can read anything in the state dir, and no process of the stack sends MLflow telemetry."""
    import stat

    import psutil

    from mnistops import stack
    from mnistops.stack import process

    settings = demo_run["settings"]
    home = settings.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    entries = [p for p in home.rglob("*") if not p.is_symlink()]
    assert len(entries) > 100
    folders = [p for p in entries if p.is_dir()]
    assert [str(p) for p in folders if p.stat().st_mode & 0o077] == []
    # DVC keeps its cache read-only (0444) and SeaweedFS sets the mode of some of its
    # files: the 0700 folders around them keep them from others. Everything else: 0600.
    tools = (home / "registry" / ".dvc" / "cache", home / "s3")
    ours = [p for p in entries if p.is_file() and not any(p.is_relative_to(t) for t in tools)]
    assert len(ours) > 20
    assert [str(p) for p in ours if p.stat().st_mode & 0o077] == []
    writable = [p for p in entries if p.is_file() and p.stat().st_mode & 0o022]
    assert writable == []
    records = [
        process.read_record(stack.run_dir(settings), name)
        for name in ("s3", "mlflow", "prefect", "worker-mnist-cpu")
    ]
    for record in records:
        assert record is not None and process.is_alive(record), record
        env = psutil.Process(record.pid).environ()
        assert env.get("MLFLOW_DISABLE_TELEMETRY") == "true", record.name
        assert env.get("DO_NOT_TRACK") == "true", record.name
    exported = run_cli("stack", "env", config_dir=demo_run["config_dir"]).stdout
    assert "export MLFLOW_DISABLE_TELEMETRY=true" in exported
