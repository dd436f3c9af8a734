"""A `mnistops serve` of its own on the stack of `mnistops demo --fast`, for the loop's
tests: its port, small batches, and a copy of the demo's data folder."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import pyarrow as pa

from mnistops.loop import records
from mnistops.loop.store import read_batches
from mnistops.settings import Settings, load_settings
from tests.helpers import cli_command


class Service:
    """A `mnistops serve` in the foreground of a test, on the demo's stack."""

    def __init__(self, config_dir: Path, root: Path) -> None:
        self.config_dir = config_dir
        self.settings = load_settings(config_dir)
        self.url = self.settings.local_serve_url
        self.log = root / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                cli_command(("serve",), self.config_dir), stdout=out, stderr=out
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"no answer from {self.url}: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.rsplit(" ", 1)[0] == name:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in /metrics")


def digit_images(settings: Settings, n: int) -> list[Path]:
    folder = settings.mnist_dir / "test"
    return [sorted((folder / str(d % 10)).glob("*.png"))[d // 10] for d in range(n)]


def logged(settings: Settings, request_ids: set[str], timeout_s: float = 30) -> pa.Table:
    """The rows of these requests, once every one is in a written batch."""
    deadline = time.monotonic() + timeout_s
    while True:
        batches = read_batches(settings, records.PREDICTIONS_PREFIX)
        rows = pa.concat_tables(batches.tables) if batches.tables else None
        found = set(rows.column("request_id").to_pylist()) if rows is not None else set()
        if request_ids <= found or time.monotonic() > deadline:
            assert request_ids <= found, f"{len(request_ids - found)} requests not logged"
            assert rows is not None
            mask = [rid in request_ids for rid in rows.column("request_id").to_pylist()]
            return rows.filter(pa.array(mask))
        time.sleep(0.5)


def predict(url: str, path: Path) -> dict:
    answer = httpx.post(
        f"{url}/predict", content=path.read_bytes(), headers={"Content-Type": "image/png"}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert answer.headers["X-Request-Id"] == body["request_id"]
    assert records.REQUEST_ID.match(body["request_id"])
    return body


def service_client(service: Service):
    from mnistops.clients import s3_client

    return s3_client(service.settings)


def label(url: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}/feedback", json=body)
