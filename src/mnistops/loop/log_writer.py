"""The service's prediction log: answers and labels buffered in memory and written in
batches to the object store by one thread and a writer process, off every request's path.

`record` and `label` only append to a list under a lock: an answer never waits for the
store. A batch is written when it holds `serve.log.batch_records` records, its oldest
is `serve.log.batch_s` old, or a label came `serve.log.label_s` ago (labels are few, and
someone waits for them in `data add --feedback`), as one Parquet object with one PUT
(whole or absent). The thread only gathers a batch's
columns; building the Parquet object, signing it and the PUT happen in the writer
process (`log_process`), where they never hold this process's interpreter lock while
requests wait. While the store cannot be reached the records stay buffered and are tried again; past
`serve.log.max_buffered` new records are shed and counted (`/metrics`). A `kill -9`
loses what was buffered, never a written batch. Once an hour the thread deletes the
days older than `serve.log.retention_days`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from mnistops.loop import records
from mnistops.loop.log_process import StoreAccess, WriterGone, WriterProcess
from mnistops.loop.records import Answered, Label
from mnistops.settings import Settings

log = logging.getLogger("mnistops.serve")

RETRY_S = 5.0
"""after a failed write, the next try waits this long"""
RETENTION_EVERY_S = 3600.0


@dataclass
class LogCounts:
    """What /metrics says of the log."""

    written: int = 0
    shed: int = 0
    write_errors: int = 0
    batches: int = 0
    labels_written: int = 0


def store_access(settings: Settings) -> StoreAccess:
    """What the writer process needs of `settings` (BadInput without a signing key)."""
    from mnistops.clients import s3_keys
    from mnistops.loop.store import log_signing_key

    return StoreAccess(
        endpoint_url=settings.s3_endpoint,
        region=settings.s3.region,
        keys=s3_keys(settings),
        bucket=settings.s3.buckets.dvc,
        log_key=records.log_key(log_signing_key(settings, doing="signed")),
    )


class PredictionLog:
    """Buffers answers and labels; a daemon thread writes them (`start`, `close`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = settings.serve.log
        self.bucket = settings.s3.buckets.dvc
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.answers: list[Answered] = []
        self.buffered = 0
        self.labels: list[Label] = []
        self.oldest: float | None = None
        self.labelled: float | None = None
        """when the first label still buffered came"""
        self.counts = LogCounts()
        self.thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        store_access(settings)  # a missing key or a bad key file refused at start
        self.writer = WriterProcess(lambda: store_access(settings))
        self.in_flight = 0
        """records handed to the writer and not yet written"""
        self.lost_said = False
        self.thread_cpu_s = 0.0
        """CPU seconds the writer thread used (/metrics)"""
        self._retention_done = 0.0

    def start(self) -> None:
        self.thread.start()

    @property
    def waiting(self) -> int:
        """Records not written yet: buffered, and handed to the writer (a write under
        way, or one failing until the store answers)."""
        return self.buffered + self.in_flight

    def record(self, answered: Answered) -> None:
        """Buffer one answer (never blocks on the store); shed it when the buffer is full."""
        n = len(answered.pixels)
        with self.lock:
            if self.buffered + n > self.config.max_buffered:
                self.counts.shed += n
                return
            self.answers.append(answered)
            self.buffered += n
            if self.oldest is None:
                self.oldest = time.monotonic()
            full = self.buffered >= self.config.batch_records
        if full:
            self.wake.set()

    def label(self, label: Label) -> None:
        """Buffer one label from /feedback (labels are few: bounded by its rate limit)."""
        with self.lock:
            self.labels.append(label)
            now = time.monotonic()
            if self.oldest is None:
                self.oldest = now
            if self.labelled is None:
                self.labelled = now
        self.wake.set()  # the writer's next wait counts label_s from now

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is buffered (a graceful stop loses nothing while the store answers),
        then stop the thread. What cannot be written within `timeout_s` is lost, and the
        log says how much; the writer process is stopped with the service."""
        self.stopping.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        if self.thread.is_alive():
            self._say_lost(
                f"the object store or the log's writer did not answer in {timeout_s:g} s"
            )
            self.writer.kill()

    def _say_lost(self, why: str) -> None:
        with self.lock:
            lost = sum(len(a.pixels) for a in self.answers) + len(self.labels) + self.in_flight
            said, self.lost_said = self.lost_said, True
        if lost and not said:
            log.warning(
                "the service stops: %d records of the prediction log are lost (%s)", lost, why
            )

    def _run(self) -> None:
        try:
            self.writer.start()  # its imports and client made before the first batch
        except Exception as exc:  # noqa: BLE001  started again at the first batch
            log.warning("the prediction log's writer process: %s", exc)
        try:
            while True:
                self.wake.wait(self._wait_s())
                self.wake.clear()
                stopping = self.stopping.is_set()
                if stopping or self._due():
                    self._flush()
                self.thread_cpu_s = time.thread_time()
                if stopping:
                    self._say_lost("they could not be written as it stopped")
                    return
                self._retention()
        finally:
            self.writer.stop()

    def _next_write(self) -> float | None:
        return write_due(self.oldest, self.labelled, self.config.batch_s, self.config.label_s)

    def _wait_s(self) -> float:
        with self.lock:
            due = self._next_write()
            if due is None:
                return self.config.batch_s
            return max(0.05, due - time.monotonic())

    def _due(self) -> bool:
        with self.lock:
            due = self._next_write()
            if due is None:
                return False
            return time.monotonic() >= due or self.buffered >= self.config.batch_records

    def _take(self) -> tuple[list[Answered], list[Label]]:
        with self.lock:
            answers, labels = self.answers, self.labels
            self.answers, self.labels, self.buffered, self.oldest = [], [], 0, None
            self.labelled = None
            return answers, labels

    def _put_back(self, answers: list[Answered], labels: list[Label]) -> None:
        """A batch that could not be written goes back in front, within the buffer's room."""
        with self.lock:
            room = self.config.max_buffered - self.buffered
            kept: list[Answered] = []
            for answered in answers:
                if len(answered.pixels) <= room:
                    kept.append(answered)
                    room -= len(answered.pixels)
                else:
                    self.counts.shed += len(answered.pixels)
            self.answers = kept + self.answers
            self.buffered += sum(len(a.pixels) for a in kept)
            self.labels = labels + self.labels
            self.oldest = time.monotonic() - self.config.batch_s + RETRY_S
            self.labelled = None

    def _flush(self) -> None:
        answers, labels = self._take()
        self.in_flight = sum(len(a.pixels) for a in answers) + len(labels)
        written = 0
        try:
            for chunk in _chunks(answers, self.config.batch_records):
                self._write_answers(chunk)
                written += len(chunk)
                self.in_flight -= sum(len(a.pixels) for a in chunk)
            while labels:
                some = labels[: self.config.batch_records]
                self.writer.call(("labels", some))
                self.counts.labels_written += len(some)
                labels = labels[len(some) :]
                self.in_flight -= len(some)
        except Exception as exc:  # noqa: BLE001  the store is down: keep the records, retry
            self.counts.write_errors += 1
            self.in_flight = 0  # back in the buffer: counted there, not twice
            self._put_back(answers[written:], labels)
            where = "" if isinstance(exc, WriterGone) else f" to s3://{self.bucket}"
            log.warning(
                "the prediction log cannot be written%s (%s); %d records kept, tried again"
                " in %.0f s",
                where,
                exc,
                self.buffered,
                RETRY_S,
            )
        finally:
            self.in_flight = 0

    def _write_answers(self, batch: list[Answered]) -> None:
        self.writer.call(("answers", records.answer_columns(batch)))
        self.counts.written += sum(len(a.pixels) for a in batch)
        self.counts.batches += 1

    def _retention(self) -> None:
        """Delete the days of batches older than `retention_days`, once an hour."""
        if time.monotonic() - self._retention_done < RETENTION_EVERY_S:
            return
        self._retention_done = time.monotonic()
        try:
            self.writer.call(("retain", self.config.retention_days))
        except Exception as exc:  # noqa: BLE001  tried again in an hour
            log.warning("old prediction-log batches could not be deleted: %s", exc)


def write_due(
    oldest: float | None, labelled: float | None, batch_s: float, label_s: float
) -> float | None:
    """When the buffered records are due to be written (monotonic time), if any are:
    `batch_s` after the oldest, or `label_s` after the first label if that is sooner."""
    if oldest is None:
        return None
    due = oldest + batch_s
    return min(due, labelled + label_s) if labelled is not None else due


def _chunks(answers: list[Answered], limit: int) -> list[list[Answered]]:
    """Consecutive groups of answers of at most `limit` records (at least one answer)."""
    chunks: list[list[Answered]] = []
    size = limit
    for answered in answers:
        if size + len(answered.pixels) > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(answered)
        size += len(answered.pixels)
    return chunks
