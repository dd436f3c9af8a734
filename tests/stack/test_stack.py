"""The local stack against real SeaweedFS, MLflow and Prefect servers."""

from __future__ import annotations

import os
import shlex
import socket
import uuid
from pathlib import Path

import httpx
import mlflow
import psutil
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from mnistops import stack
from mnistops.clients import s3_client
from mnistops.credentials import S3Keys, load_keys
from mnistops.settings import Settings, load_settings
from mnistops.stack import process
from tests.helpers import run_cli, write_stack_config

pytestmark = pytest.mark.integration


def records(settings: Settings) -> list[process.ProcessRecord]:
    found = [process.read_record(stack.run_dir(settings), n) for n in ("s3", "mlflow", "prefect")]
    return [r for r in found if r is not None]


def test_all_services_healthy(stack_settings: Settings) -> None:
    statuses = stack.status(stack_settings)
    assert [s.name for s in statuses] == ["s3", "mlflow", "prefect"]
    assert all(s.running and s.healthy and s.pid for s in statuses), statuses


def test_buckets_exist(stack_settings: Settings) -> None:
    names = {b["Name"] for b in s3_client(stack_settings).list_buckets()["Buckets"]}
    assert {"dvc", "mlflow", "prefect"} <= names


def test_s3_put_get_with_generated_keys(stack_settings: Settings) -> None:
    client = s3_client(stack_settings)
    key = f"smoke/{uuid.uuid4()}"
    client.put_object(Bucket="dvc", Key=key, Body=b"digits")
    assert client.get_object(Bucket="dvc", Key=key)["Body"].read() == b"digits"


def test_s3_refuses_wrong_key_and_anonymous(stack_settings: Settings) -> None:
    keys = load_keys(stack_settings.home)
    assert keys is not None
    s3_client(stack_settings).put_object(Bucket="dvc", Key="kept", Body=b"private")
    wrong = s3_client(stack_settings, S3Keys(keys.access_key_id, "x" * 48))
    import boto3

    anonymous = boto3.client(
        "s3",
        endpoint_url=stack_settings.s3_endpoint,
        region_name="us-east-1",
        config=Config(signature_version=UNSIGNED),
    )
    for client in (wrong, anonymous):
        for call in (
            lambda c=client: c.put_object(Bucket="dvc", Key="nope", Body=b"x"),
            lambda c=client: c.get_object(Bucket="dvc", Key="kept"),
            lambda c=client: c.list_objects_v2(Bucket="dvc"),
            lambda c=client: c.list_buckets(),
        ):
            with pytest.raises(ClientError):
                call()


def test_mlflow_artifact_lands_in_bucket_without_client_keys(stack_settings: Settings) -> None:
    credentials = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")
    assert not any(k in os.environ for k in credentials), "client must need no S3 keys"
    client = mlflow.MlflowClient(tracking_uri=stack_settings.mlflow_uri)
    experiment = client.create_experiment(f"smoke-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    path = Path(os.environ["PREFECT_HOME"]) / "note.txt"
    path.write_text("tracked")
    client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    listing = s3_client(stack_settings).list_objects_v2(Bucket="mlflow")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert any(run.info.run_id in k and k.endswith("note.txt") for k in keys), keys


def test_mlflow_runs_as_one_process(stack_settings: Settings) -> None:
    """`mlflow server` starts uvicorn as a child and waits: two ~250 MB processes. The
    stack's runs the same command with its server in its own place (compat)."""
    record = process.read_record(stack.run_dir(stack_settings), "mlflow")
    assert record is not None
    (server,) = process.process_tree(record)
    assert "uvicorn" in server.cmdline() and "mlflow.server.fastapi_app:app" in server.cmdline()


@pytest.mark.security
def test_mlflow_refuses_a_foreign_host_header(stack_settings: Settings) -> None:
    """--allowed-hosts: a page of another site that resolves its name to 127.0.0.1 (DNS
    rebinding) cannot use the tracking server."""
    search = f"{stack_settings.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(search, timeout=10).status_code == 200
    foreign = httpx.get(search, headers={"Host": "evil.example"}, timeout=10)
    assert foreign.status_code in (400, 403), foreign.status_code


def test_prefect_api_answers(stack_settings: Settings) -> None:
    response = httpx.get(f"{stack_settings.prefect_api_url}/health", timeout=10)
    assert response.status_code == 200


def test_every_socket_is_on_loopback(stack_settings: Settings) -> None:
    for record in records(stack_settings):
        for proc in process.process_tree(record):
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    assert conn.laddr.ip == "127.0.0.1", (record.name, conn)


@pytest.mark.security
def test_seaweedfs_listens_only_on_its_configured_ports(stack_settings: Settings) -> None:
    """No WebDAV, Iceberg, Lance or admin UI port: only the ports the settings name."""
    from mnistops.stack.services import s3_service

    expected = set(s3_service(stack_settings, load_keys(stack_settings.home)).ports.values())
    (record,) = [r for r in records(stack_settings) if r.name == "s3"]
    listening = {
        conn.laddr.port
        for proc in process.process_tree(record)
        for conn in proc.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    assert listening == expected, (
        f"unexpected: {listening - expected}, missing: {expected - listening}"
    )


def test_second_up_changes_nothing(stack_settings: Settings) -> None:
    before = {r.name: r.pid for r in records(stack_settings)}
    messages: list[str] = []
    stack.up(stack_settings, report=messages.append)
    assert {r.name: r.pid for r in records(stack_settings)} == before
    assert all("already running" in m for m in messages), messages


def test_cli_status_and_env_work_in_a_clean_shell(stack_settings: Settings, tmp_path: Path) -> None:
    config_dir = stack_settings.home.parent / "config"
    status = run_cli("stack", "status", config_dir=config_dir)
    assert status.returncode == 0, status.stderr
    assert "healthy" in status.stdout
    exported = run_cli("stack", "env", config_dir=config_dir)
    assert exported.returncode == 0
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    for line in exported.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    # Another machine: no config, no state dir, an empty HOME; only what `env` printed.
    remote = run_cli("stack", "status", env=env, cwd=tmp_path)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    assert remote.stdout.count("(external)") == 3
    assert not (tmp_path / ".mnistops" / "run").exists()


def test_logs_show_a_service_log(stack_settings: Settings) -> None:
    config_dir = stack_settings.home.parent / "config"
    logs = run_cli("stack", "logs", "mlflow", "-n", "20", config_dir=config_dir)
    assert logs.returncode == 0, logs.stderr
    assert "HTTP/1.1" in logs.stdout, "the tail of the MLflow server's access log"
    unknown = run_cli("stack", "logs", "nginx", config_dir=config_dir)
    assert unknown.returncode == 2 and "choose one of: s3, mlflow, prefect" in unknown.stderr
    # a detached service that died has no record left; its log says why
    died = stack_settings.home / "logs" / "serve.log"
    died.write_text("ConfigError: config/flow.yml: key 'model_registry.name'\n")
    try:
        serve = run_cli("stack", "logs", "serve", config_dir=config_dir)
    finally:
        died.unlink()
    assert serve.returncode == 0 and "model_registry.name" in serve.stdout, serve.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    config_dir = write_stack_config(tmp_path)
    settings = load_settings(config_dir)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", settings.mlflow.port))
        holder.listen()
        result = run_cli("stack", "up", config_dir=config_dir)
    assert result.returncode != 0
    assert f"port {settings.mlflow.port} (mlflow.port)" in result.stderr
    assert "in use" in result.stderr
    assert records(settings) == [], "nothing may be left running"


def test_failed_start_shows_log_and_stops_the_rest(tmp_path: Path) -> None:
    config_dir = write_stack_config(tmp_path)
    settings = load_settings(config_dir)
    (settings.home / "prefect" / "prefect.db").mkdir(parents=True)  # SQLite cannot open a folder
    result = run_cli("stack", "up", config_dir=config_dir)
    assert result.returncode != 0
    assert "Prefect server exited during start-up" in result.stderr
    assert "Last lines of" in result.stderr
    assert records(settings) == [], "the services this call started must be stopped"


def test_external_services_are_checked_not_started(
    stack_settings: Settings, tmp_path: Path
) -> None:
    keys = load_keys(stack_settings.home)
    assert keys is not None
    config_dir = write_stack_config(
        tmp_path,
        s3={
            "endpoint_url": stack_settings.s3_endpoint,
            "access_key_id": keys.access_key_id,
            "secret_access_key": keys.secret_access_key,
        },
        mlflow={"tracking_uri": stack_settings.mlflow_uri},
        prefect={"api_url": stack_settings.prefect_api_url},
    )
    settings = load_settings(config_dir)
    statuses = stack.up(settings)
    assert records(settings) == []
    assert all(s.external and s.healthy for s in statuses)


def test_down_leaves_no_process_and_up_keeps_data(stack_settings: Settings) -> None:
    """Runs last in this module: it restarts the session's stack."""
    client = s3_client(stack_settings)
    client.put_object(Bucket="dvc", Key="kept/object", Body=b"still here")
    tracking = mlflow.MlflowClient(tracking_uri=stack_settings.mlflow_uri)
    experiment = tracking.create_experiment("kept-experiment")
    run_id = tracking.create_run(experiment).info.run_id
    variable = httpx.post(
        f"{stack_settings.prefect_api_url}/variables/",
        json={"name": "kept_variable", "value": "yes"},
        timeout=10,
    )
    assert variable.status_code == 201, variable.text

    pids = [p.pid for r in records(stack_settings) for p in process.process_tree(r)]
    assert len(pids) >= 3
    assert sorted(stack.down(stack_settings)) == ["mlflow", "prefect", "s3"]
    assert [
        pid
        for pid in pids
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ] == []
    assert all(not s.running for s in stack.status(stack_settings))
    down_status = run_cli("stack", "status", config_dir=stack_settings.home.parent / "config")
    assert down_status.returncode == 1

    stack.up(stack_settings)
    body = s3_client(stack_settings).get_object(Bucket="dvc", Key="kept/object")["Body"].read()
    assert body == b"still here"
    assert tracking.get_run(run_id).info.experiment_id == experiment
    kept = httpx.get(f"{stack_settings.prefect_api_url}/variables/name/kept_variable", timeout=10)
    assert kept.json()["value"] == "yes"
