"""The prediction log's writer: a process of its own that turns batches into Parquet
objects, signs them and PUTs them, so that none of that work holds the serving
process's interpreter lock while requests wait.

The service starts it (`WriterProcess`) with `python -m mnistops.loop.log_process` and
talks to it over a pipe: one request, one reply (`("written", n)` or `("failed", why)`).
It exits when the pipe closes, which is also what a `kill -9` of the service does to it:
a PUT under way is finished (an object is whole or absent), nothing else is started.
It ignores SIGINT and SIGTERM, which a terminal or `stack down` send to the whole group,
so that the service's last batch still has a writer when the service stops.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any

from mnistops.credentials import S3Keys
from mnistops.loop import records

log = logging.getLogger("mnistops.serve")

REPLY_TIMEOUT_S = 120.0
"""a writer that has not answered by then is stopped and started again"""


class WriterGone(Exception):
    """The writer process did not answer; the message says what happened."""


@dataclass(frozen=True)
class StoreAccess:
    """What the writer needs of the settings, as plain values: the writer process never
    imports pydantic and the settings (16 MB of its memory). No secret in its repr."""

    endpoint_url: str | None
    region: str
    keys: S3Keys | None = field(repr=False)
    """None: the AWS default chain"""
    bucket: str
    log_key: bytes = field(repr=False)
    """the prediction log's signing key (`records.log_key`)"""


class WriterProcess:
    """The service's side of the writer process: `call` sends one request and waits for
    its reply (on the log's thread, never on a request's path)."""

    def __init__(self, access: Callable[[], StoreAccess]) -> None:
        self.access = access
        """read again at every start and after every failed write: keys that changed
        (a regenerated credentials file) are used without a restart of the service"""
        self.failed = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.requests: Connection | None = None
        self.replies: Connection | None = None
        self.cpu_before_s = 0.0
        """CPU seconds of the writer processes that stopped"""
        self.cpu_seen_s = 0.0
        """the CPU seconds last read of the one running"""

    def call(self, request: tuple[str, Any]) -> Any:
        """The writer's reply to `request`; WriterGone if it died or hung (it is then
        started again at the next call), RuntimeError with the writer's reason."""
        if self.proc is not None and self.proc.poll() is not None:
            log.warning(
                "the prediction log's writer process had exited (code %s): started again",
                self.proc.returncode,
            )
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.requests is not None and self.replies is not None
        try:
            if self.failed:
                self.requests.send(("access", self.access()))
                self.failed = False
            self.requests.send(request)
            if not self.replies.poll(REPLY_TIMEOUT_S):
                raise WriterGone(f"no answer in {REPLY_TIMEOUT_S:.0f} s")
            outcome, value = self.replies.recv()
        except (OSError, EOFError, WriterGone) as exc:
            self.stop(wait_s=0)
            why = str(exc) or type(exc).__name__
            raise WriterGone(f"the log's writer process stopped ({why})") from None
        if outcome == "failed":
            self.failed = True
            raise RuntimeError(value)
        return value

    def cpu_seconds(self) -> float:
        """CPU seconds the writer processes used so far."""
        return self.cpu_before_s + self._cpu_now()

    def _cpu_now(self) -> float:
        import psutil

        proc = self.proc
        if proc is None:
            return 0.0
        try:
            times = psutil.Process(proc.pid).cpu_times()
        except psutil.Error:
            return self.cpu_seen_s  # gone: what it had used when last seen
        self.cpu_seen_s = max(self.cpu_seen_s, float(times.user + times.system))
        return self.cpu_seen_s

    def kill(self) -> None:
        """Stop the writer now, whatever it is doing (the service stops without it)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def stop(self, wait_s: float = 10.0) -> None:
        """Close the pipe (the writer exits when it has finished what it was doing)."""
        for end in (self.requests, self.replies):
            if end is not None:
                end.close()
        self.requests = self.replies = None
        if self.proc is not None:
            self.cpu_before_s += self._cpu_now()
            self.cpu_seen_s = 0.0
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def start(self) -> None:
        """Start the writer (again); it loads its imports while the service starts."""
        self.stop(wait_s=0)
        access = self.access()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mnistops.loop.log_process", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.requests = Connection(to_child_w, readable=False)
        self.replies = Connection(from_child_r, writable=False)
        self.failed = False
        self.requests.send(("access", access))
        self.requests.send(("ready", None))


def serve_requests(requests: Connection, replies: Connection) -> None:
    """Answer the service's requests until it closes the pipe."""
    store: Store | None = None
    access: StoreAccess | None = None
    while True:
        try:
            kind, value = requests.recv()
        except (EOFError, OSError):
            return
        if kind == "access":
            access, store = value, None
            continue
        if kind == "ready":
            try:
                store = Store(access)
            except Exception as exc:  # noqa: BLE001  made again at the first batch
                log.warning("the prediction log's object store client: %s", exc)
            continue
        try:
            if store is None:
                store = Store(access)
            reply: tuple[str, Any] = ("written", store.handle(kind, value))
        except Exception as exc:  # noqa: BLE001  the service keeps the records and retries
            store = None
            reply = ("failed", f"{type(exc).__name__}: {exc}")
        try:
            replies.send(reply)
        except OSError:
            return


class Store:
    """The object store as the writer uses it: signed batches in, old days out."""

    def __init__(self, access: StoreAccess | None) -> None:
        from mnistops.clients import s3_client_at

        if access is None:
            raise RuntimeError("the service sent no store access")
        self.key = access.log_key
        self.bucket = access.bucket
        self.client = s3_client_at(access.endpoint_url, access.region, access.keys, 5.0)

    def handle(self, kind: str, value: Any) -> int:
        if kind == "answers":
            return self.put(records.PREDICTIONS_PREFIX, records.columns_parquet(value))
        if kind == "labels":
            return self.put(records.FEEDBACK_PREFIX, records.feedback_parquet(value))
        if kind == "retain":
            return delete_before(self.client, self.bucket, int(value))
        raise ValueError(f"unknown request {kind!r}")

    def put(self, prefix: str, body: bytes) -> int:
        name = records.object_name(prefix, datetime.now(UTC))
        signature = {records.SIGNATURE: records.batch_signature(self.key, name, body)}
        self.client.put_object(Bucket=self.bucket, Key=name, Body=body, Metadata=signature)
        return len(body)


def delete_before(client: Any, bucket: str, retention_days: int) -> int:
    """Delete the batches of days older than `retention_days` (UTC); how many."""
    cutoff = datetime.now(UTC).date() - timedelta(days=retention_days)
    deleted = 0
    for prefix in (records.PREDICTIONS_PREFIX, records.FEEDBACK_PREFIX):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        old = [
            item["Key"]
            for page in pages
            for item in page.get("Contents", [])
            if (day := records.day_of(item["Key"])) is not None and day < cutoff
        ]
        for start in range(0, len(old), 1000):
            chunk = [{"Key": key} for key in old[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
            deleted += len(chunk)
    return deleted


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    requests = Connection(int(argv[0]), writable=False)
    replies = Connection(int(argv[1]), readable=False)
    serve_requests(requests, replies)


if __name__ == "__main__":
    main(sys.argv[1:])
