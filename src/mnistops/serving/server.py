"""Running the service: uvicorn in the foreground, or as a background service of the
stack (`--detach`: pid and log in the state dir, a row in `stack status`, stopped by
`stack down` and started again by the next `stack up`)."""

from __future__ import annotations

import logging
import os
import sys
import time

import httpx

from mnistops.errors import BadInput
from mnistops.settings import Settings, url_host
from mnistops.stack.process import ProcessRecord
from mnistops.stack.workers import SERVE_NAME


class ServiceExposed(BadInput):
    """The service would answer anyone on a network without an API key."""


def exposure(settings: Settings) -> str | None:
    """A warning when the service answers other hosts without a key (`serve.public`);
    ServiceExposed when it would without anyone having said so."""
    if not settings.beyond_loopback or settings.serve.api_key is not None:
        return None
    where = f"{url_host(settings.bind)}:{settings.serve.port}"
    if settings.serve.public:
        return (
            f"the prediction service on {where} has no API key (serve.public is true): any"
            f" host that can reach {settings.bind} can use it"
        )
    raise ServiceExposed(
        f"the prediction service would answer on {where}, beyond loopback, without an API"
        f" key: set serve.api_key ({settings.where('serve.api_key')}; clients send it as"
        " `Authorization: Bearer KEY`), or serve.public: true to answer anyone, or bind"
        " 127.0.0.1"
    )


def run(settings: Settings) -> None:
    """Serve in this process until it is stopped (Ctrl-C, SIGTERM)."""
    import uvicorn
    from threadpoolctl import threadpool_limits

    from mnistops.serving.app import create_app
    from mnistops.serving.connections import bounded_protocol, connection_cap, raise_file_limit

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    threadpool_limits(settings.serve.threads or 1)
    app = create_app(settings)
    serve = settings.serve
    cap = connection_cap(serve.max_connections, raise_file_limit())
    uvicorn.run(
        app.state.asgi,
        host=settings.bind,
        port=settings.serve.port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # nothing here reads the client's address or scheme
        timeout_graceful_shutdown=5,
        timeout_keep_alive=max(1, int(serve.request_timeout_s)),
        backlog=min(cap, 4096),
        http=bounded_protocol(serve.request_timeout_s, cap, app.state.metrics),
    )


def command(settings: Settings) -> list[str]:
    """The command of a detached service: this mnistops, on the settings' port."""
    return [sys.executable, "-m", "mnistops", "serve", "--port", str(settings.serve.port)]


def service_env(settings: Settings) -> dict[str, str]:
    """The environment of a detached service: where its settings are (it derives the
    rest from them). No S3 keys: it reads models through the MLflow server."""
    env = {**os.environ, "MNISTOPS_HOME": str(settings.home)}
    if settings.config_dir is not None and settings.config_dir.is_dir():
        env["MNISTOPS_CONFIG_DIR"] = str(settings.config_dir)
    return env


def start_detached(settings: Settings) -> ProcessRecord:
    """Start the service in the background as part of the stack, one per state dir."""
    from mnistops import stack

    return stack.start_background(
        settings,
        SERVE_NAME,
        command(settings),
        service_env(settings),
        settings.local_serve_url,
        "a prediction service",
    )


def wait_ready(settings: Settings, timeout_s: float = 120.0) -> dict[str, object] | None:
    """The service's /health answer once it is ready; None if it was not within the time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{settings.local_serve_url}/health", timeout=2)
            if answer.status_code == 200:
                found: dict[str, object] = answer.json()
                return found
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return None


def running(settings: Settings) -> ProcessRecord | None:
    """The detached service of this state dir, if it runs."""
    from mnistops.stack import process, run_dir

    record = process.read_record(run_dir(settings), SERVE_NAME)
    return record if record is not None and process.is_alive(record) else None
