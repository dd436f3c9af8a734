"""Monitoring: one window of the prediction log against the champion's training data.

A run reads the answers logged since the previous run ended (the first run: the last
`monitoring.interval_s`), up to a few seconds before now (a batch is written up to
`serve.log.batch_s` after its answers), and the labels given for answers of that
window. It compares them with a fixed sample of the champion's training images
(`drift.judge`), writes an HTML report a person reads (figures and plots) to the object
store and to an MLflow run of the experiment `monitoring.experiment_name`, whose
figures are the run's metrics. The window's end is a tag of that run: the next run
starts there, on any machine.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from mnistops.errors import BadInput
from mnistops.loop import drift, records, report
from mnistops.loop.store import each_batch, read_batches
from mnistops.settings import Settings
from mnistops.tracking import contract as c

log = logging.getLogger(__name__)

REPORT_PREFIX = "monitoring/"
WRITE_LAG_S = 5.0
"""beyond `serve.log.batch_s`: how long a batch may take to be written"""


@dataclass(frozen=True)
class Served:
    """The champion that monitoring compares with, and the data it was trained on."""

    model_name: str
    version: str
    data_version: str
    run_id: str = ""


@dataclass
class Monitored:
    """One monitoring run: its window, judgement, report and MLflow run."""

    start: datetime
    end: datetime
    champion: Served
    judgement: drift.Judgement
    report_uri: str
    run_id: str
    run_url: str
    refused: list[tuple[str, str]]

    def figures(self) -> dict[str, float]:
        """The run's metrics (and the drift event's payload)."""
        j = self.judgement
        found: dict[str, float] = {
            "predictions": j.predictions,
            "drift": float(j.drift),
            "low_confidence_share": j.low_confidence_share,
            "feedback_labels": j.feedback,
        }
        if j.feedback_accuracy is not None:
            found["feedback_accuracy"] = j.feedback_accuracy
        for test in j.tests:
            found[f"effect_{_slug(test.name)}"] = test.effect
        return found


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("-", "_")


def champion_served(settings: Settings) -> Served:
    """The champion and its training data's version; BadInput when there is none."""
    from mnistops.tracking.champion import champion_of

    name = settings.model_registry.name
    found = champion_of(settings)
    if found is None:
        raise BadInput(
            f"no champion of {name} yet: monitoring compares the answers with the training"
            " data of the champion (`mnistops train` makes one)"
        )
    data_version = (found.tags or {}).get(c.DATA_VERSION_TAG, "")
    return Served(name, str(found.version), data_version, found.run_id or "")


def reference(settings: Settings, served: Served) -> tuple[drift.Reference, str]:
    """The champion's training images, as `drift` compares with them, and the version
    they came from (the newest one when the champion was trained on a plain folder).
    The predicted digits are compared with the champion's own predictions on its test
    images (stored by its run), so a model that favours a digit is not drift; with none
    stored, with the training labels."""
    from mnistops.train import data

    tag = served.data_version if served.data_version not in ("", c.UNTRACKED) else "latest"
    arrays = data.load_version(settings, tag)
    config = settings.monitoring
    found = drift.reference_of(arrays.train_x, arrays.train_y, config.reference_images)
    predicted = champion_test_predictions(settings, served.run_id)
    if predicted is not None:
        share = np.bincount(predicted.astype(np.int64), minlength=10)[:10] / len(predicted)
        found = drift.Reference(found.features, share.astype(np.float64), "its test predictions")
    return found, arrays.source.name


def champion_test_predictions(settings: Settings, run_id: str) -> np.ndarray | None:
    """The digits the champion's run stored for its test images (verified), if any."""
    from mnistops.clients import mlflow_client
    from mnistops.tracking import predictions

    if not run_id:
        return None
    client = mlflow_client(settings)
    for digest in predictions.stored_digests(client, run_id):
        found = predictions.verified(client, run_id, digest)
        if found is not None and len(found[0]):
            return found[0]
    return None


def last_window_end(settings: Settings, before: datetime) -> datetime | None:
    """Where the previous monitoring run's window ended: the latest end, no later than
    `before`, among the newest finished runs (an end in the future, from a clock ahead
    or a tag set by hand, is passed over rather than stopping every later window). A run
    cut short, or whose drift event was not sent, is not FINISHED: its window is judged
    again. A window asked for with `--since` is outside the chain: a later start would
    leave the answers before it unjudged."""
    from mnistops.clients import mlflow_client

    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name(settings.monitoring.experiment_name)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{c.WINDOW_END_TAG} != '' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    ends = [
        _utc_time(run.data.tags.get(c.WINDOW_END_TAG, ""))
        for run in found
        if run.data.tags.get(c.WINDOW_BY_HAND_TAG) != "true"
    ]
    usable = [end for end in ends if end is not None and end <= before]
    return max(usable, default=None)


def _utc_time(text: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def window(settings: Settings, start: datetime, end: datetime) -> tuple[drift.Window, list[Any]]:
    """The answers logged in [start, end) and the labels given for them; the refused
    objects of the log. Read one batch at a time: only each input's statistics are kept,
    once per distinct input."""
    import pyarrow as pa
    import pyarrow.compute as pc

    refused: list[tuple[str, str]] = []
    end_ms = pa.scalar(int(end.timestamp() * 1000), pa.timestamp("ms", tz="UTC"))
    features, digits, confidences = [], [], []
    answered: set[tuple[str, int]] = set()
    versions: Counter[str] = Counter()
    seen: set[bytes] = set()
    for _name, table in each_batch(settings, records.PREDICTIONS_PREFIX, start, refused):
        table = table.filter(pc.less(table["time"], end_ms))
        if not table.num_rows:
            continue
        pixels = _pixels(table["input"].combine_chunks())
        new = _first_seen(pixels, seen)
        features.append(drift.features(pixels[new]))
        digits.append(table["digit"].combine_chunks().to_numpy(zero_copy_only=False)[new])
        confidence = table["confidence"].combine_chunks().to_numpy(zero_copy_only=False)
        confidences.append(confidence[new])
        versions.update(table["model_version"].to_pylist())
        answered.update(
            zip(table["request_id"].to_pylist(), table["item"].to_pylist(), strict=True)
        )
    labels = read_batches(settings, records.FEEDBACK_PREFIX, start)
    latest: dict[tuple[str, int], tuple[int, int]] = {}
    for labelled in labels.tables:
        columns = labelled.select(["request_id", "item", "digit", "predicted"]).to_pydict()
        for rid, item, digit, predicted in zip(*columns.values(), strict=True):
            if (rid, item) in answered:
                latest[(rid, item)] = (digit, predicted)
    given = np.array(list(latest.values()), np.int64).reshape(-1, 2)
    found = drift.Window(
        np.concatenate(features) if features else np.zeros((0, len(drift.FEATURES)), np.float32),
        np.concatenate(digits).astype(np.int64) if digits else np.zeros(0, np.int64),
        np.concatenate(confidences) if confidences else np.zeros(0, np.float32),
        given[:, 0],
        given[:, 1],
        dict(versions),
    )
    return found, refused + labels.refused


def _first_seen(pixels: np.ndarray, seen: set[bytes]) -> np.ndarray:
    """Which rows hold an input not seen before in the window (added to `seen`): the
    same image sent again (a client's retries) weighs once in the comparisons."""
    new = np.zeros(len(pixels), bool)
    for i, row in enumerate(pixels):
        digest = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            new[i] = True
    return new


def _pixels(inputs: Any) -> np.ndarray:
    """(N, 784) uint8 of a fixed-size binary array, read from its buffer (no copy)."""
    start = inputs.offset * records.PIXELS
    data = np.frombuffer(inputs.buffers()[1], np.uint8)
    return data[start : start + len(inputs) * records.PIXELS].reshape(-1, records.PIXELS)


def monitoring_lock_name(settings: Settings) -> str:
    return f"mnistops-monitoring-{settings.monitoring.experiment_name}"


@contextmanager
def one_window_at_a_time(settings: Settings) -> Iterator[None]:
    """Hold the stack-wide monitoring lock while a window is judged, recorded and its
    drift event sent: two monitoring runs at once (`monitor --here` beside the
    scheduled flow, on any machine) would both start where the last finished run
    ended, judge the same answers and both start a retraining. The second waits, then
    judges only what came after the first's window. The lock is Prefect's; when
    Prefect does not answer, the window is judged without it (its drift event cannot be
    sent then either, so the window is judged again later: `announce_drift`)."""
    from mnistops.stack.locks import LockUnreachable, held

    with ExitStack() as stack:
        try:
            stack.enter_context(
                held(
                    settings,
                    monitoring_lock_name(settings),
                    holder="another monitoring run",
                    if_lost="another monitoring run may have judged the same answers",
                )
            )
        except LockUnreachable as exc:
            log.warning("judging without the monitoring lock: %s", exc)
        yield


def monitor(
    settings: Settings, now: datetime | None = None, since: datetime | None = None
) -> Monitored:
    """One monitoring run: judge the window since the last run (or `since`), report,
    record."""
    config = settings.monitoring
    end = (now or datetime.now(UTC)) - timedelta(seconds=settings.serve.log.batch_s + WRITE_LAG_S)
    if since is not None and since > end:
        raise BadInput(
            f"--since {since:%Y-%m-%dT%H:%M:%S} UTC is after the newest answers a window may"
            f" hold ({end:%Y-%m-%dT%H:%M:%S} UTC): give an earlier time"
        )
    served = champion_served(settings)
    previous = last_window_end(settings, end)
    start = since or previous or end - timedelta(seconds=config.interval_s)
    start = min(start, end)
    found, refused = window(settings, start, end)
    ref, ref_version = reference(settings, served)
    served = Served(served.model_name, served.version, ref_version)
    judgement = drift.judge(found, ref, config)
    page = report.report_html(
        report.Page(start, end, served.model_name, served.version, ref_version, found.versions),
        judgement,
        found,
        ref,
        config,
    )
    uri = store_report(settings, page, end)
    run_id, url = record_run(
        settings, start, end, served, judgement, page, uri, by_hand=since is not None
    )
    return Monitored(start, end, served, judgement, uri, run_id, url, refused)


def store_report(settings: Settings, page: str, end: datetime) -> str:
    """The report in the object store, `monitoring/<day>/<time>-<id>.html`."""
    from mnistops.clients import s3_client
    from mnistops.data.remote import store_errors

    bucket = settings.s3.buckets.dvc
    name = f"{REPORT_PREFIX}{end:%Y-%m-%d}/{end:%H%M%S}-{secrets.token_hex(8)}.html"
    client = s3_client(settings)
    with store_errors(f"writing the monitoring report to s3://{bucket}/{name}", client):
        client.put_object(
            Bucket=bucket, Key=name, Body=page.encode(), ContentType="text/html; charset=utf-8"
        )
    return f"s3://{bucket}/{name}"


def record_run(
    settings: Settings,
    start: datetime,
    end: datetime,
    served: Served,
    judgement: drift.Judgement,
    page: str,
    uri: str,
    by_hand: bool = False,
) -> tuple[str, str]:
    """An MLflow run of the monitoring experiment: figures, window, report; (id, URL).
    A drift window's run stays RUNNING until its event is sent (`finish_window`): if
    the process dies before, the next run judges the window again and sends it."""
    from mlflow.entities import Metric, Param, RunTag

    from mnistops.clients import mlflow_client
    from mnistops.tracking.server import experiment_id

    client = mlflow_client(settings)
    exp_id = experiment_id(client, settings.monitoring.experiment_name)
    tags = {
        c.WINDOW_START_TAG: start.isoformat(),
        c.WINDOW_END_TAG: end.isoformat(),
        c.MONITORED_MODEL_TAG: f"{served.model_name}/{served.version}",
        c.DATA_VERSION_TAG: served.data_version,
        c.DRIFT_TAG: "true" if judgement.drift else "false",
        c.REPORT_TAG: uri,
    }
    if by_hand:
        tags[c.WINDOW_BY_HAND_TAG] = "true"
    run = client.create_run(exp_id, run_name=f"monitoring {end:%Y-%m-%d %H:%M}", tags=tags)
    run_id = run.info.run_id
    stamp = int(time.time() * 1000)
    metrics = Monitored(start, end, served, judgement, uri, "", "", []).figures()
    try:
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()],
            params=[Param("reasons", "; ".join(judgement.reasons)[:6000] or "none")],
            tags=[RunTag(c.NOTE_TAG, summary_markdown(judgement))],
        )
        client.log_text(run_id, page, "report.html")
    except BaseException as exc:  # cut short: KILLED (Ctrl-C, SIGTERM) or FAILED, not RUNNING
        status = "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"
        release_window(settings, run_id, status, f"{exc.__class__.__name__}: {exc}"[:500])
        raise
    if not judgement.drift:
        client.set_terminated(run_id)
    return run_id, f"{settings.mlflow_uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def finish_window(settings: Settings, run_id: str) -> None:
    """Mark the drift window's run FINISHED once its event was sent. Best effort: a run
    left RUNNING has its window judged, and its event sent, again (at least once)."""
    failed = end_window(settings, run_id, "FINISHED")
    if failed is not None:
        log.warning(
            "the monitoring run %s could not be marked finished (%s): the next monitoring"
            " run judges its window, and sends its drift event, again",
            run_id,
            failed,
        )


def release_window(settings: Settings, run_id: str, status: str, why: str) -> None:
    """End the run with `status` (not FINISHED) and say why in its `error` tag: the next
    monitoring run takes its window again. Best effort: the server that just failed may
    not take this either, and the first failure is the one raised."""
    end_window(settings, run_id, status, why)


def end_window(settings: Settings, run_id: str, status: str, why: str | None = None) -> str | None:
    """End the window's run with `status` (`why` in its `error` tag); what went wrong
    (the error's class), None when MLflow took it."""
    from mnistops.clients import mlflow_client

    try:
        client = mlflow_client(settings)
        if why is not None:
            client.set_tag(run_id, c.ERROR_TAG, why)
        client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001  best effort: the callers say what follows
        return exc.__class__.__name__
    return None


def summary_markdown(judgement: drift.Judgement) -> str:
    """A few lines of what the window showed."""
    if not judgement.judged:
        head = f"{judgement.predictions} answers: too few to judge (monitoring.min_predictions)"
    elif judgement.drift:
        head = f"**Drift** in {judgement.predictions} answers: " + "; ".join(judgement.reasons)
    else:
        head = f"No drift in {judgement.predictions} answers"
    feedback = (
        f"; feedback: {judgement.feedback_accuracy:.0%} right of {judgement.feedback} labelled"
        if judgement.feedback_accuracy is not None
        else ""
    )
    if not judgement.predictions:
        return f"{head}{feedback}."
    return f"{head}. Unsure answers: {judgement.low_confidence_share:.1%}{feedback}."
