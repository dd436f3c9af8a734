"""Serving the champion: `mnistops serve` against `mlflow models serve`, side by side in
one run, on the same champion of one embedded stack.

  baseline: mlflow models serve -m models:/NAME@champion --env-manager local
            (a JSON tensor of one 1x1x28x28 image per request, what it accepts)
  ours:     mnistops serve (one PNG per request, converted the MNIST way as it would
            be from any client)
The load generator is Debian's `wrk` (a separate, compiled process), single-image POST
requests for 10 s a round at concurrency 1, 8 and 32: requests/s and p50/p99 latency. Also the
time from starting each server to its first ready answer, and its idle memory. Goals:
at least 10x MLflow's requests/s at concurrency 32, p99 under 10 ms at concurrency 8,
ready within 3 s, under 200 MB idle.
  no-log:   mnistops serve with its prediction log off (serve.log.enabled false),
            running beside it; the two are loaded in alternating rounds (--rounds, 3)
            and each row is the median round: the cost of logging every answer (goal:
            under 5 % of the requests/s at concurrency 32, which gets at least 9
            rounds); the log's own CPU (its thread and writer process, from /metrics)
            per 1,000 answers beside the service's.
The three servers run side by side, loaded in rotating rounds (each row is the median
round, the goal's concurrency gets at least 9): the cores' speed drifts by a tenth
and more within minutes, so the ratio to MLflow is also given round by round.
Usage: .venv/bin/python bench/serve.py [--seconds 10] [--rounds 3] [--fast]
  --fast: 3-second runs (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from scratch import scratch_settings

from mnistops import stack
from mnistops.clients import client_env
from mnistops.stack.ports import free_port_pair

BIN = Path(sys.executable).parent
CONCURRENCY = (1, 8, 32)
GOAL_CONCURRENCY = 32
GOAL_ROUNDS = 9
POST_SCRIPT = """
local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "{kind}"
"""


def cli(config: Path, *args: str, cwd: Path) -> None:
    done = subprocess.run(
        [str(BIN / "mnistops"), "--config-dir", str(config), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"mnistops {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def start(command: list[str], env: dict[str, str], ready_url: str, log: Path) -> tuple:
    """Start a server; (process, seconds until `ready_url` answered 200)."""
    began = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while time.perf_counter() - began < 300:
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc, time.perf_counter() - began
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{command[0]} exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{' '.join(command)} not ready in 300 s:\n{log.read_text()[-3000:]}")


def wrk(url: str, script: Path, connections: int, seconds: int) -> dict[str, float]:
    """requests/s, p50 and p99 (ms) and the count of failed requests, from wrk."""
    done = subprocess.run(
        [
            "wrk",
            f"-t{min(connections, 2)}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    text = done.stdout

    def ms(label: str) -> float:
        found = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not found:
            return float("nan")
        value, unit = float(found.group(1)), found.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    failed = int(errors.group(1)) if errors else 0
    failed += sum(int(n) for n in socket.groups()) if socket else 0
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50": ms("50%"),
        "p99": ms("99%"),
        "failed": failed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fast", action="store_true")
    options = parser.parse_args()
    seconds = 3 if options.fast else options.seconds
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        settings = scratch_settings(root)
        config = root / "config"
        print("starting a stack, publishing v1.0 (--fast), training a champion ...", flush=True)
        stack.up(settings)
        servers: list[subprocess.Popen] = []
        try:
            for args in (
                ("data", "ingest", "--fast"),
                ("data", "version", "v1.0", "-m", "v1"),
                ("train", "--fast"),
            ):
                cli(config, *args, cwd=root)
            image_path = sorted((settings.mnist_dir / "test" / "7").glob("*.png"))[0]
            pixels = np.asarray(Image.open(image_path), dtype=np.float32) / 255.0
            tensor = root / "tensor.json"
            tensor.write_text(json.dumps({"inputs": pixels[None, None].tolist()}))
            scripts = {
                "mlflow": (root / "mlflow.lua", tensor, "application/json"),
                "mnistops": (root / "ours.lua", image_path, "image/png"),
            }
            scripts["no-log"] = scripts["mnistops"]
            for script, body, kind in scripts.values():
                script.write_text(POST_SCRIPT.format(body=body, kind=kind))
            # `mlflow models serve` runs `uvicorn` from PATH: this venv's.
            env = {**os.environ, **client_env(settings), "PATH": f"{BIN}:{os.environ['PATH']}"}
            name = settings.model_registry.name
            ports = {server: free_port_pair() for server in ("mlflow", "mnistops", "no-log")}
            commands = {
                "mlflow": [
                    str(BIN / "mlflow"),
                    "models",
                    "serve",
                    "-m",
                    f"models:/{name}@champion",
                    "--env-manager",
                    "local",
                    "--host",
                    "127.0.0.1",
                    "-p",
                    str(ports["mlflow"]),
                ],
                "mnistops": [
                    str(BIN / "mnistops"),
                    "--config-dir",
                    str(config),
                    "serve",
                    "--port",
                    str(ports["mnistops"]),
                ],
            }
            commands["no-log"] = [*commands["mnistops"][:-1], str(ports["no-log"])]
            envs = {
                "mlflow": env,
                "mnistops": env,
                "no-log": {**env, "MNISTOPS_SERVE__LOG__ENABLED": "false"},
            }
            ready = {"mlflow": "/ping", "mnistops": "/health", "no-log": "/health"}
            predict = {"mlflow": "/invocations", "mnistops": "/predict", "no-log": "/predict"}
            figures: dict[str, dict] = {}
            bases = {server: f"http://127.0.0.1:{ports[server]}" for server in ports}
            # the three servers run side by side and are loaded in rotating rounds
            # (A B C, B C A, ...): the speed of the shared cores drifts by a tenth and
            # more within minutes, alike for all three, so ratios are taken round by round
            names = ("mlflow", "mnistops", "no-log")
            for server in names:
                proc, startup = start(
                    commands[server],
                    envs[server],
                    bases[server] + ready[server],
                    root / f"{server}.log",
                )
                servers.append(proc)
                figures[server] = {"startup": startup, "rss": idle_rss(proc.pid)}
                wrk(bases[server] + predict[server], scripts[server][0], 8, 2)  # warm-up
            pids = {server: proc.pid for server, proc in zip(names, servers, strict=True)}
            store = store_pid(settings)
            for connections in CONCURRENCY:
                rounds: dict[str, list[dict[str, float]]] = {server: [] for server in names}
                for turn in range(rounds_at(connections, options.rounds)):
                    for server in names[turn % 3 :] + names[: turn % 3]:
                        url = bases[server] + predict[server]
                        before = cpu_seconds(pids[server]), cpu_seconds(store)
                        log_before = log_cpu(bases[server]) if server != "mlflow" else 0.0
                        row = wrk(url, scripts[server][0], connections, seconds)
                        answers = max(row["rps"] * seconds, 1.0) / 1000
                        row["service_cpu"] = (cpu_seconds(pids[server]) - before[0]) / answers
                        row["store_cpu"] = (cpu_seconds(store) - before[1]) / answers
                        if server != "mlflow":
                            row["log_cpu"] = (log_cpu(bases[server]) - log_before) / answers
                        rounds[server].append(row)
                for server, rows in rounds.items():
                    figures[server][connections] = median_row(rows)
                    figures[server].setdefault("rounds", {})[connections] = [
                        row["rps"] for row in rows
                    ]
        finally:
            for proc in servers:
                if proc.poll() is None:
                    proc.kill()
            stack.down(settings)
    report(figures, seconds)
    return 0


def rounds_at(connections: int, rounds: int) -> int:
    """The goal's concurrency gets more rounds: a round's difference between the two
    services moves by about 10 % with the load of the shared cores."""
    return max(rounds, GOAL_ROUNDS) if connections == GOAL_CONCURRENCY else rounds


def store_pid(settings: object) -> int | None:
    """The embedded object store's process (its CPU is what the log costs beside ours)."""
    from mnistops.stack import process, run_dir

    record = process.read_record(run_dir(settings), "s3")  # type: ignore[arg-type]
    return record.pid if record is not None else None


def idle_rss(pid: int) -> tuple[float, float]:
    """(MB resident in the server's own process, MB in its child processes), once ready
    and before any load: for mnistops serve the children are the prediction log's writer
    process; for mlflow models serve, its uvicorn worker."""
    import psutil

    time.sleep(1)
    top = psutil.Process(pid)
    children = top.children(recursive=True)
    return top.memory_info().rss / 2**20, sum(c.memory_info().rss for c in children) / 2**20


def cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user and system) a process and its children used so far."""
    import psutil

    if pid is None:
        return 0.0
    try:
        top = psutil.Process(pid)
        found = [top, *top.children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in found)
    except psutil.Error:
        return 0.0


def log_cpu(base: str) -> float:
    """CPU seconds the service's prediction log used so far (its thread and its writer
    process, from /metrics); 0 with the log off."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mnistops_prediction_log_cpu_seconds_total{")
    )


def median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """The round of median requests/s (its latencies with it)."""
    return sorted(rows, key=lambda row: row["rps"])[len(rows) // 2]


def report(figures: dict[str, dict], seconds: int) -> None:
    print(f"\nsingle-image POST, wrk, {seconds} s per row, {os.cpu_count()} cores")
    print(f"{'server':<10} {'conc.':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    for server, rows in figures.items():
        for connections in CONCURRENCY:
            row = rows[connections]
            print(
                f"{server:<10} {connections:>5} {row['rps']:>9.0f} {row['p50']:>8.2f}"
                f" {row['p99']:>8.2f} {row['failed']:>7}"
            )
    for connections in CONCURRENCY:
        ratio = figures["mnistops"][connections]["rps"] / max(
            figures["mlflow"][connections]["rps"], 1e-9
        )
        ours, theirs = (figures[s]["rounds"][connections] for s in ("mnistops", "mlflow"))
        each = [a / max(b, 1e-9) for a, b in zip(ours, theirs, strict=True)]
        print(
            f"throughput mnistops / mlflow at concurrency {connections}: {ratio:.1f}x"
            f" (medians; median of the rounds' ratios {float(np.median(each)):.1f}x;"
            f" round by round {', '.join(f'{r:.1f}' for r in each)})"
        )
    for connections in CONCURRENCY:
        off = figures["no-log"][connections]["rps"]
        cost = 100 * (off - figures["mnistops"][connections]["rps"]) / max(off, 1e-9)
        on_rounds = figures["mnistops"]["rounds"][connections]
        off_rounds = figures["no-log"]["rounds"][connections]
        differences = [
            100 * (b - a) / max(b, 1e-9) for a, b in zip(on_rounds, off_rounds, strict=True)
        ]
        paired = float(np.median(differences))
        each = ", ".join(f"{d:+.1f}" for d in differences)
        print(
            f"cost of the prediction log at concurrency {connections}: {cost:+.1f} %"
            f" (medians; median of the rounds' differences {paired:+.1f} %;"
            f" round by round {each} %)"
        )
    for connections in CONCURRENCY:
        for server in ("mnistops", "no-log"):
            row = figures[server][connections]
            print(
                f"CPU s per 1,000 answers at concurrency {connections}, {server}: service"
                f" {row['service_cpu']:.3f} (of which the log's thread and writer process"
                f" {row['log_cpu']:.3f}), object store {row['store_cpu']:.3f}"
            )
    for server in figures:
        own, children = figures[server]["rss"]
        print(
            f"start to ready, {server}: {figures[server]['startup']:.1f} s; idle memory"
            f" (RSS): {own:.0f} MB, and {children:.0f} MB in its child processes"
        )


if __name__ == "__main__":
    sys.exit(main())
