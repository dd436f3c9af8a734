"""Background processes with a pid record and a log file in the state dir.

Each service runs in its own session (process group), so that stopping it
also stops the workers and consumers it spawned.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from mnistops.credentials import PRIVATE_UMASK, write_private


@dataclass
class ProcessRecord:
    name: str
    pid: int
    create_time: float
    log: str
    url: str
    start_ticks: int | None = None
    """when the process started, in clock ticks since boot: unlike `create_time` (wall
    clock), it does not move when the system clock is set, so a record still finds its
    process after a clock change"""

    @property
    def log_path(self) -> Path:
        return Path(self.log)


STARTED_BY = "_MNISTOPS_STARTED_BY"
"""set to `NAME@RUN_DIR` in the environment of every process `start` starts, and so of
their children: how `stack down` finds a service whose record was lost or damaged
(not `MNISTOPS_`: the settings read those)"""


def started_by(name: str, run_dir: Path) -> str:
    """The mark (`STARTED_BY`) of service `name` of the state dir of `run_dir`; the path
    resolved, so that a symlinked or `..` spelling of the state dir is the same one."""
    return f"{name}@{run_dir.resolve()}"


def record_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.json"


RECORD_MAX_BYTES = 64 * 1024


def read_record(run_dir: Path, name: str) -> ProcessRecord | None:
    """The record of `name`; None when there is none. Anything else at its path (not a
    regular file, not a record, a pid that cannot be ours) is removed as garbage: a
    stale or crafted file must neither hang nor break the stack's commands."""
    path = record_path(run_dir, name)
    try:
        record = ProcessRecord(**json.loads(_read_regular(path)))
        if not _plausible(record) or _marked_for_another(record, run_dir):
            raise ValueError(record)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None
    return record


def _marked_for_another(record: ProcessRecord, run_dir: Path) -> bool:
    """The record names a live process that `start` started for another service or state
    dir: a record copied with its state dir (`cp -a`), or crafted. (A process without
    any mark was started before marks existed: its start time still has to match.)"""
    try:
        mark = psutil.Process(record.pid).environ().get(STARTED_BY)
    except psutil.Error:
        return False
    return mark is not None and mark != started_by(record.name, run_dir)


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes, without following a link or blocking on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        return os.read(fd, RECORD_MAX_BYTES)
    finally:
        os.close(fd)


def _plausible(record: ProcessRecord) -> bool:
    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    return (
        all(isinstance(v, str) for v in (record.name, record.log, record.url))
        and isinstance(record.pid, int)
        and not isinstance(record.pid, bool)
        and record.pid > 1
        and number(record.create_time)
        and (record.start_ticks is None or number(record.start_ticks))
    )


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _recorded(record: ProcessRecord) -> psutil.Process | None:
    """The process of a record, zombie or not; None if gone or its pid reused by another.

    It must lead its own session, as every process `start` starts does: a record that
    names another process of this user (its start time is public in /proc) finds none."""
    try:
        proc = psutil.Process(record.pid)
        if os.getsid(record.pid) != record.pid:
            return None
    except (psutil.Error, OSError):
        return None
    if record.start_ticks is not None:
        return proc if start_ticks(record.pid) == record.start_ticks else None
    try:  # a record written before start_ticks: the wall clock's start time
        return proc if abs(proc.create_time() - record.create_time) <= 1.0 else None
    except psutil.Error:
        return None


def _process(record: ProcessRecord) -> psutil.Process | None:
    """The live process of a record, or None (dead, or its pid reused by another)."""
    proc = _recorded(record)
    try:
        return proc if proc is not None and proc.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def is_alive(record: ProcessRecord) -> bool:
    return _process(record) is not None


def still_exiting(record: ProcessRecord) -> bool:
    """True while a killed process is being torn down: its main thread is a zombie, but
    other threads have not ended yet, and with them its open sockets and files (a
    listening port among them). On a busy machine this lasts seconds."""
    if _recorded(record) is None:
        return False
    return _some_thread_runs(record.pid)


def _some_thread_runs(pid: int) -> bool:
    """Some thread of the process has not ended (a process whose main thread is a
    zombie may still hold its sockets and files in the others)."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in threads:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[0] not in ("Z", "X"):
            return True
    return False


def process_tree(record: ProcessRecord) -> list[psutil.Process]:
    proc = _process(record)
    if proc is None:
        return []
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def start(
    name: str, cmd: list[str], env: dict[str, str], run_dir: Path, log_dir: Path, url: str
) -> ProcessRecord:
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with open(log_fd, "ab") as log, open(os.devnull, "rb") as devnull:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            cmd,
            stdin=devnull,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, STARTED_BY: started_by(name, run_dir)},
            start_new_session=True,
            close_fds=True,
            umask=PRIVATE_UMASK,
        )
    record = ProcessRecord(
        name=name,
        pid=popen.pid,
        create_time=psutil.Process(popen.pid).create_time(),
        log=str(log_path),
        url=url,
        start_ticks=start_ticks(popen.pid),
    )
    write_private(record_path(run_dir, name), json.dumps(asdict(record)))
    return record


def exited(record: ProcessRecord) -> bool:
    """True once the service's main process has ended (reaping it if it is our child)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(record.pid, os.WNOHANG)
    return not is_alive(record)


STOP_GRACE_S = 15.0
STORE_STOP_GRACE_S = 3.0
"""The object store (`weed server`) gets less: after SIGTERM its filer waits the full 15 s
of its gRPC graceful stop for the metadata subscriptions of the S3 gateway in the same
process, and stops the volume server only after that (about 10 s more), so a 15 s grace
ended in SIGKILL before any of the store's own shutdown anyway. What it stored survives
a killed process: the volume files and the filer's leveldb log are written before a PUT
returns, and both are read back at the next start."""


def stop(record: ProcessRecord, run_dir: Path, grace_s: float | None = None) -> None:
    """SIGTERM the whole group, wait, then SIGKILL whatever is left; no orphans."""
    stop_all([record], run_dir, grace_s)


def stop_all(records: list[ProcessRecord], run_dir: Path, grace_s: float | None = None) -> None:
    """Stop several services at once: every group gets SIGTERM together, each is waited
    for up to its own grace, then whatever is left gets SIGKILL; no orphans. One after
    the other, a stack's three took about 7 s; together, as long as the slowest."""
    trees = {record.name: process_tree(record) for record in records}
    for record in records:
        if trees[record.name]:
            _signal_group(record.pid, signal.SIGTERM)
            for proc in trees[record.name][1:]:
                _signal(proc, signal.SIGTERM)
    began = time.monotonic()

    def grace(record: ProcessRecord) -> float:
        if grace_s is not None:
            return grace_s
        return STORE_STOP_GRACE_S if record.name == "s3" else STOP_GRACE_S

    for record in sorted(records, key=grace):
        tree = trees[record.name]
        if tree:
            left = max(0.0, began + grace(record) - time.monotonic())
            alive = _wait_ended(tree, left)
            for proc in alive:
                _signal(proc, signal.SIGKILL)
            _signal_group(record.pid, signal.SIGKILL)
            _wait_ended(alive, 5)
            exited(record)
        record_path(run_dir, record.name).unlink(missing_ok=True)


def unrecorded(run_dir: Path) -> dict[str, list[psutil.Process]]:
    """The running processes of this user that `start` started for `run_dir` (children
    included), by service name, when their record no longer names them: a record
    damaged by hand or by a full disk is removed as garbage, and its service would
    otherwise run on with nothing to stop it. Call after the recorded ones stopped."""
    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    state_dir = str(run_dir.resolve())
    found: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter():
        try:
            if proc.pid in ours or proc.uids().real != os.getuid():
                continue
            name, _, where = proc.environ().get(STARTED_BY, "").partition("@")
        except psutil.Error:  # ended, a zombie, or not ours to read
            continue
        if name and where == state_dir:
            found.setdefault(name, []).append(proc)
    return found


def stop_processes(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM to each, SIGKILL to those left after `grace_s`."""
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    alive = _wait_ended(procs, grace_s)
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    _wait_ended(alive, 5)


def _wait_ended(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has ended, at most `timeout_s`; those still running.
    A process whose threads are all zombies has ended (its ports and files are closed):
    the services are not our children once `up` returned, and the machine's init
    reaped them up to 2 s later, which `psutil.wait_procs` waited for."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if p.is_running() and _some_thread_runs(p.pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(psutil.Error):
        proc.send_signal(sig)


def _listening(record: ProcessRecord) -> Iterator[tuple[str, int]]:
    """(address, port) of every TCP socket the service's process tree listens on."""
    for proc in process_tree(record):
        try:
            connections = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN:
                yield conn.laddr.ip, conn.laddr.port


def listening_ports(record: ProcessRecord) -> set[int]:
    """TCP ports on which the service's process tree listens."""
    return {port for _address, port in _listening(record)}


def listening_addresses(record: ProcessRecord) -> set[str]:
    """The addresses on which the service's process tree listens (0.0.0.0: all)."""
    return {address for address, _port in _listening(record)}


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
