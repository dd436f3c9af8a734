"""The demo: the whole walkthrough on the local stack, from nothing to a retraining on
what the served model saw, told as a story in ten stages.

Stack up, MNIST as PNG folders, data version v1.0, a tracked experimental training on
v1.0, new images and v2.0, the retraining deployment from config/flow.yml, a worker, a
Quick run on v2.0, the champion served, then the loop: drawn digits sent to the service,
its mistakes corrected through /feedback, the labels become v3.0, the retraining its
publication triggers, and the champion the service then answers with; a summary. Every
stage calls the same functions as its command; what the user sees of it goes through a
`Reporter` (the CLI's prints tables and progress bars). Safe to re-run: what exists
(versions, models, the deployment, the worker, the service) is kept and reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from mnistops import background
from mnistops.demo_summary import Summary, summary
from mnistops.settings import Settings

if TYPE_CHECKING:
    from mnistops.data.ingest import IngestResult
    from mnistops.data.registry import PublishResult
    from mnistops.flows.deployment import DeployResult
    from mnistops.flows.events import Announcement
    from mnistops.flows.quick_runs import FinishedRun
    from mnistops.loop.labels import FeedbackAdded, Labelled
    from mnistops.settings import HyperParameters
    from mnistops.stack import ServiceStatus
    from mnistops.tracking.runs import RunOutcome, TrainingHooks
    from mnistops.train.data import Arrays

DEMO_EPOCHS = 1
"""the demo's trainings are short; `mnistops train` uses hyp.yml"""

ProgressFor = Callable[[str, int], Callable[[int], None]]


class Reporter(Protocol):
    """What the user sees of the demo."""

    def stage(self, number: int, title: str) -> None: ...
    def say(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def busy(self, title: str) -> AbstractContextManager[Callable[[str], None]]: ...
    def progress(self) -> AbstractContextManager[ProgressFor]: ...
    def training(
        self, hyp: HyperParameters, arrays: Arrays
    ) -> AbstractContextManager[TrainingHooks]: ...
    def stack_ready(self, statuses: list[ServiceStatus]) -> None: ...
    def ingested(self, result: IngestResult) -> None: ...
    def published(self, result: PublishResult, announcement: Announcement) -> None: ...
    def trained(self, outcome: RunOutcome) -> None: ...
    def deployed(self, result: DeployResult) -> None: ...
    def run_started(self, run_id: str, url: str) -> None: ...
    def run_state(self, name: str, message: str) -> None: ...
    def run_finished(self, run: FinishedRun) -> None: ...
    def feedback_added(self, report: FeedbackAdded) -> None: ...
    def summary(self, summary: Summary) -> None: ...


def run_demo(
    settings: Settings, reporter: Reporter, fast: bool = False, n_epochs: int = DEMO_EPOCHS
) -> None:
    """The ten stages and the summary."""
    from mnistops.data import reader
    from mnistops.pipeline import FAST_EPOCHS

    n_epochs = FAST_EPOCHS if fast else n_epochs
    reporter.stage(1, "the stack: object store, MLflow tracking, Prefect server")
    # the PNG folders are written in another process while the servers start: neither
    # needs the other, and the stack's start leaves a core idle for much of its time
    with background.started(
        "writing the PNG folders",
        ingest,
        stopped=lambda job: pngs_stopped(job, reporter),
        settings=settings,
        fast=fast,
    ) as pngs:
        start_stack(settings, reporter)
    reporter.stage(2, "MNIST as labelled PNG folders")
    pngs.tell(reporter)
    published = {r.tag for r in reader.list_versions(settings)}
    reporter.stage(3, "data version v1.0")
    publish_once(settings, reporter, "v1.0", published, None)
    # v2.0 is made in another process while v1.0 trains: each keeps about one core busy
    with background.started(
        "publishing v2.0",
        publish_once,
        stopped=lambda job: reporter.warn(v2_stopped(job)),
        settings=settings,
        tag="v2.0",
        published=published,
        new_images="train_v2",
    ) as v2:
        reporter.stage(4, "experimental training on v1.0, tracked in MLflow")
        experiment(settings, reporter, "v1.0", n_epochs, fast)
    reporter.stage(5, "new images: data version v2.0")
    v2.tell(reporter)
    reporter.stage(6, "scheduled retraining: the deployment from config/flow.yml")
    deploy(settings, reporter, n_epochs)
    reporter.stage(7, f"a worker for work pool {settings.deployment.pool_name}")
    worker(settings, reporter)
    reporter.stage(8, "Quick run of the deployment on v2.0")
    quick_run(settings, reporter, "v2.0", n_epochs, fast)
    reporter.stage(9, "the champion served over HTTP, following the registry")
    serve(settings, reporter)
    reporter.stage(10, "the loop: what the service saw, labelled, becomes v3.0 and a retraining")
    the_loop(settings, reporter, published)
    reporter.summary(summary(settings))


def pngs_stopped(job: background.Started, reporter: Reporter) -> None:
    """Say so when the PNG folders were left unfinished by a stop during stage 1."""
    if not any(name == "ingested" for name, _args in job.told):
        reporter.warn(
            "the PNG folders were not finished: publishing refuses them until they are;"
            " running the demo again (or `mnistops data ingest`) finishes them"
        )


def v2_stopped(job: background.Started) -> str:
    """What became of v2.0, whose publication was stopped with the training beside it."""
    if any(name == "published" for name, _args in job.told):
        return "v2.0 was published before the demo stopped"
    said = [str(args[0]) for name, args in job.told if name == "say"]
    if any(line.startswith("added ") for line in said):
        return (
            "v2.0 was not published: its new images are in the training folder, as after"
            " `mnistops data add`; running the demo again publishes it"
        )
    if isinstance(job.error, KeyboardInterrupt):
        return "v2.0 was not made: the training folder is as it was"
    return "v2.0 may not be published: see `mnistops data list`; running the demo again finishes it"


def start_stack(settings: Settings, reporter: Reporter) -> None:
    from mnistops import stack

    for warning in stack.exposure(settings):
        reporter.warn(warning)
    with reporter.busy("starting the stack...") as report:
        stack.up(settings, report=report)
    reporter.stack_ready(stack.status(settings))


def ingest(settings: Settings, reporter: Reporter, fast: bool) -> None:
    from mnistops.data.ingest import ingest_mnist

    with reporter.progress() as progress_for:
        result = ingest_mnist(settings, fast=fast, progress_for=progress_for)
    reporter.ingested(result)


MESSAGES = {
    "v1.0": "MNIST: the first training images and the test set",
    "v2.0": "MNIST: the new training images added",
    "v3.0": "MNIST: the digits the service saw, labelled through /feedback",
}


def publish_once(
    settings: Settings,
    reporter: Reporter,
    tag: str,
    published: set[str],
    new_images: str | None,
) -> None:
    """Publish `tag` unless it exists; first add the images of the split `new_images`."""
    from mnistops.data import adding, registry
    from mnistops.flows.events import announce

    if tag in published:
        reporter.say(f"{tag} exists already: kept")
        return
    with reporter.progress() as progress_for:
        if new_images:
            added = adding.add_images(settings, settings.mnist_dir / new_images, progress_for)
            reporter.say(
                f"added {sum(added.values())} images to {settings.mnist_dir / 'train'}"
                f" ({', '.join(f'{d}: {n}' for d, n in added.items()) or 'none new'})"
            )
        result = registry.publish(settings, tag, MESSAGES[tag], False, progress_for, reporter.say)
    reporter.published(result, announce(settings, tag, result.record.content_hash))


def model_trained_on(settings: Settings, tag: str) -> str | None:
    """The newest registered version trained on data version `tag`, if any."""
    from mnistops.tracking.champion import registered_versions
    from mnistops.tracking.contract import DATA_VERSION_TAG

    found, _aliases = registered_versions(settings)
    return next((v.version for v in found if v.tags.get(DATA_VERSION_TAG) == tag), None)


def experiment(settings: Settings, reporter: Reporter, tag: str, n_epochs: int, fast: bool) -> None:
    """Train on `tag` unless a registered model was trained on it already."""
    from mnistops import pipeline
    from mnistops.tracking.contract import EXPERIMENTAL

    found = model_trained_on(settings, tag)
    if found:
        reporter.say(f"{settings.model_registry.name} v{found} was trained on {tag}: kept")
        return
    hyp = pipeline.hyperparameters(
        settings, pipeline.Layer({"n_epochs": n_epochs}, lambda _f: "mnistops demo --epochs")
    )
    with reporter.busy("loading the data...") as report:
        arrays = pipeline.prepare(settings, hyp, tag, fast=fast, report=report)
    with reporter.training(hyp, arrays) as hooks:
        outcome = pipeline.train(settings, hyp, arrays, EXPERIMENTAL, hooks=hooks)
    reporter.trained(outcome)


def deploy(settings: Settings, reporter: Reporter, n_epochs: int) -> None:
    """The deployment, with the demo's short trainings: the loop stage's retraining is
    one of its runs."""
    from mnistops.flows.deployment import deploy as deploy_retraining

    hyp = settings.hyperparameter.model_copy(update={"n_epochs": n_epochs})
    reporter.deployed(deploy_retraining(settings.model_copy(update={"hyperparameter": hyp})))
    if n_epochs != settings.hyperparameter.n_epochs:
        reporter.say(
            f"its runs train {n_epochs} epoch(s), as the demo's do; `mnistops deploy`"
            f" deploys hyp.yml's {settings.hyperparameter.n_epochs}"
        )


def worker(settings: Settings, reporter: Reporter) -> None:
    """A detached worker for the deployment's pool, unless one runs already."""
    from mnistops.flows.workers import running_worker, start_detached

    pool = settings.deployment.pool_name
    running = running_worker(settings, pool)
    if running is not None:
        reporter.say(f"the worker for this pool runs already (pid {running.pid})")
        return
    record = start_detached(settings, pool)
    reporter.say(
        f"worker for pool {pool} started (pid {record.pid}, log {record.log_path});"
        " `mnistops stack down` stops it"
    )


def quick_run(settings: Settings, reporter: Reporter, tag: str, n_epochs: int, fast: bool) -> None:
    """A run of the deployment on `tag`, followed to its end, unless a model learned it."""
    from mnistops.flows.quick_runs import run_and_wait

    retrained = model_trained_on(settings, tag)
    if retrained:
        reporter.say(
            f"{settings.model_registry.name} v{retrained} was trained on {tag} by an earlier"
            " run: kept (no new data)"
        )
        return
    parameters = {"data_version": tag, "n_epochs": n_epochs, "fast": fast}
    reporter.run_finished(
        run_and_wait(settings, parameters, reporter.run_started, reporter.run_state)
    )


def serve(settings: Settings, reporter: Reporter) -> None:
    """`mnistops serve --detach`, unless the service of this state dir runs already."""
    from mnistops.serving import server

    running = server.running(settings)
    if running is not None:
        reporter.say(f"the prediction service runs already (pid {running.pid})")
    else:
        record = server.start_detached(settings)
        reporter.say(f"prediction service started (pid {record.pid}, log {record.log_path})")
    ready = server.wait_ready(settings)
    if ready is None:
        reporter.warn(f"the prediction service at {settings.local_serve_url} is not ready yet")
        return
    reporter.say(
        f"{settings.local_serve_url} answers with v{ready['model_version']}: draw a digit at"
        f" {settings.local_serve_url}/, or POST an image to {settings.local_serve_url}/predict"
    )


LOOP_DIGITS = 300
"""the drawn digits the loop stage sends, in requests of LOOP_REQUEST"""
LOOP_REQUEST = 50
CONFIRM_EVERY = 3
"""a person corrects every wrong answer and confirms every third right one"""


def the_loop(settings: Settings, reporter: Reporter, published: set[str]) -> None:
    """Drawn digits to the service, its mistakes corrected through /feedback, the labels
    into the training folders and v3.0, the retraining that v3.0's publication starts,
    and the champion the service answers with after the gate decided."""
    from mnistops.loop import labels

    if "v3.0" in published:
        reporter.say("v3.0 exists already: kept")
        return
    began = datetime.now(UTC)
    answered, before = send_drawn(settings, reporter)
    labelled = label_answers(settings, reporter, answered)
    with reporter.busy(
        f"waiting for the service to write its log (within {settings.serve.log.label_s:g} s of"
        " a label: serve.log.label_s)..."
    ):
        labels.test_images(settings)  # the check's test set, read while the log is written
        written = wait_written(settings, began, labelled)
    if written is None:
        reporter.warn(
            "the service's log was not written in time: run `mnistops data add --feedback` later"
        )
        return
    with reporter.progress() as progress_for:
        added = labels.add_feedback(settings, began, progress_for, read=written)
    reporter.feedback_added(added)
    if not added.added:
        reporter.warn("no labelled image was new: v3.0 is not published")
        return
    publish_once(settings, reporter, "v3.0", published, None)
    follow_triggered(settings, reporter, "v3.0", began)
    champion_served(settings, reporter, before)


def send_drawn(
    settings: Settings, reporter: Reporter
) -> tuple[list[tuple[str, int, int, int]], str]:
    """LOOP_DIGITS drawn digits to /predict; (request id, item, true digit, answer) of
    each, and the model version that answered."""
    from mnistops.loop import client, streams

    images, digits = streams.drawn(settings.mnist_dir / "train", LOOP_DIGITS)
    answered = []
    with client.ServiceClient(settings) as service:
        for start in range(0, LOOP_DIGITS, LOOP_REQUEST):
            answer = service.predict_batch(images[start : start + LOOP_REQUEST])
            for item, said in enumerate(answer.digits):
                answered.append((answer.request_id, item, int(digits[start + item]), said))
    right = sum(truth == said for _rid, _item, truth, said in answered)
    reporter.say(
        f"{LOOP_DIGITS} drawn digits (training images drawn thicker) sent to"
        f" {settings.local_serve_url}/predict in requests of {LOOP_REQUEST}:"
        f" v{answer.model_version} answered {right} right, {LOOP_DIGITS - right} wrong"
    )
    return answered, answer.model_version


def label_answers(
    settings: Settings, reporter: Reporter, answered: list[tuple[str, int, int, int]]
) -> int:
    """Correct every wrong answer and confirm every CONFIRM_EVERY-th right one through
    /feedback; how many labels were given."""
    from mnistops.loop import client

    corrected = confirmed = seen_right = 0
    with client.ServiceClient(settings) as service:
        for rid, item, truth, said in answered:
            if truth != said:
                corrected += 1
            else:
                seen_right += 1
                if seen_right % CONFIRM_EVERY:
                    continue
                confirmed += 1
            service.label(rid, item, truth)
    reporter.say(
        f"through {settings.local_serve_url}/feedback: {corrected} wrong answers corrected,"
        f" {confirmed} right ones confirmed"
    )
    return corrected + confirmed


def wait_written(settings: Settings, since: datetime, count: int) -> Labelled | None:
    """The log's labelled predictions from `since` on once it holds `count` of them,
    within a few times serve.log.label_s; None if it does not by then. (Handed to
    `add_feedback`, which would otherwise read the log again: about a second.)"""
    from mnistops.loop import labels

    deadline = time.monotonic() + 3 * settings.serve.log.label_s + 30
    while time.monotonic() < deadline:
        found, report = labels.labelled_pixels(settings, since)
        if len(found) >= count:
            return found, report
        time.sleep(1.0)
    return None


def follow_triggered(settings: Settings, reporter: Reporter, tag: str, since: datetime) -> None:
    """Follow the retraining the publication of `tag` started to its end."""
    from mnistops.flows.quick_runs import followed_to_the_end, triggered_run

    with reporter.busy(f"waiting for the trigger's retraining on {tag}..."):
        started = triggered_run(settings, tag, since)
    if started is None:
        reporter.warn(f"no retraining on {tag} started within a minute: see the Prefect UI")
        return
    run_id, url = started
    reporter.run_started(run_id, url)
    reporter.run_finished(followed_to_the_end(settings, run_id, url, reporter.run_state))


def champion_served(settings: Settings, reporter: Reporter, before: str) -> None:
    """Wait for the service to answer with the registry's champion, and say whether the
    gate changed it."""
    from mnistops.clients import mlflow_client
    from mnistops.serving import server
    from mnistops.tracking.registry import champion

    best = champion(mlflow_client(settings), settings.model_registry.name)
    if best is None:
        return
    deadline = time.monotonic() + 3 * settings.serve.poll_s + 60
    served = None
    while served != best.version and time.monotonic() < deadline:
        health = server.wait_ready(settings, timeout_s=5)
        served = health.get("model_version") if health else None
        time.sleep(0 if served == best.version else 1.0)
    if served != best.version:
        reporter.warn(f"the service answers with v{served}, not yet the champion v{best.version}")
    elif best.version == before:
        reporter.say(f"the gate kept v{before} champion: the service still answers with it")
    else:
        reporter.say(
            f"the new champion v{best.version} answers at {settings.local_serve_url}: the"
            f" service followed the registry (it answered with v{before} before)"
        )
