"""Drift: after how many answers monitoring flags each shift, and how often it cries wolf.

On a stack of its own: v1.0 published, a champion trained on it (2 epochs), and a
running `mnistops serve` that logs every answer (batches of 250 records or 1 s). Then,
from the shipped MNIST test images, deterministic streams (`loop.streams`): unshifted,
rotated 20-40 degrees, thick strokes, inverted, off-centre. Each is sent through the
service 250 images at a time, and after every 250 answers the monitoring
(`loop.monitoring.monitor`, what the flow `MNIST monitoring` runs) judges that window.
Printed: for each shifted stream the answers after which it was first flagged (of
1,000 sent) and its largest reason; for the unshifted stream, the baseline of this same
run, the false alarms over 10,000 answers. Goal: every shift flagged within 1,000
answers, no false alarm on the unshifted stream.
Usage: .venv/bin/python bench/drift.py [--fast]
  --fast: 1,000 unshifted answers and 500 of each shift, a champion of 1 epoch on a
          small share (a smoke test of the script: its figures mean little).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from scratch import scratch_settings
from serve import BIN, cli, start

from mnistops import stack
from mnistops.clients import client_env
from mnistops.data import mnist
from mnistops.loop import monitoring, streams
from mnistops.loop.store import read_batches
from mnistops.settings import Settings, load_settings
from mnistops.stack.ports import free_port_pair

WINDOW = 250


def send(url: str, images: object) -> str:
    answer = httpx.post(f"{url}/predict", json=images, timeout=60)
    answer.raise_for_status()
    return str(answer.json()["request_id"])


def wait_logged(settings: Settings, request_id: str, since: datetime) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        batches = read_batches(settings, "predictions/", since)
        if any(request_id in t["request_id"].to_pylist() for t in batches.tables):
            return
        time.sleep(0.2)
    raise SystemExit(f"request {request_id} was not logged within 60 s")


def run_stream(settings: Settings, url: str, kind: str, n: int) -> dict[str, object]:
    """Send `n` images of the stream, judging every WINDOW; what was flagged when."""
    images = streams.stream(mnist.load(mnist.packaged_dir()).test_images, kind, n)
    lag = timedelta(seconds=settings.serve.log.batch_s + monitoring.WRITE_LAG_S)
    flagged: list[int] = []
    first_reason = ""
    seconds: list[float] = []
    for start_at in range(0, n, WINDOW):
        began = datetime.now(UTC)
        rid = send(url, images[start_at : start_at + WINDOW].tolist())
        wait_logged(settings, rid, began)
        clock = time.perf_counter()
        judged = monitoring.monitor(settings, now=datetime.now(UTC) + lag, since=began)
        seconds.append(time.perf_counter() - clock)
        if judged.judgement.predictions != min(WINDOW, n - start_at):
            raise SystemExit(f"{kind}: judged {judged.judgement.predictions} answers")
        if judged.judgement.drift:
            flagged.append(start_at + WINDOW)
            first_reason = first_reason or judged.judgement.reasons[0]
    return {
        "kind": kind,
        "sent": n,
        "windows": len(seconds),
        "flagged": flagged,
        "reason": first_reason,
        "seconds": sum(seconds) / len(seconds),
    }


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(results: list[dict[str, object]]) -> None:
    print(f"\n{cpu_name()}, {os.cpu_count()} cores; windows of {WINDOW} answers")
    print(f"{'stream':<11} {'sent':>6} {'windows':>8} {'flagged':>8} {'first flag after':>17}")
    for row in results:
        flagged = row["flagged"]
        assert isinstance(flagged, list)
        first = f"{flagged[0]} answers" if flagged else "never"
        print(
            f"{row['kind']!s:<11} {row['sent']!s:>6} {row['windows']!s:>8}"
            f" {len(flagged):>8} {first:>17}"
        )
    for row in results:
        if row["reason"]:
            print(f"  {row['kind']}: {row['reason']}")
    clean = next(r for r in results if r["kind"] == "unshifted")
    alarms = clean["flagged"]
    assert isinstance(alarms, list)
    print(f"false alarms on the unshifted stream: {len(alarms)} in {clean['sent']} answers")
    late = [
        r["kind"]
        for r in results
        if r["kind"] != "unshifted" and (not r["flagged"] or r["flagged"][0] > 1000)  # type: ignore[index]
    ]
    print("every shift flagged within 1,000 answers: " + ("yes" if not late else f"no ({late})"))
    mean = sum(float(r["seconds"]) for r in results) / len(results)  # type: ignore[arg-type]
    print(f"one monitoring run (read the window, judge, report, MLflow run): {mean:.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true")
    options = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its "View run" line per run
    clean_n, shifted_n = (1000, 500) if options.fast else (10_000, 1000)
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        root = Path(tmp)
        settings = scratch_settings(root)
        config = root / "config"
        print("starting a stack, publishing v1.0, training a champion ...", flush=True)
        stack.up(settings)
        server = None
        try:
            ingest = ("data", "ingest", "--fast") if options.fast else ("data", "ingest")
            training = ("train", "--fast") if options.fast else ("train", "--epochs", "2")
            for args in (ingest, ("data", "version", "v1.0", "-m", "v1"), training):
                cli(config, *args, cwd=root)
            port = free_port_pair()
            env = {
                **os.environ,
                **client_env(settings),
                "MNISTOPS_SERVE__LOG__BATCH_S": "1",
                "MNISTOPS_SERVE__LOG__BATCH_RECORDS": str(WINDOW),
            }
            url = f"http://127.0.0.1:{port}"
            command = [str(BIN / "mnistops"), "--config-dir", str(config), "serve"]
            server, _ = start([*command, "--port", str(port)], env, f"{url}/health", root / "s.log")
            os.environ["MNISTOPS_SERVE__LOG__BATCH_S"] = "1"
            settings = load_settings(config)
            results = []
            for kind in streams.KINDS:
                n = clean_n if kind == "unshifted" else shifted_n
                print(f"sending {n} {kind} digits ...", flush=True)
                results.append(run_stream(settings, url, kind, n))
        finally:
            if server is not None and server.poll() is None:
                server.terminate()
                server.wait(30)
            stack.down(settings)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
