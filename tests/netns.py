"""Separate hosts on one machine: Linux network namespaces on a bridge, addresses from
198.18.0.0/15 (the benchmarking range, which no real network uses).

The bridge has no address in this (the root) namespace, so traffic flows only between
the namespaces made here. Each host runs commands with `ip netns exec`, in a folder of
its own with its own HOME: what a host knows is what its environment says.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PREFIX = "mno"


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def must(*args: str) -> None:
    done = ip(*args)
    assert done.returncode == 0, (args, done.stderr)


def require_namespaces() -> None:
    """Skip (or, where MNISTOPS_REQUIRE_NETNS is set, as in CI, fail) when this process
    may not make network namespaces."""
    probe = f"{PREFIX}probe{os.getpid()}"
    made = ip("netns", "add", probe)
    if made.returncode == 0:
        ip("netns", "del", probe)
        return
    reason = f"network namespaces are not permitted here: {made.stderr.strip()}"
    if os.environ.get("MNISTOPS_REQUIRE_NETNS"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Host:
    name: str
    netns: str
    address: str
    link: str
    """this namespace's end of its cable is eth0; `link` is the bridge's end"""
    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def base_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(self.root / "home"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env={**self.base_env(), **self.env, **(env or {})},
        )

    def mnistops(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """`mnistops ARGS` on this host, from its folder."""
        return self.run(sys.executable, "-m", "mnistops", *args, **kw)

    def ok(self, *args: str, **kw: Any) -> str:
        """`mnistops ARGS`, which must succeed; its output."""
        done = self.mnistops(*args, **kw)
        assert done.returncode == 0, f"{self.name}: mnistops {shlex.join(args)}:\n" + (
            done.stdout + done.stderr + self.log_tails()
        )
        return done.stdout

    def log_tails(self, lines: int = 30) -> str:
        """The end of every log in this host's state dir, for a failure's message."""
        tails = []
        for log in sorted((self.root / ".mnistops" / "logs").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"\n--- {log.name}\n" + "\n".join(text))
        return "".join(tails)

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """`mnistops ARGS` in the background, in a process group of its own."""
        return subprocess.Popen(
            self.argv(sys.executable, "-m", "mnistops", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.root,
            env={**self.base_env(), **self.env, **(env or {})},
            start_new_session=True,
        )

    def python(self, code: str, *args: str, timeout: float = 120) -> str:
        """Python code run on this host with its environment; its output, stripped."""
        done = self.run(sys.executable, "-c", code, *args, timeout=timeout)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip()

    def connects(self, address: str, port: int) -> bool:
        """Whether a TCP connection from this host to address:port is accepted."""
        code = (
            "import socket, sys\n"
            "s = socket.socket(); s.settimeout(3)\n"
            "print(s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0)"
        )
        return self.python(code, address, str(port)) == "True"

    def listening(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP socket listening in this host."""
        done = self.run("ss", "-ltnH")
        assert done.returncode == 0, done.stderr
        found = []
        for line in done.stdout.splitlines():
            local = line.split()[3]
            address, _, port = local.rpartition(":")
            found.append((address.strip("[]"), int(port)))
        return found

    def cut(self) -> None:
        """Pull this host's cable: its link goes down."""
        must("link", "set", self.link, "down")

    def reconnect(self) -> None:
        must("link", "set", self.link, "up")

    def kill_everything(self) -> None:
        """End every process of this host (what a machine's power switch does)."""
        done = ip("netns", "pids", self.netns)
        for pid in done.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


class Network:
    """A bridge and the hosts on it, all removed by `close()`."""

    def __init__(self, base: Path) -> None:
        taken = ip("netns", "list").stdout
        self.n = next(
            n
            for n in (secrets.randbelow(250) + 1 for _ in range(100))
            if f"{PREFIX}{n}-" not in taken
        )
        self.bridge = f"{PREFIX}br{self.n}"
        self.base = base
        self.hosts: list[Host] = []
        self.cleanups: list[Callable[[], None]] = []
        must("link", "add", self.bridge, "type", "bridge")
        must("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        number = len(self.hosts) + 1
        netns, link = f"{PREFIX}{self.n}-{name}", f"{PREFIX}{self.n}{name}"
        address = f"198.18.{self.n}.{number}"
        must("netns", "add", netns)
        host = Host(name, netns, address, link, self.base / f"host-{name}")
        self.hosts.append(host)
        (host.root / "home").mkdir(parents=True)
        must("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        must("link", "set", link, "master", self.bridge, "up")
        must("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        must("-n", netns, "link", "set", "eth0", "up")
        must("-n", netns, "link", "set", "lo", "up")
        return host

    def name_hosts(self, host: Host, names: dict[str, str]) -> None:
        """Names that `host` resolves (its /etc/hosts, as `ip netns exec` mounts it)."""
        folder = Path("/etc/netns") / host.netns
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{address} {name}" for name, address in names.items())]
        (folder / "hosts").write_text("\n".join(lines) + "\n")
        self.cleanups.append(lambda: shutil.rmtree(folder, ignore_errors=True))

    def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            cleanup()
        for host in self.hosts:
            host.kill_everything()
        time.sleep(0.5)
        for host in self.hosts:
            ip("netns", "del", host.netns)
            ip("link", "del", host.link)
        ip("link", "del", self.bridge)


@dataclass
class Postgres:
    url: str
    process: subprocess.Popen[bytes]
    folder: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts)
    return found[-1].parent if found else None


def start_postgres(host: Host) -> Postgres:
    """A PostgreSQL server of its own on `host`, listening on the host's address, with a
    generated password: the database machine of the production layout."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        reason = "PostgreSQL's server programs are not installed (see .ci/run)"
        if os.environ.get("MNISTOPS_REQUIRE_NETNS"):
            pytest.fail(reason)
        pytest.skip(reason)
    # The server runs as the postgres user, which cannot enter pytest's private tmp dirs.
    folder = Path(tempfile.mkdtemp(prefix="mnistops-pg-"))
    password = secrets.token_urlsafe(18)
    (folder / "pw").write_text(password)
    shutil.chown(folder, "postgres", "postgres")
    shutil.chown(folder / "pw", "postgres", "postgres")
    data = folder / "data"
    as_postgres = ["runuser", "-u", "postgres", "--"]
    init = [
        *as_postgres,
        str(bin_dir / "initdb"),
        "-D",
        str(data),
        "-U",
        "mnistops",
        f"--pwfile={folder / 'pw'}",
        "-A",
        "scram-sha-256",
        "--no-sync",
    ]
    done = subprocess.run(init, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write("host all all 198.18.0.0/15 scram-sha-256\n")
    server = host.argv(
        *as_postgres,
        str(bin_dir / "postgres"),
        "-D",
        str(data),
        "-c",
        f"listen_addresses={host.address}",
        "-c",
        "port=5432",
        "-c",
        f"unix_socket_directories={folder}",
        "-c",
        "fsync=off",
    )
    process = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = [str(bin_dir / "pg_isready"), "-h", host.address, "-p", "5432"]
    deadline = time.monotonic() + 60
    while host.run(*ready).returncode != 0:
        assert process.poll() is None, "PostgreSQL stopped at its start"
        assert time.monotonic() < deadline, "PostgreSQL did not become ready in 60 s"
        time.sleep(0.5)
    url = f"postgresql://mnistops:{password}@{host.address}:5432"
    return Postgres(url, process, folder)


def parse_exports(text: str) -> dict[str, str]:
    """The variables of `export NAME=VALUE` lines (shell-quoted values)."""
    found = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export":
            name, _, value = words[1].partition("=")
            found[name] = value
    return found


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, every: float = 3) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(every)
