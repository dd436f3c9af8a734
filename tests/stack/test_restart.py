"""kill -9 of every service, then `stack up`: versions, runs, models and deployments are
all there, the SQLite databases pass PRAGMA integrity_check, a version pulls cleanly."""

from __future__ import annotations

import sqlite3

import pytest
from mlflow import MlflowClient

from mnistops import stack
from mnistops.clients import prefect_client
from mnistops.data import reader
from mnistops.stack.services import SERVICE_NAMES
from tests.helpers import kill_service, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def snapshot(settings) -> dict:
    client = MlflowClient(settings.mlflow_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    with prefect_client(settings) as prefect:
        deployments = sorted(d.name for d in prefect.read_deployments())
        flow_runs = sorted((str(r.id), r.state_type.value) for r in prefect.read_flow_runs())
    name = settings.model_registry.name
    return {
        "versions": [(r.tag, r.content_hash) for r in reader.list_versions(settings)],
        "runs": sorted(
            (r.info.run_id, r.info.status) for r in client.search_runs([experiment.experiment_id])
        ),
        "models": sorted(v.version for v in client.search_model_versions(f"name = '{name}'")),
        "champion": client.get_model_version_by_alias(name, "champion").version,
        "deployments": deployments,
        "flow_runs": [r for r in flow_runs if r[1] != "SCHEDULED"],
    }


def test_kill_9_of_every_service_then_up_loses_nothing(demo_run: dict, tmp_path) -> None:
    settings = demo_run["settings"]
    before = snapshot(settings)
    assert before["versions"] and before["runs"] and before["deployments"]

    for name in SERVICE_NAMES:
        kill_service(settings, name)
    stack.up(settings)

    assert all(s.healthy for s in stack.status(settings) if s.name in SERVICE_NAMES)
    after = snapshot(settings)
    assert after == before
    for database in (
        settings.home / "mlflow" / "mlflow.db",
        settings.home / "prefect" / "prefect.db",
    ):
        with sqlite3.connect(database) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",), database
    pulled = run_cli(
        "data",
        "pull",
        "v2.0",
        "--to",
        str(tmp_path / "MNIST"),
        "--verify",
        config_dir=demo_run["config_dir"],
    )
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
