"""Workers: the process that runs the deployment's flow runs from a work pool, and the
environment it and its flow runs get."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from mnistops.errors import BadInput
from mnistops.flows.deployment import ENGINE_COMMAND, HEARTBEAT_S, check_server
from mnistops.settings import Settings
from mnistops.stack.process import ProcessRecord

# How often a worker asks for work (Prefect's default is 10 s): the delay of a quick run.
WORKER_POLL_S = 2


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a worker and of the flow runs it starts: the stack's client
    variables, absolute paths for state and config (runs start in a temp dir)."""
    from mnistops.clients import client_env

    env = {**os.environ, **client_env(settings)}
    env["PATH"] = engine_path(env.get("PATH", ""))
    env["PREFECT_API_URL"] = settings.prefect_api_url
    env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
    env["PREFECT_WORKER_QUERY_SECONDS"] = str(WORKER_POLL_S)
    env["PREFECT_WORKER_PREFETCH_SECONDS"] = "5"
    env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_S)
    env["MNISTOPS_HOME"] = str(settings.home)
    env["MNISTOPS_DATA_DIR"] = str(settings.data_dir)
    folder = settings.config_dir
    if folder is not None and folder.is_dir():
        env["MNISTOPS_CONFIG_DIR"] = str(folder)
    return env


def engine_path(path: str) -> str:
    """`path` with this interpreter's folder first: the `python` of the deployments'
    ENGINE_COMMAND is then this one, whatever the shell that started the worker had."""
    here = str(Path(sys.executable).parent)
    return os.pathsep.join([here, *(p for p in path.split(os.pathsep) if p and p != here)])


def check_engine() -> None:
    """The flow runs' `python`, beside this interpreter, is this environment's (a virtual
    environment always has one; beside a system `python3`, `python` may be another)."""
    import subprocess

    python = Path(sys.executable).parent / "python"
    fix = "run mnistops from a virtual environment (`make setup` makes .venv)"
    try:
        found = subprocess.run(
            [str(python), "-c", "import sys; print(sys.prefix)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        raise BadInput(
            f"a worker starts flow runs with `{ENGINE_COMMAND}`, and there is no {python}; {fix}"
        ) from None
    if found.returncode != 0 or found.stdout.strip() != sys.prefix:
        raise BadInput(
            f"a worker starts flow runs with `{ENGINE_COMMAND}`, and {python} is not this"
            f" interpreter's environment ({sys.prefix}); {fix}"
        )


def worker_command(pool: str) -> list[str]:
    prefect = Path(sys.executable).parent / "prefect"
    return [str(prefect), "worker", "start", "--pool", pool, "--type", "process"]


def check_pool(settings: Settings, pool: str) -> None:
    """The server answers and has the work pool: a worker would otherwise create a pool
    of that name, which no deployment uses."""
    from prefect.exceptions import ObjectNotFound

    from mnistops.clients import prefect_client

    check_server(settings)
    with prefect_client(settings) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            existing = sorted(p.name for p in client.read_work_pools())
            raise BadInput(
                f"work pool '{pool}' does not exist on the Prefect server at"
                f" {settings.prefect_api_url}; run `mnistops deploy` first"
                f" (pools there: {', '.join(existing) or 'none'})"
            ) from None


def device_warning(settings: Settings, pool: str) -> str | None:
    """A line to show when the pool's runs train on CUDA and this machine has none (they
    will fail with the training's own message), else None."""
    if settings.deployment.pools.get(pool) != "cuda":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (
        f"pool {pool} trains on device cuda, but this machine has no usable CUDA GPU"
        " (torch.cuda.is_available() is False): its runs here will fail"
    )


def run_in_foreground(
    settings: Settings, pool: str, ready: Callable[[], None] = lambda: None
) -> NoReturn:
    """This process becomes a worker for `pool` (Ctrl-C stops it); `ready` runs once
    the pool is known to exist."""
    check_engine()
    check_pool(settings, pool)
    ready()
    cmd = worker_command(pool)
    os.execve(cmd[0], cmd, worker_env(settings))


def start_detached(settings: Settings, pool: str) -> ProcessRecord:
    """A worker for `pool` as a background service of the stack (one per pool)."""
    from mnistops import stack

    check_engine()
    check_pool(settings, pool)
    return stack.start_worker(settings, pool, worker_command(pool), worker_env(settings))


def running_worker(settings: Settings, pool: str) -> ProcessRecord | None:
    """The detached worker of `pool` started from this state dir, if it runs."""
    from mnistops import stack

    name = f"{stack.WORKER_PREFIX}{pool}"
    for record in stack.worker_records(settings):
        if record.name == name and stack.process.is_alive(record):
            return record
    return None
