"""The stack's lifecycle: start every service and wait until it is healthy and locked,
stop them with their children, report their state, or run one in the foreground."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from mnistops.credentials import tighten
from mnistops.errors import BadInput
from mnistops.settings import WILDCARDS, Settings, is_loopback
from mnistops.stack import postgres, process, store_checks, workers
from mnistops.stack.ports import accepts_connections, port_in_use
from mnistops.stack.services import SERVICE_NAMES, Service, all_services, http_ok
from mnistops.stack.state import (
    Report,
    StackError,
    log_dir,
    no_report,
    run_dir,
    stack_keys,
    state_lock,
)


@dataclass
class ServiceStatus:
    name: str
    title: str
    url: str
    external: bool
    running: bool
    pid: int | None
    healthy: bool
    log: Path | None
    reach: str = ""
    """who can reach it: this machine only, or any host (and with which credential)"""


def exposure(settings: Settings) -> list[str]:
    """One warning for each service we start that other hosts reach without a login."""
    if not settings.beyond_loopback:
        return []
    machine = "this machine" if settings.bind in WILDCARDS else settings.bind
    open_to = f"any host that can reach {machine}"
    found = []
    if is_loopback(settings.advertised_host):
        found.append(
            f"advertise is {settings.advertised_host}, a loopback address, while the services"
            " listen beyond loopback: what `stack env` prints works on this machine only; set"
            " advertise to a name or address the other machines reach"
        )
    if settings.mlflow.tracking_uri is None and not settings.mlflow_login_on:
        found.append(
            f"MLflow on {settings.bind}:{settings.mlflow.port} has no login (mlflow.auth is"
            f" false): {open_to} can read, change and delete runs and models, and so choose"
            " the model that is served"
        )
    if settings.prefect.api_url is None and not settings.prefect_login_on:
        found.append(
            f"Prefect on {settings.bind}:{settings.prefect.port} has no login (prefect.auth is"
            f" false): {open_to} can start, change and cancel flow runs and deployments, and"
            " so run code on every worker"
        )
    return found


CREDENTIAL = {"s3": "S3 keys", "mlflow": "login", "prefect": "login", "serve": "API key"}

UNGUARDED_PROBE = {
    "mlflow": "/api/2.0/mlflow/experiments/search?max_results=1",
    "prefect": "/api/admin/version",
    "serve": "/model",
}
"""a request each service answers only with its credential (401 without it)"""


def reach(record: process.ProcessRecord | None, name: str, url: str) -> str:
    """Who can reach a running service, and with what: read from the process itself
    (the addresses it listens on) and from the service (does it answer a request without
    its credential?), not from the settings of the shell that asks."""
    if record is None or not process.is_alive(record):
        return ""
    addresses = process.listening_addresses(record)
    if not addresses:
        return ""
    if all(is_loopback(address) for address in addresses):
        return "this host"
    credential = CREDENTIAL[name]
    if name in UNGUARDED_PROBE and _answers_without_credential(url + UNGUARDED_PROBE[name]):
        credential = f"NO {credential.upper()}"
    return f"any host ({credential})"


def _answers_without_credential(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=3).status_code != 401
    except httpx.HTTPError:
        return False


def up(settings: Settings, report: Report = no_report) -> list[ServiceStatus]:
    """Start every service that is neither external nor already running, and wait for health.

    On any failure, whatever this call started is stopped again and StackError says why.
    """
    with state_lock(settings):
        narrowed = tighten(settings.home)
        keys = stack_keys(settings, create=True)
        services = all_services(settings, keys)
        to_start = [svc for svc in services if _needs_start(settings, svc, report)]
        _wait_until_exited(settings, to_start, report)
        _check_ports_free(settings, to_start, report)
        if settings.database_url is not None and any(
            svc.name in ("mlflow", "prefect") for svc in to_start
        ):
            try:
                postgres.ensure_databases(
                    settings, [svc.name for svc in to_start if svc.name != "s3"]
                )
            except postgres.DatabaseError as exc:
                raise StackError(str(exc)) from None
        started: list[tuple[Service, process.ProcessRecord]] = []
        try:
            for svc in to_start:
                report(f"starting {svc.title} on {svc.url}")
                env = {**svc.env, **svc.prepare()}
                record = process.start(
                    svc.name, svc.command, env, run_dir(settings), log_dir(settings), svc.url
                )
                started.append((svc, record))
            _wait_healthy(started, report)
            _check_ports_owned(started)
            s3_started = any(svc.name == "s3" for svc, _ in started)
            if s3_started:
                store_checks.check_store_locked(settings)
            store_checks.ensure_buckets(settings, keys)
            if s3_started:
                store_checks.wait_objects_readable(settings, keys, report)
            if settings.s3.endpoint_url is None:
                store_checks.close_buckets(settings, keys, report)
        except BaseException:
            for _, record in reversed(started):
                process.stop(record, run_dir(settings))
            raise
        workers.restart_workers(settings, report)
        narrowed += tighten(settings.home)
        if narrowed:
            report(
                f"made {narrowed} files and folders of the state dir {settings.home} private"
                " (other users could read them)"
            )
    return status(settings)


def serve(settings: Settings, name: str) -> None:
    """Run one service in the foreground, in place of this process (a container's main
    process): the same command, flags and environment as `up` uses. The service's own
    URL setting (which makes it external for clients) is ignored here."""
    if name not in SERVICE_NAMES:
        raise BadInput(f"no service '{name}': choose one of {', '.join(SERVICE_NAMES)}")
    url_key = {"s3": "endpoint_url", "mlflow": "tracking_uri", "prefect": "api_url"}[name]
    own = getattr(settings, name).model_copy(update={url_key: None})
    local = settings.model_copy(update={name: own})
    keys = stack_keys(local, create=True) if name == "s3" else stack_keys(settings, create=False)
    (svc,) = [s for s in all_services(local, keys) if s.name == name]
    record = process.read_record(run_dir(local), name)
    if record is not None and process.is_alive(record):
        raise StackError(
            f"{svc.title} of this state dir runs already (pid {record.pid}, started by"
            " `mnistops stack up`); stop it with `mnistops stack down` first"
        )
    _check_ports_free(local, [svc], no_report, closing_wait_s=0)
    if local.database_url is not None and name in ("mlflow", "prefect"):
        try:
            postgres.ensure_databases(local, [name])
        except postgres.DatabaseError as exc:
            raise StackError(str(exc)) from None
    env = {**svc.env, **svc.prepare()}
    os.execve(svc.command[0], svc.command, env)


def _needs_start(settings: Settings, svc: Service, report: Report) -> bool:
    if svc.external:
        report(f"{svc.title}: external, at {svc.url} (not started here)")
        return False
    record = process.read_record(run_dir(settings), svc.name)
    if record is not None and process.is_alive(record):
        report(f"{svc.title}: already running (pid {record.pid}) at {svc.url}")
        return False
    return True


def _wait_until_exited(
    settings: Settings, services: list[Service], report: Report, wait_s: float = 60.0
) -> None:
    """A service that was just killed may still hold its ports while the kernel ends its
    threads: wait for that rather than call its own port taken."""
    records = [process.read_record(run_dir(settings), svc.name) for svc in services]
    exiting = [r for r in records if r is not None and process.still_exiting(r)]
    if exiting:
        report(f"waiting for the stopped {', '.join(r.name for r in exiting)} to finish exiting")
    deadline = time.monotonic() + wait_s
    while exiting and time.monotonic() < deadline:
        time.sleep(0.5)
        exiting = [r for r in exiting if process.still_exiting(r)]


def _port_owner(port: int) -> str:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            address = conn.laddr
            listening = bool(address) and conn.status == psutil.CONN_LISTEN
            if listening and getattr(address, "port", None) == port and conn.pid:
                proc = psutil.Process(conn.pid)
                return f" by {proc.name()} (pid {conn.pid})"
    except psutil.Error:
        pass
    return ""


def _check_ports_free(
    settings: Settings, services: list[Service], report: Report, closing_wait_s: float = 75.0
) -> None:
    """Every port must be free. A port that nothing listens on but that is still held by
    the closing connections of a server that died (FIN_WAIT, up to tcp_fin_timeout) frees
    itself: wait for it instead of failing."""
    deadline = time.monotonic() + closing_wait_s
    while True:
        busy = [
            (key, port)
            for svc in services
            for key, port in svc.ports.items()
            if port_in_use(settings.bind, port)
        ]
        closing = [port for _key, port in busy if not accepts_connections(settings.bind, port)]
        if not busy or len(closing) < len(busy) or time.monotonic() > deadline:
            break
        report(f"waiting for port(s) {closing} to be released by a stopped server's connections")
        time.sleep(1)
    if busy:
        raise StackError(
            "cannot start the stack:\n  "
            + "\n  ".join(
                f"port {port} ({key}) on {settings.bind} is in use{_port_owner(port)}"
                for key, port in busy
            )
            + "\nStop what uses it, or choose another port in config/stack.yml"
            " (or MNISTOPS_<SECTION>__<KEY>, e.g. MNISTOPS_MLFLOW__PORT=5051)."
        )


def _wait_healthy(started: list[tuple[Service, process.ProcessRecord]], report: Report) -> None:
    """Poll all started services at once until each is healthy, exits, or times out."""
    waiting = {svc.name: (svc, rec) for svc, rec in started}
    began = time.monotonic()
    while waiting:
        for name, (svc, record) in list(waiting.items()):
            if svc.healthy():
                report(f"{svc.title} is up ({time.monotonic() - began:.1f} s)")
                del waiting[name]
            elif process.exited(record):
                raise StackError(
                    f"{svc.title} exited during start-up. Last lines of {record.log}:\n"
                    + process.tail(record.log_path)
                )
            elif time.monotonic() - began > svc.start_timeout_s:
                raise StackError(
                    f"{svc.title} did not become healthy within {svc.start_timeout_s:.0f} s."
                    f" Last lines of {record.log}:\n" + process.tail(record.log_path)
                )
        time.sleep(0.3)


def _check_ports_owned(started: list[tuple[Service, process.ProcessRecord]]) -> None:
    """Each port must be held by the process we started (a server may silently move one)."""
    for svc, record in started:
        missing = {
            f"{port} ({key})"
            for key, port in svc.ports.items()
            if port not in process.listening_ports(record)
        }
        if missing:
            raise StackError(
                f"{svc.title} is running but does not listen on {', '.join(sorted(missing))}."
                f" Last lines of {record.log}:\n" + process.tail(record.log_path)
            )


def down(settings: Settings, report: Report = no_report) -> list[str]:
    """Stop every service this state dir started, with all their child processes."""
    stopped = []
    with state_lock(settings):
        background = workers.background_records(settings)
        for record in background:
            # one that died (killed, crashed) is started again by the next `up` too
            workers.mark_for_restart(settings, record.name, True)
            if process.is_alive(record):
                report(f"stopping {record.name} (pid {record.pid})")
                stopped.append(record.name)
        # the workers first: they are the services' clients
        process.stop_all(background, run_dir(settings))
        services = []
        for name in reversed(SERVICE_NAMES):
            service = process.read_record(run_dir(settings), name)
            if service is None:
                continue
            if process.is_alive(service):
                report(f"stopping {name} (pid {service.pid})")
                stopped.append(name)
            services.append(service)
        process.stop_all(services, run_dir(settings))
        lost = _stop_unrecorded(settings, report)
        stopped += [name for name in lost if name not in stopped]
        store_ran = "s3" in lost or any(s.name == "s3" for s in services)
        if store_ran and "s3" not in settings.set_aside_keys:
            # (with the ports unknown, another store's sockets must not be touched)
            store_checks.remove_store_sockets(settings)
    return stopped


def _stop_unrecorded(settings: Settings, report: Report) -> list[str]:
    """Stop what this state dir started that no record names any more (a record damaged
    by hand or a full disk is removed as garbage); the names of what was stopped."""
    lost = process.unrecorded(run_dir(settings))
    for name, procs in sorted(lost.items()):
        report(f"stopping {name} (pid {procs[0].pid}), whose record was lost or damaged")
    graces = (process.STORE_STOP_GRACE_S if n == "s3" else process.STOP_GRACE_S for n in lost)
    process.stop_processes([p for procs in lost.values() for p in procs], max(graces, default=0))
    return sorted(lost)


def status(settings: Settings) -> list[ServiceStatus]:
    keys = stack_keys(settings, create=False)
    result = []
    for svc in all_services(settings, keys):
        record = None if svc.external else process.read_record(run_dir(settings), svc.name)
        alive = record is not None and process.is_alive(record)
        result.append(
            ServiceStatus(
                name=svc.name,
                title=svc.title,
                url=svc.url,
                external=svc.external,
                running=svc.external or alive,
                pid=record.pid if alive and record else None,
                healthy=(svc.external or alive) and svc.healthy(),
                log=record.log_path if record else None,
                reach="external" if svc.external else reach(record, svc.name, svc.url),
            )
        )
    for record in workers.background_records(settings):
        alive = process.is_alive(record)
        serving = record.name == workers.SERVE_NAME
        result.append(
            ServiceStatus(
                name=record.name,
                title="Prediction service"
                if serving
                else f"Prefect worker ({record.name.removeprefix(workers.WORKER_PREFIX)})",
                url=record.url,
                external=False,
                running=alive,
                pid=record.pid if alive else None,
                healthy=alive and (not serving or http_ok(f"{record.url}/health")),
                log=record.log_path,
                reach=reach(record, "serve", record.url) if serving else "connects out only",
            )
        )
    return result
