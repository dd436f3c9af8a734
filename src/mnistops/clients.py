"""The clients of the stack's services, configured in one place for a `Settings`.

An S3 client, an MLflow client and a Prefect client context, each with its endpoint and
credentials taken from the settings: nothing here changes the process's environment
(only `library_defaults` adds tuning defaults that a user's own values override), so a
worker or server started from this process does not inherit a login by accident.
`client_env` is the other way round: the variables with which plain `dvc`, `mlflow`,
`prefect` and boto3 clients in a shell use the same stack.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from mnistops.credentials import S3Keys, load_keys

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient

    from mnistops.settings import Settings

# boto3 >= 1.36 adds CRC trailers to uploads by default; some S3 servers store
# them inside the object. Only send checksums when an API requires them.
CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


# MLflow 3 sends usage telemetry unless told not to; Prefect's analytics are off by flag.
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

# Fail within seconds, not minutes, when the tracking server is gone (MLflow's default
# retries back off for over a minute).
MLFLOW_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # An MLflow 3 server with an S3 artifact store hands out presigned S3 URLs for
    # downloads, naming the store as the server reaches it (`http://minio:9000` in a
    # compose network). Our models are small: fetch them through the server, which
    # every client reaches by definition.
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
    # the champion gate downloads small files mid-command: no tqdm bars in our output
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


TORCH_ENV = {
    # cuBLAS is deterministic only with a fixed workspace; read when CUDA starts.
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}


def library_defaults() -> None:
    """Telemetry off, S3 checksums only where required, MLflow's retries short and its
    downloads through the server, cuBLAS deterministic: read by the libraries from the
    environment only, so set there, as defaults that a user's own variables override.
    Called at the start of every command and flow run."""
    for key, value in {**NO_TELEMETRY, **CHECKSUM_ENV, **MLFLOW_CLIENT_ENV, **TORCH_ENV}.items():
        os.environ.setdefault(key, value)


def s3_keys(settings: Settings) -> S3Keys | None:
    """Keys from settings, else the stack's generated ones; None: use the AWS default chain."""
    if settings.s3.access_key_id and settings.s3.secret_access_key:
        return S3Keys(settings.s3.access_key_id, settings.s3.secret_access_key.get_secret_value())
    if settings.s3.endpoint_url is None:
        return load_keys(settings.home)
    return None


def s3_client(settings: Settings, keys: S3Keys | None = None, timeout_s: float = 10.0) -> Any:
    """A boto3 S3 client for the settings' store: path-style, short timeouts."""
    keys = keys or s3_keys(settings)
    return s3_client_at(settings.s3_endpoint, settings.s3.region, keys, timeout_s)


def s3_client_at(
    endpoint_url: str | None, region: str, keys: S3Keys | None, timeout_s: float = 10.0
) -> Any:
    """`s3_client` from plain values (the prediction log's writer process has no
    settings); keys None: the AWS default chain."""
    import boto3  # here, not at the top: commands that need no S3 start faster
    from botocore.config import Config

    config = Config(
        connect_timeout=timeout_s,
        read_timeout=timeout_s * 3,
        retries={"max_attempts": 2, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=keys.access_key_id if keys else None,
        aws_secret_access_key=keys.secret_access_key if keys else None,
        config=config,
    )


def prefect_auth(settings: Settings) -> str | None:
    """USER:PASSWORD for the Prefect API: the configured one, or the embedded server's."""
    if settings.prefect.auth_string is not None:
        return settings.prefect.auth_string.get_secret_value()
    if settings.prefect.api_url is None and settings.prefect_login_on:
        from mnistops.credentials import ensure_prefect_auth

        return ensure_prefect_auth(settings.home)
    return None


def mlflow_login(settings: Settings) -> tuple[str, str] | None:
    """(user, password) for the MLflow server: the configured one, or the embedded one's."""
    mlflow = settings.mlflow
    if mlflow.username and mlflow.password is not None:
        return mlflow.username, mlflow.password.get_secret_value()
    if mlflow.tracking_uri is None and settings.mlflow_login_on:
        from mnistops.credentials import ensure_mlflow_auth

        auth = ensure_mlflow_auth(settings.home)
        return auth.username, auth.password
    return None


def model_signing_key(settings: Settings) -> bytes | None:
    """The key that signs registered models' file records: the configured one, or the
    embedded stack's (made at first use); None with an MLflow server of your own and no
    `model_registry.signing_key`."""
    configured = settings.model_registry.signing_key
    if configured is not None:
        return configured.get_secret_value().encode()
    if settings.mlflow.tracking_uri is None:
        from mnistops.credentials import ensure_model_key

        return ensure_model_key(settings.home).encode()
    return None


def mlflow_login_env(settings: Settings) -> dict[str, str]:
    """MLflow's own client variables for the login (its Python client reads them)."""
    login = mlflow_login(settings)
    if login is None:
        return {}
    return {"MLFLOW_TRACKING_USERNAME": login[0], "MLFLOW_TRACKING_PASSWORD": login[1]}


def client_env(settings: Settings) -> dict[str, str]:
    """Variables with which plain dvc, mlflow, prefect and boto3 clients use this stack,
    and with which our own commands on another machine find it (no local state needed):
    the URLs name the advertised host, so they work wherever that host is reachable."""
    urls = settings.advertised_urls()
    env = {
        "AWS_ENDPOINT_URL": urls["s3"],
        "AWS_DEFAULT_REGION": settings.s3.region,
        **CHECKSUM_ENV,
        **NO_TELEMETRY,
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "MLFLOW_S3_ENDPOINT_URL": urls["s3"],
        "PREFECT_API_URL": urls["prefect"],
        "MNISTOPS_S3__ENDPOINT_URL": urls["s3"],
        "MNISTOPS_S3__REGION": settings.s3.region,
        "MNISTOPS_MLFLOW__TRACKING_URI": urls["mlflow"],
        "MNISTOPS_PREFECT__API_URL": urls["prefect"],
        "MNISTOPS_SERVE__URL": urls["serve"],
    }
    keys = s3_keys(settings)
    if keys:
        env["AWS_ACCESS_KEY_ID"] = keys.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = keys.secret_access_key
        # Ours too, so that a shell that evaluated these prints the same set again.
        env["MNISTOPS_S3__ACCESS_KEY_ID"] = keys.access_key_id
        env["MNISTOPS_S3__SECRET_ACCESS_KEY"] = keys.secret_access_key
    login = mlflow_login(settings)
    if login:
        env.update(mlflow_login_env(settings))
        env["MNISTOPS_MLFLOW__USERNAME"], env["MNISTOPS_MLFLOW__PASSWORD"] = login
    signing_key = model_signing_key(settings)
    if signing_key:
        env["MNISTOPS_MODEL_REGISTRY__SIGNING_KEY"] = signing_key.decode()
    auth = prefect_auth(settings)
    if auth:
        env["PREFECT_API_AUTH_STRING"] = auth
        env["MNISTOPS_PREFECT__AUTH_STRING"] = auth
    return env


@contextmanager
def prefect_api(settings: Settings) -> Iterator[None]:
    """Prefect's client, inside this block, talks to our server with our login, and never
    to a temporary local one (what Prefect does when no API URL is set). Prefect's own
    scoped settings, not the process's environment."""
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        temporary_settings,
    )

    updates: dict[Any, Any] = {
        PREFECT_API_URL: settings.prefect_api_url,
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False,
    }
    auth = prefect_auth(settings)
    if auth:
        updates[PREFECT_API_AUTH_STRING] = auth
    with temporary_settings(updates=updates):
        yield


PREFECT_RETRY_CODES = frozenset({408, 429, 502, 503})
"""answers Prefect's own client retries (503: the server's database was busy)"""
PREFECT_TRIES = 6


def prefect_rest(
    settings: Settings,
    method: str,
    path: str,
    body: object = None,
    timeout_s: float = 10.0,
) -> Any:
    """One request to the Prefect server's REST API (`path` under `/api`), with our
    login: for commands that need a few answers, where importing Prefect's client would
    cost a second of CPU. Like that client, it tries again after a busy server's answer
    (PREFECT_RETRY_CODES) or a dropped connection, waiting 0.25 s, 0.5 s, 1 s... or what
    the server's Retry-After asks (at most 10 s). Returns the httpx response, its status
    not checked; a server never reached raises httpx's error at once."""
    import json
    import random
    import time

    import httpx

    auth = prefect_auth(settings)
    user, _, password = (auth or "").partition(":")
    dropped = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout)
    for attempt in range(PREFECT_TRIES):
        last = attempt == PREFECT_TRIES - 1
        try:
            answer = httpx.request(
                method,
                settings.prefect_api_url.rstrip("/") + path,
                content=None if body is None else json.dumps(body, default=_json_value),
                headers={"Content-Type": "application/json"},
                auth=(user, password) if auth else None,
                timeout=timeout_s,
            )
        except dropped:
            if last:
                raise
            wait = 0.25 * 2**attempt
        else:
            if answer.status_code not in PREFECT_RETRY_CODES or last:
                return answer
            wait = _retry_after(answer.headers.get("Retry-After"), 0.25 * 2**attempt)
        time.sleep(wait * random.uniform(1.0, 1.3))
    raise AssertionError("unreachable: the last try returns or raises")


def _retry_after(header: str | None, default: float) -> float:
    try:
        return min(10.0, max(0.0, float(header))) if header else default
    except ValueError:
        return default


def _json_value(value: Any) -> Any:
    """NumPy numbers and arrays (monitoring's figures) as plain ones; anything else as
    its text."""
    plain = getattr(value, "tolist", None)
    return plain() if callable(plain) else str(value)


@contextmanager
def prefect_client(settings: Settings) -> Iterator[SyncPrefectClient]:
    """A synchronous Prefect client of the settings' server (see `prefect_api`)."""
    from prefect import get_client

    with prefect_api(settings), get_client(sync_client=True) as client:
        yield client


def mlflow_client(settings: Settings) -> MlflowClient:
    """An MLflow client of the settings' server, with its login."""
    import mlflow

    from mnistops import mlflow_plugin

    library_defaults()
    login = mlflow_login(settings)
    mlflow_plugin.Login.header = (
        "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode() if login else None
    )
    return mlflow.MlflowClient(settings.mlflow_uri)


@contextmanager
def mlflow_module_functions(settings: Settings) -> Iterator[None]:
    """MLflow's module-level functions (logging a model has no client form) talk to the
    settings' server inside this block only. MLflow exports MLFLOW_TRACKING_URI while its
    tracking URI is set; both are put back when the block ends."""
    mlflow_client(settings)
    with mlflow_tracking_uri(settings.mlflow_uri):
        yield


@contextmanager
def mlflow_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's module-level tracking URI set to `uri` inside the block only."""
    from mnistops import compat

    with compat.mlflow_tracking_uri(uri):
        yield
