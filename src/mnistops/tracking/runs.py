"""A tracked training run: what `mnistops train` and the retraining flow both call.

Everything that can be refused is checked before an MLflow run exists (hyperparameters,
model, device, the tracking server, the data version). Then one run in the experiment
gets tags, params, the dataset as an input, per-epoch metrics, test metrics, pictures
and the model; only a fully logged model is registered, and the champion gate runs last.
"""

from __future__ import annotations

import contextlib
import getpass
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from mnistops.clients import mlflow_client
from mnistops.settings import HyperParameters, Settings
from mnistops.tracking import contract as c
from mnistops.tracking import model_record, plots
from mnistops.tracking.predictions import LabelledImages, log_predictions
from mnistops.tracking.registry import GateDecision
from mnistops.tracking.server import experiment_id
from mnistops.train.data import Arrays, DataSource
from mnistops.train.loop import (
    EpochMetrics,
    Fitted,
    TrainResult,
    fit,
    pick_device,
    score_on_test,
    thread_count,
)


@dataclass(frozen=True)
class TrackedRun:
    """An open MLflow run of a training: what the later steps need to log into it. Every
    step logs through `client` to `run_id`, never to MLflow's implicit active run (which
    is per thread, and outlives a failed step)."""

    client: MlflowClient
    run_id: str
    url: str
    experiment_id: str
    phase: str
    data_version: str


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    run_url: str
    experiment_id: str
    model_version: str
    decision: GateDecision
    data: DataSource
    result: TrainResult

    @property
    def test_accuracy(self) -> float:
        return self.result.test.accuracy


def code_commit() -> str | None:
    """The git commit of the running code when it is a git checkout."""
    source = Path(__file__).resolve().parents[3]
    if not (source / ".git").exists():
        return None
    done = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or None if done.returncode == 0 else None


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mnistops")
    except PackageNotFoundError:
        return "unknown"


def run_tags(settings: Settings, source: DataSource, phase: str, device: str) -> dict[str, str]:
    user = settings.developer_name or getpass.getuser()
    tags = {
        c.PHASE_TAG: phase,
        c.DEVICE_TAG: device,
        c.DATA_VERSION_TAG: source.name if source.tracked else c.UNTRACKED,
        c.DATA_HASH_TAG: source.content_hash,
        c.DATA_TRACKED_TAG: str(source.tracked).lower(),
        c.PACKAGE_VERSION_TAG: package_version(),
        c.USER_TAG: user,
        c.MLFLOW_USER_TAG: user,
    }
    if not source.tracked:
        tags[c.DATA_FOLDER_TAG] = source.name
    if source.commit:
        tags[c.DATA_COMMIT_TAG] = source.commit
    commit = code_commit()
    if commit:
        tags[c.MLFLOW_COMMIT_TAG] = commit
        tags[c.CODE_COMMIT_TAG] = commit
    return tags


NOT_RECIPE = {"device", "threads"}
"""hyperparameters that do not change what is learned"""


def recipe_of(hyp: HyperParameters, train_images: int) -> str:
    """What a model learned from, besides the data: the model and every hyperparameter
    that changes the result, and how many training images it saw (16 hex digits)."""
    import hashlib
    import json

    fields = {k: v for k, v in hyp.model_dump().items() if k not in NOT_RECIPE}
    fields["train_images"] = train_images
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_params(hyp: HyperParameters, arrays: Arrays, threads: int) -> dict[str, object]:
    return {
        **hyp.model_dump(),
        "train_images": len(arrays.train_y),
        "test_images": len(arrays.test_y),
        "threads": threads,
    }


def _log_dataset(run: TrackedRun, arrays: Arrays) -> None:
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = arrays.source
    label = source.name if source.tracked else c.UNTRACKED
    dataset = from_numpy(
        arrays.train_x,
        source=source.uri,
        targets=arrays.train_y,
        name=f"MNIST@{label}",
        digest=source.content_hash[:32],
    )
    run.client.log_inputs(
        run.run_id,
        datasets=[
            DatasetInput(
                DatasetEntity(**dataset.to_dict()), [InputTag(MLFLOW_DATASET_CONTEXT, "training")]
            )
        ],
    )


def _log_pictures(run: TrackedRun, arrays: Arrays, result: TrainResult) -> None:
    test = result.test
    for name, fig in (
        ("confusion_matrix.png", plots.confusion_figure(arrays.test_y, test.predicted)),
        ("training_curves.png", plots.curves_figure(result.epochs)),
        (
            "worst_misclassified.png",
            plots.worst_errors_figure(
                arrays.test_x, arrays.test_y, test.predicted, test.confidence
            ),
        ),
    ):
        run.client.log_figure(run.run_id, fig, f"plots/{name}")
        plots.close(fig)


def begin(
    settings: Settings,
    hyp: HyperParameters,
    arrays: Arrays,
    phase: str,
    extra_tags: dict[str, str] | None = None,
) -> TrackedRun:
    """Open the run with its tags, params and dataset."""
    from mlflow.entities import Param

    model_record.signing_key(settings)
    client = mlflow_client(settings)
    exp_id = experiment_id(client, settings.experiment_name)
    tags = {
        **run_tags(settings, arrays.source, phase, pick_device(hyp.device)),
        **(extra_tags or {}),
    }
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    tracked = TrackedRun(
        client,
        run_id,
        f"{settings.mlflow_uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}",
        exp_id,
        phase,
        tags[c.DATA_VERSION_TAG],
    )
    try:
        params = run_params(hyp, arrays, thread_count(hyp))
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        _log_dataset(tracked, arrays)
    except BaseException as exc:
        end(tracked, exc)
        raise
    return tracked


def log_metrics(
    run: TrackedRun, values: dict[str, float], step: int = 0, tags: dict[str, str] | None = None
) -> None:
    """Metrics (and tags) in one request."""
    import time

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    run.client.log_batch(
        run.run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in values.items()],
        tags=[RunTag(k, v) for k, v in (tags or {}).items()],
    )


def fit_logged(
    run: TrackedRun,
    hyp: HyperParameters,
    arrays: Arrays,
    on_epoch: Callable[[EpochMetrics], None] = lambda _m: None,
    on_batch: Callable[[int], None] = lambda _n: None,
) -> Fitted:
    """Train, logging each epoch's metrics to the run as the epoch ends."""

    def log_epoch(metrics: EpochMetrics) -> None:
        log_metrics(
            run,
            {
                "train_loss": metrics.train_loss,
                "train_accuracy": metrics.train_accuracy,
                "val_loss": metrics.val_loss,
                "val_accuracy": metrics.val_accuracy,
                "epoch_seconds": metrics.seconds,
                "images_per_second": metrics.images_per_s,
            },
            metrics.epoch,
        )
        on_epoch(metrics)

    return fit(arrays, hyp, on_epoch=log_epoch, on_batch=on_batch)


def evaluate_logged(
    settings: Settings, run: TrackedRun, fitted: Fitted, arrays: Arrays
) -> TrainResult:
    """Test the model; log test loss and accuracy, the evaluation, the test predictions
    (for the gate) and the pictures to the run."""
    result = score_on_test(fitted, arrays)
    log_metrics(
        run,
        {
            "test_loss": result.test.loss,
            c.TEST_ACCURACY_METRIC: result.test.accuracy,
            "train_seconds": result.train_seconds,
            "temperature": result.temperature,
        },
    )
    _log_pictures(run, arrays, result)
    test = LabelledImages(arrays.test_x, arrays.test_y)
    log_predictions(run.client, run.run_id, test, result.test.predicted)
    _log_evaluation(run, settings, test, result)
    return result


def _log_evaluation(
    run: TrackedRun, settings: Settings, test: LabelledImages, result: TrainResult
) -> None:
    """Per-digit accuracy, calibration and robustness: metrics, and one figure."""
    from mnistops.train import evaluation, robustness

    robust = robustness.cached(
        settings.home / "cache" / "robustness", test.digest, test.images, test.labels
    )
    found = evaluation.report(result.model, result.device, test.labels, result.test, robust)
    log_metrics(run, found.metrics())
    fig = plots.evaluation_figure(found)
    run.client.log_figure(run.run_id, fig, "plots/evaluation.png")
    plots.close(fig)


INTERRUPTIONS = {"KeyboardInterrupt", "SystemExit", "ExternalSignal"}
"""Ctrl-C, SIGTERM, and Prefect's signals to a flow run it cancels or stops"""


def end(run: TrackedRun, error: BaseException | None = None) -> None:
    """Close the run: FINISHED; KILLED when interrupted (Ctrl-C, SIGTERM); FAILED
    otherwise, with the reason as its `error` tag."""
    if error is None:
        run.client.set_terminated(run.run_id, status="FINISHED")
        return
    interrupted = any(kind.__name__ in INTERRUPTIONS for kind in type(error).__mro__)
    message = (
        f"interrupted ({error.__class__.__name__})"
        if interrupted
        else (str(error) or error.__class__.__name__)
    )
    # The server may be what failed: the original error is what the caller must see.
    with contextlib.suppress(Exception):
        run.client.set_tag(run.run_id, c.ERROR_TAG, message[:5000])
    with contextlib.suppress(Exception):
        run.client.set_terminated(run.run_id, status="KILLED" if interrupted else "FAILED")


def end_orphans(settings: Settings, ended: Callable[[str], str | None]) -> list[str]:
    """End the runs left RUNNING by flow runs that are over: `ended(flow_run_id)` gives
    the flow run's final state (CRASHED, CANCELLED, ...) or None while it still runs.
    Each such MLflow run is set KILLED with the reason; returns their ids."""
    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        return []
    running = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status = 'RUNNING' and tags.prefect_flow_run_id != ''",
        max_results=200,
    )
    closed = []
    for run in running:
        state = ended(run.data.tags[c.FLOW_RUN_ID_TAG])
        if state is None:
            continue
        client.set_tag(run.info.run_id, c.ERROR_TAG, f"its flow run ended {state}")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


@dataclass(frozen=True)
class TrainingHooks:
    """What a caller sees of a training as it goes: the run's URL once it exists, each
    batch (how many images) and each finished epoch."""

    on_start: Callable[[str], None] = lambda _url: None
    on_batch: Callable[[int], None] = lambda _n: None
    on_epoch: Callable[[EpochMetrics], None] = lambda _m: None


@dataclass(frozen=True)
class RunRow:
    """One run of the experiment, as the demo's summary and the UI list it."""

    name: str
    status: str
    phase: str
    data_version: str
    model: str
    epochs: str
    test_accuracy: float | None


def experiment_runs(settings: Settings) -> list[RunRow]:
    """The runs of the experiment, oldest first."""
    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000
    )
    return [
        RunRow(
            name=run.info.run_name or run.info.run_id,
            status=run.info.status,
            phase=run.data.tags.get(c.PHASE_TAG, ""),
            data_version=run.data.tags.get(c.DATA_VERSION_TAG, ""),
            model=run.data.params.get("model", ""),
            epochs=run.data.params.get("n_epochs", ""),
            test_accuracy=run.data.metrics.get(c.TEST_ACCURACY_METRIC),
        )
        for run in runs
    ]
