"""The stack with PostgreSQL as the database of MLflow and Prefect (a real server)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import psycopg2
import pytest
from psycopg2 import sql

from mnistops import stack
from mnistops.settings import Settings, load_settings
from mnistops.stack.postgres import database_name
from tests.helpers import write_stack_config

pytestmark = pytest.mark.integration

DATABASE_URL = os.environ.get("MNISTOPS_TEST_DATABASE_URL")


def _connect(url: str):
    return psycopg2.connect(url.rstrip("/") + "/postgres", connect_timeout=10)


@pytest.fixture(scope="module")
def pg_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    if not DATABASE_URL:
        if os.environ.get("CI"):
            pytest.fail("CI must set MNISTOPS_TEST_DATABASE_URL (.ci/run starts PostgreSQL)")
        pytest.skip("MNISTOPS_TEST_DATABASE_URL is not set (see .ci/run)")
    root: Path = tmp_path_factory.mktemp("pgstack")
    prefix = f"mnistops_test_{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        write_stack_config(root, database_url=DATABASE_URL, database_prefix=prefix)
    )
    try:
        yield settings
    finally:
        stack.down(settings)
        conn = _connect(DATABASE_URL)
        conn.autocommit = True
        with conn.cursor() as cur:
            for service in ("mlflow", "prefect"):
                name = sql.Identifier(database_name(settings, service))
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        conn.close()


@pytest.mark.slow("the stack is started twice on PostgreSQL, migrations included")
def test_postgres_stack_creates_databases_and_keeps_data(pg_settings: Settings) -> None:
    assert DATABASE_URL is not None
    stack.up(pg_settings)
    conn = _connect(DATABASE_URL)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s",
            (pg_settings.database_prefix + "_%",),
        )
        assert {row[0] for row in cur.fetchall()} == {
            database_name(pg_settings, "mlflow"),
            database_name(pg_settings, "prefect"),
        }
    conn.close()
    assert not (pg_settings.home / "mlflow" / "mlflow.db").exists()
    assert not (pg_settings.home / "prefect" / "prefect.db").exists()

    tracking = mlflow.MlflowClient(tracking_uri=pg_settings.mlflow_uri)
    experiment = tracking.create_experiment("pg-kept")
    run_id = tracking.create_run(experiment).info.run_id
    created = httpx.post(
        f"{pg_settings.prefect_api_url}/variables/",
        json={"name": "pg_kept", "value": "yes"},
        timeout=10,
    )
    assert created.status_code == 201, created.text

    stack.down(pg_settings)
    stack.up(pg_settings)
    assert tracking.get_run(run_id).info.experiment_id == experiment
    kept = httpx.get(f"{pg_settings.prefect_api_url}/variables/name/pg_kept", timeout=10)
    assert kept.json()["value"] == "yes"


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    settings = load_settings(
        write_stack_config(tmp_path, database_url="postgresql://nobody:secret-pw@127.0.0.1:1")
    )
    with pytest.raises(stack.StackError) as info:
        stack.up(settings)
    assert "cannot connect to PostgreSQL" in str(info.value)
    assert "secret-pw" not in str(info.value)
    assert not (settings.home / "run" / "s3.json").exists()
