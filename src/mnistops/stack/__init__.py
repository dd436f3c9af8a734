"""The local stack: start, stop and inspect the S3, MLflow and Prefect services."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
from botocore.exceptions import BotoCoreError, ClientError

from mnistops.settings import Settings
from mnistops.stack import postgres, process
from mnistops.stack.credentials import (
    CredentialsError,
    S3Keys,
    ensure_keys,
    load_keys,
    make_private_home,
    tighten,
    write_private,
)
from mnistops.stack.endpoints import s3_client, s3_keys
from mnistops.stack.ports import accepts_connections, port_in_use
from mnistops.stack.services import SERVICE_NAMES, Service, all_services

Report = Callable[[str], None]


class StackError(Exception):
    """The stack could not be brought to the state asked for; the message says why."""


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
    open_to = f"any host that can reach {settings.bind}"
    found = []
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


def reach(settings: Settings, name: str) -> str:
    """Who can reach a service that this state dir starts, and with what."""
    if not settings.beyond_loopback:
        return "this host"
    credential = {
        "s3": "S3 keys",
        "mlflow": "login" if settings.mlflow_login_on else "NO LOGIN",
        "prefect": "login" if settings.prefect_login_on else "NO LOGIN",
    }[name]
    return f"any host ({credential})"


def run_dir(settings: Settings) -> Path:
    return settings.home / "run"


def log_dir(settings: Settings) -> Path:
    return settings.home / "logs"


@contextmanager
def _stack_lock(settings: Settings) -> Iterator[None]:
    """One `up` or `down` at a time per state dir."""
    make_private_home(settings.home)
    with open(settings.home / "stack.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _stack_keys(settings: Settings, create: bool) -> S3Keys | None:
    if settings.s3.endpoint_url is None:
        try:
            return ensure_keys(settings.home) if create else load_keys(settings.home)
        except CredentialsError as exc:
            raise StackError(str(exc)) from None
    return s3_keys(settings)


def up(settings: Settings, report: Report = lambda _: None) -> list[ServiceStatus]:
    """Start every service that is neither external nor already running, and wait for health.

    On any failure, whatever this call started is stopped again and StackError says why.
    """
    with _stack_lock(settings):
        narrowed = tighten(settings.home)
        keys = _stack_keys(settings, create=True)
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
                svc.prepare()
                record = process.start(
                    svc.name, svc.command, svc.env, run_dir(settings), log_dir(settings), svc.url
                )
                started.append((svc, record))
            _wait_healthy(started, report)
            _check_ports_owned(started)
            s3_started = any(svc.name == "s3" for svc, _ in started)
            if s3_started:
                _check_store_locked(settings)
            _ensure_buckets(settings, keys)
            if s3_started:
                _wait_objects_readable(settings, keys, report)
            if settings.s3.endpoint_url is None:
                _close_buckets(settings, keys, report)
        except BaseException:
            for _, record in reversed(started):
                process.stop(record, run_dir(settings))
            raise
        _restart_workers(settings, report)
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
    import os

    if name not in SERVICE_NAMES:
        raise StackError(f"no service '{name}': choose one of {', '.join(SERVICE_NAMES)}")
    url_key = {"s3": "endpoint_url", "mlflow": "tracking_uri", "prefect": "api_url"}[name]
    own = getattr(settings, name).model_copy(update={url_key: None})
    local = settings.model_copy(update={name: own})
    keys = _stack_keys(local, create=True) if name == "s3" else _stack_keys(settings, create=False)
    (svc,) = [s for s in all_services(local, keys) if s.name == name]
    if local.database_url is not None and name in ("mlflow", "prefect"):
        try:
            postgres.ensure_databases(local, [name])
        except postgres.DatabaseError as exc:
            raise StackError(str(exc)) from None
    svc.prepare()
    os.execve(svc.command[0], svc.command, svc.env)


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
            listening = conn.laddr and conn.status == psutil.CONN_LISTEN
            if listening and conn.laddr.port == port and conn.pid:
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


def _check_store_locked(settings: Settings) -> None:
    """The store we started must refuse every request without credentials: an S3
    request without keys, plain (non-TLS) gRPC on any of its ports, and the HTTP data
    endpoints of its master and filer. A configuration that leaves one open (an
    identities file with an anonymous identity, a security file SeaweedFS read
    differently) stops the start."""
    from mnistops.stack.store_security import grpc_open_without_tls, http_data_paths_open

    s3 = settings.s3
    off = s3.grpc_offset
    grpc = [("127.0.0.1", p + off) for p in (s3.master_port, s3.volume_port, s3.filer_port)]
    grpc.append((settings.client_host, s3.port + off))
    opened = [
        f"gRPC port {port} answers without a client certificate"
        for host, port in grpc
        if grpc_open_without_tls(host, port)
    ]
    opened += http_data_paths_open("127.0.0.1", s3.master_port, s3.filer_port)
    if opened:
        raise StackError(
            "the object store answered requests without credentials:\n  "
            + "\n  ".join(opened)
            + f"\nIt was stopped. Its security settings are in {settings.home / 's3-security'};"
            " delete that folder to have them made again at the next `mnistops stack up`."
        )
    _check_anonymous_refused(settings)


def _check_anonymous_refused(settings: Settings) -> None:
    """The store must refuse an S3 request without keys: an identities file that opens
    it (or one SeaweedFS read differently) stops the start."""
    try:
        _anonymous_client(settings).list_buckets()
    except ClientError:
        return
    raise StackError(
        f"the object store at {settings.s3_endpoint} answered a request without keys:"
        f" its identities file ({settings.home / 's3-identities.json'}) leaves it open."
        " It was stopped; nothing was exposed for longer than this check."
    )


PUBLIC_GRANTEES = ("AllUsers", "AuthenticatedUsers")


def _close_buckets(settings: Settings, keys: S3Keys | None, report: Report) -> None:
    """Whoever holds the keys can open a bucket to anyone (a bucket policy, a public ACL).
    Every `up` closes every bucket of our store again, says so, and then checks that a
    request without keys reads and lists nothing; if one still does, the store stops."""
    client = s3_client(settings, keys)
    names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    for name in names:
        try:
            client.get_bucket_policy(Bucket=name)
            client.delete_bucket_policy(Bucket=name)
            report(f"removed the bucket policy of '{name}' (it may have opened it to anyone)")
        except ClientError:
            pass
        try:
            grants = client.get_bucket_acl(Bucket=name).get("Grants", [])
        except ClientError:
            grants = []
        if any(str(g.get("Grantee", {}).get("URI", "")).endswith(PUBLIC_GRANTEES) for g in grants):
            client.put_bucket_acl(Bucket=name, ACL="private")
            report(f"made bucket '{name}' private again (its ACL let anyone in)")
    anonymous = _anonymous_client(settings)
    opened = []
    for name in names:
        try:
            anonymous.list_objects_v2(Bucket=name, MaxKeys=1)
            opened.append(name)
        except ClientError:
            continue
    if opened:
        record = process.read_record(run_dir(settings), "s3")
        if record is not None:
            process.stop(record, run_dir(settings))
        raise StackError(
            f"bucket(s) {', '.join(opened)} of the object store answer requests without keys"
            " even after their policy and ACL were reset; the store was stopped"
        )


def _anonymous_client(settings: Settings):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name=settings.s3.region,
        config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}),
    )


def _ensure_buckets(settings: Settings, keys: S3Keys | None) -> None:
    client = s3_client(settings, keys)
    for bucket in settings.s3.buckets.model_dump().values():
        try:
            client.head_bucket(Bucket=bucket)
            continue
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise StackError(f"S3 bucket '{bucket}' at {settings.s3_endpoint}: {exc}") from None
        try:
            client.create_bucket(Bucket=bucket)
            client.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StackError(
                f"cannot create S3 bucket '{bucket}' at {settings.s3_endpoint}: {exc}"
            ) from None


def _wait_objects_readable(
    settings: Settings, keys: S3Keys | None, report: Report, timeout_s: float = 60.0
) -> None:
    """After a restart SeaweedFS answers health checks before it has loaded the volumes
    that hold existing objects (reads fail with InternalError for a few seconds). Wait
    until its volume server has loaded every volume on disk and one stored object of
    every bucket reads back, so `up` means usable."""
    deadline = time.monotonic() + timeout_s
    _wait_volumes_loaded(settings, deadline, report)
    client = s3_client(settings, keys)
    pending: list[str] | None = None
    while pending is None or pending:
        try:
            if pending is None:
                pending = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
                continue
            bucket = pending[0]
            listing = client.list_objects_v2(Bucket=bucket, MaxKeys=1)
            for item in listing.get("Contents", []):
                client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            pending.pop(0)
        except (ClientError, BotoCoreError) as exc:
            if time.monotonic() > deadline:
                raise StackError(
                    f"the object store at {settings.s3_endpoint} is up but cannot read its"
                    f" objects after {timeout_s:.0f} s: {exc}"
                ) from None
            report("waiting for the object store to load its buckets")
            time.sleep(0.5)


def _wait_volumes_loaded(settings: Settings, deadline: float, report: Report) -> None:
    """Until the volume server lists as many volumes as there are on disk."""
    import httpx

    on_disk = len(list((settings.home / "s3").glob("*.dat")))
    url = f"http://127.0.0.1:{settings.s3.volume_port}/status"
    while time.monotonic() < deadline:
        try:
            loaded = len(httpx.get(url, timeout=3).json().get("Volumes") or [])
        except (httpx.HTTPError, ValueError):
            loaded = -1
        if loaded >= on_disk:
            return
        report(f"waiting for the object store to load its volumes ({max(loaded, 0)}/{on_disk})")
        time.sleep(0.5)


def down(settings: Settings, report: Report = lambda _: None) -> list[str]:
    """Stop every service this state dir started, with all their child processes."""
    stopped = []
    with _stack_lock(settings):
        for record in worker_records(settings):
            if process.is_alive(record):
                report(f"stopping {record.name} (pid {record.pid})")
                stopped.append(record.name)
                _mark_for_restart(settings, record.name, True)
            process.stop(record, run_dir(settings))
        for name in reversed(SERVICE_NAMES):
            record = process.read_record(run_dir(settings), name)
            if record is None:
                continue
            if process.is_alive(record):
                report(f"stopping {name} (pid {record.pid})")
                stopped.append(name)
            process.stop(record, run_dir(settings))
            if name == "s3":
                _remove_store_sockets(settings)
    return stopped


def _remove_store_sockets(settings: Settings) -> None:
    """SeaweedFS leaves its Unix sockets in /tmp (seaweedfs-<component>[-grpc]-<port>.sock)."""
    s3 = settings.s3
    ports = [s3.port, s3.master_port, s3.volume_port, s3.filer_port]
    ports += [p + s3.grpc_offset for p in ports]
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            path.unlink(missing_ok=True)


def status(settings: Settings) -> list[ServiceStatus]:
    keys = _stack_keys(settings, create=False)
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
                reach="external" if svc.external else reach(settings, svc.name),
            )
        )
    for record in worker_records(settings):
        alive = process.is_alive(record)
        result.append(
            ServiceStatus(
                name=record.name,
                title=f"Prefect worker ({record.name.removeprefix(WORKER_PREFIX)})",
                url=record.url,
                external=False,
                running=alive,
                pid=record.pid if alive else None,
                healthy=alive,
                log=record.log_path,
                reach="connects out only",
            )
        )
    return result


WORKER_PREFIX = "worker-"


def worker_records(settings: Settings) -> list[process.ProcessRecord]:
    """The records of the workers started with `mnistops worker --detach`."""
    folder = run_dir(settings)
    names = sorted(p.stem for p in folder.glob(f"{WORKER_PREFIX}*.json")) if folder.is_dir() else []
    return [r for r in (process.read_record(folder, n) for n in names) if r is not None]


def _spec_path(settings: Settings, name: str) -> Path:
    """How a detached worker was started (its command, and the variables mnistops set),
    so that `up` can start again the workers `down` stopped."""
    return run_dir(settings) / "workers" / f"{name}.json"


def _mark_for_restart(settings: Settings, name: str, restart: bool) -> None:
    path = _spec_path(settings, name)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    write_private(path, json.dumps({**spec, "restart": restart}))


def _restart_workers(settings: Settings, report: Report) -> None:
    folder = run_dir(settings) / "workers"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not spec.get("restart"):
            continue
        record = process.read_record(run_dir(settings), path.stem)
        if record is None or not process.is_alive(record):
            report(f"starting {path.stem} again (`stack down` stopped it)")
            env = {**os.environ, **spec["env"]}
            process.start(
                path.stem, spec["cmd"], env, run_dir(settings), log_dir(settings), spec["url"]
            )
        _mark_for_restart(settings, path.stem, False)


def start_worker(
    settings: Settings, pool: str, cmd: list[str], env: dict[str, str]
) -> process.ProcessRecord:
    """Start a worker for `pool` as a background service of the stack (one per pool)."""
    name = f"{WORKER_PREFIX}{pool}"
    with _stack_lock(settings):
        record = process.read_record(run_dir(settings), name)
        if record is not None and process.is_alive(record):
            raise StackError(f"a worker for pool '{pool}' is already running (pid {record.pid})")
        own = {k: v for k, v in env.items() if os.environ.get(k) != v}
        spec = {"cmd": cmd, "env": own, "url": f"pool {pool}", "restart": False}
        write_private(_spec_path(settings, name), json.dumps(spec))
        record = process.start(name, cmd, env, run_dir(settings), log_dir(settings), f"pool {pool}")
    time.sleep(2)
    if process.exited(record):
        process.record_path(run_dir(settings), name).unlink(missing_ok=True)
        log = process.tail(record.log_path)
        raise StackError(f"the worker for pool '{pool}' exited at start; its log:\n{log}")
    return record
