"""The MLflow server with its login on: what one logged-in request costs the server.

MLflow's basic-auth app checks the password's scrypt hash at every request unless it
keeps checked logins for a while (`auth_cache_ttl_seconds`, our `mlflow.auth_cache_s`).
In one run: a stack with `auth_cache_s: 0` (MLflow's default, the baseline) and one
with our default, each sent the same logged-in requests (one client, one after the
other); the server's CPU time is read from its processes.
Usage: .venv/bin/python bench/mlflow_login.py [REQUESTS]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml
from drift import cpu_name
from scratch import scratch_settings

from mnistops import stack
from mnistops.credentials import mlflow_auth_path
from mnistops.settings import Settings, load_settings


def with_login(root: Path, cache_s: int) -> Settings:
    """A scratch stack whose MLflow server asks for a login, trusted for `cache_s`."""
    config = scratch_settings(root).config_dir / "stack.yml"
    values = yaml.safe_load(config.read_text())
    values["mlflow"] = {**values["mlflow"], "auth": True, "auth_cache_s": cache_s}
    config.write_text(yaml.safe_dump(values))
    return load_settings(config.parent)


def server_cpu(settings: Settings) -> float:
    """CPU seconds so far of the MLflow server's processes (its CLI and its web worker)."""
    port = str(settings.mlflow.port)
    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        line = proc.info["cmdline"] or []
        if "mlflow" in " ".join(line) and port in line:
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def measure(cache_s: int, requests: int) -> tuple[float, float]:
    """(seconds of wall time, seconds of server CPU) for `requests` logged-in requests."""
    with tempfile.TemporaryDirectory(prefix="bench-login-") as tmp:
        settings = with_login(Path(tmp), cache_s)
        stack.up(settings)
        try:
            password = json.loads(mlflow_auth_path(settings.home).read_text())["password"]
            url = f"{settings.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
            before = server_cpu(settings)
            began = time.perf_counter()
            with httpx.Client(auth=("admin", password), timeout=60) as client:
                for _ in range(requests):
                    client.get(url).raise_for_status()
            return time.perf_counter() - began, server_cpu(settings) - before
        finally:
            stack.down(settings)


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {requests} logged-in requests")
    for label, cache_s in (("auth_cache_s: 0 (MLflow's default)", 0), ("auth_cache_s: 60", 60)):
        wall, cpu = measure(cache_s, requests)
        print(
            f"{label:<36} {wall:6.2f} s wall, server CPU {cpu:6.2f} s"
            f" ({1000 * cpu / requests:.1f} ms a request)"
        )


if __name__ == "__main__":
    main()
