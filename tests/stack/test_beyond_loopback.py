"""A stack bound to an address other hosts reach: only the S3 API, MLflow and Prefect
listen there, each asking for its credential; the store's other ports stay on loopback.

The stack runs on host A, a Linux network namespace of its own with an address from
198.18.0.0/15 (a range no real network uses); this test process is the other host, on
the far end of a veth pair. Traffic goes only between the two.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
import yaml
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from mnistops.settings import load_settings
from mnistops.stack.ports import free_port_config

pytestmark = [pytest.mark.integration, pytest.mark.security]


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def host_a() -> Iterator[dict[str, str]]:
    """A network namespace joined to this one by a veth pair: A is 198.18.N.1, we are .2."""
    n = secrets.randbelow(250) + 1
    name, ours, theirs = f"mnops-a{n}", f"mnA{n}", f"mnB{n}"
    made = ip("netns", "add", name)
    if made.returncode != 0:
        reason = f"network namespaces are not permitted here: {made.stderr.strip()}"
        if os.environ.get("MNISTOPS_REQUIRE_NETNS"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        steps = [
            ("link", "add", ours, "type", "veth", "peer", "name", theirs),
            ("link", "set", theirs, "netns", name),
            ("addr", "add", f"198.18.{n}.2/24", "dev", ours),
            ("link", "set", ours, "up"),
            ("-n", name, "addr", "add", f"198.18.{n}.1/24", "dev", theirs),
            ("-n", name, "link", "set", theirs, "up"),
            ("-n", name, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = ip(*step)
            assert done.returncode == 0, (step, done.stderr)
        yield {"netns": name, "address": f"198.18.{n}.1"}
    finally:
        ip("link", "del", ours)
        ip("netns", "del", name)


def on_host(netns: str, config_dir: Path, *args: str, env: dict | None = None):
    command = ["ip", "netns", "exec", netns, sys.executable, "-m", "mnistops"]
    return subprocess.run(
        [*command, "--config-dir", str(config_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def connects(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(3)
        return sock.connect_ex((address, port)) == 0


def test_only_authenticated_services_listen_beyond_loopback(
    host_a: dict[str, str], tmp_path: Path
) -> None:
    address, netns = host_a["address"], host_a["netns"]
    config = {**free_port_config(tmp_path), "bind": address}
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "stack.yml").write_text(yaml.safe_dump(config))
    settings = load_settings(config_dir)
    up = on_host(netns, config_dir, "stack", "up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "warning" not in up.stderr
        s3 = settings.s3
        assert connects(address, s3.port)
        internal = [s3.master_port, s3.volume_port, s3.filer_port]
        internal += [p + s3.grpc_offset for p in internal]
        assert [p for p in internal if connects(address, p)] == []

        anonymous = boto3.client(
            "s3",
            endpoint_url=f"http://{address}:{s3.port}",
            region_name="us-east-1",
            config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}),
        )
        with pytest.raises(ClientError):
            anonymous.list_objects_v2(Bucket="dvc")
        mlflow = f"http://{address}:{settings.mlflow.port}"
        search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(search, timeout=10).status_code == 401
        prefect = f"http://{address}:{settings.prefect.port}/api"
        assert httpx.get(f"{prefect}/admin/version", timeout=10).status_code == 401

        status = on_host(netns, config_dir, "stack", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        text = " ".join(status.stdout.split())
        assert "any host (S3 keys)" in text and text.count("any host (login)") == 2, text

        logins_off = {"MNISTOPS_MLFLOW__AUTH": "false", "MNISTOPS_PREFECT__AUTH": "false"}
        warned = on_host(netns, config_dir, "stack", "up", env=logins_off)
        warnings = " ".join(warned.stderr.split())
        for service in ("MLflow", "Prefect"):
            assert f"warning: {service} on {address}" in warnings, warnings
        assert "has no login" in warnings and "any host that can reach" in warnings
    finally:
        on_host(netns, config_dir, "stack", "down")
