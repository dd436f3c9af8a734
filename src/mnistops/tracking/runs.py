"""A tracked training run: what `mnistops train` and the retraining flow both call.

Everything that can be refused is checked before an MLflow run exists (hyperparameters,
model, device, the tracking server, the data version). Then one run in the experiment
gets tags, params, the dataset as an input, per-epoch metrics, test metrics, pictures
and the model; only a fully logged model is registered, and the champion gate runs last.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnistops.settings import HyperParameters, Settings
from mnistops.tracking import plots
from mnistops.tracking.registry import ACCURACY_TAG, GateDecision, register
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

# Fail within seconds, not minutes, when the tracking server is gone (MLflow's default
# retries back off for over a minute). A user's own values win.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(Exception):
    """The tracking server or registry failed; the message says which and what to do."""


@dataclass(frozen=True)
class TrackedRun:
    """An open MLflow run of a training: what the later steps need to log into it."""

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


def check_tracking_server(settings: Settings, timeout_s: float = 5.0) -> None:
    """A clear error, quickly, when the MLflow server cannot be reached or refuses our
    login. Also hands the login (if any) to MLflow's client, which reads it from the
    environment."""
    import httpx

    from mnistops.stack.endpoints import mlflow_login, mlflow_login_env

    uri = settings.mlflow_uri
    if not uri.startswith(("http://", "https://")):
        return
    os.environ.update(mlflow_login_env(settings))
    login = mlflow_login(settings)
    try:
        response = httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
        if response.status_code == 200:
            response = httpx.get(
                f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                params={"max_results": 1},
                auth=login,
                timeout=timeout_s,
            )
    except httpx.HTTPError as exc:
        raise TrackingError(
            f"the MLflow server at {uri} cannot be reached ({exc.__class__.__name__});"
            " start the stack (`mnistops stack up`) or set mlflow.tracking_uri"
        ) from None
    if response.status_code in (401, 403):
        raise TrackingError(
            f"the MLflow server at {uri} refused "
            + ("our login" if login else "a request without a login")
            + ": set mlflow.username and mlflow.password (MNISTOPS_MLFLOW__USERNAME,"
            " MNISTOPS_MLFLOW__PASSWORD); for a mnistops stack, `mnistops stack env` prints them"
        )
    if response.status_code != 200:
        raise TrackingError(f"the MLflow server at {uri} answered {response.status_code}")


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
        "phase": phase,
        "device": device,
        "data_version": source.name if source.tracked else "untracked",
        "data_content_hash": source.content_hash,
        "data_tracked": str(source.tracked).lower(),
        "mnistops_version": package_version(),
        "user": user,
        "mlflow.user": user,
    }
    if not source.tracked:
        tags["data_folder"] = source.name
    if source.commit:
        tags["data_registry_commit"] = source.commit
    commit = code_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["code_commit"] = commit
    return tags


RECIPE_TAG = "recipe"
SUBSET_TAG = "data_subset"
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


def _log_dataset(arrays: Arrays) -> None:
    import mlflow

    source = arrays.source
    label = source.name if source.tracked else "untracked"
    dataset = mlflow.data.from_numpy(
        arrays.train_x,
        source=source.uri,
        targets=arrays.train_y,
        name=f"MNIST@{label}",
        digest=source.content_hash[:32],
    )
    mlflow.log_input(dataset, context="training")


def _log_pictures(arrays: Arrays, result: TrainResult) -> None:
    import mlflow

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
        mlflow.log_figure(fig, f"plots/{name}")
        plots.close(fig)


def _log_model(result: TrainResult, arrays: Arrays):
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )
    example = (arrays.test_x[:2].astype(np.float32) / 255.0)[:, None]
    model = result.model.to("cpu")
    return mlflow.pytorch.log_model(
        model,
        name="model",
        signature=signature,
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
    )


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""without it, MLflow 3's UI opens an experiment on its GenAI pages, not on its runs"""


def experiment_id(settings: Settings) -> str:
    """The experiment's id (made if missing), marked as one of model training."""
    import mlflow

    experiment = mlflow.set_experiment(settings.experiment_name)
    key, kind = EXPERIMENT_KIND
    if (experiment.tags or {}).get(key) != kind:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, kind)
    return experiment.experiment_id


def begin(
    settings: Settings,
    hyp: HyperParameters,
    arrays: Arrays,
    phase: str,
    extra_tags: dict[str, str] | None = None,
) -> TrackedRun:
    """Open the run (it stays the active MLflow run) with its tags, params and dataset."""
    import mlflow

    for key, value in MLFLOW_CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(settings.mlflow_uri)
    exp_id = experiment_id(settings)
    tags = {
        **run_tags(settings, arrays.source, phase, pick_device(hyp.device)),
        **(extra_tags or {}),
    }
    run = mlflow.start_run(experiment_id=exp_id, tags=tags)
    run_id = run.info.run_id
    tracked = TrackedRun(
        run_id,
        f"{settings.mlflow_uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}",
        exp_id,
        phase,
        tags["data_version"],
    )
    try:
        mlflow.log_params(run_params(hyp, arrays, thread_count(hyp)))
        _log_dataset(arrays)
    except BaseException as exc:
        end(exc)
        raise
    return tracked


def fit_logged(
    hyp: HyperParameters,
    arrays: Arrays,
    on_epoch: Callable[[EpochMetrics], None] = lambda _m: None,
    on_batch: Callable[[int], None] = lambda _n: None,
) -> Fitted:
    """Train in the active run, logging each epoch's metrics as it ends."""
    import mlflow

    def log_epoch(metrics: EpochMetrics) -> None:
        mlflow.log_metrics(
            {
                "train_loss": metrics.train_loss,
                "train_accuracy": metrics.train_accuracy,
                "val_loss": metrics.val_loss,
                "val_accuracy": metrics.val_accuracy,
                "epoch_seconds": metrics.seconds,
                "images_per_second": metrics.images_per_s,
            },
            step=metrics.epoch,
        )
        on_epoch(metrics)

    return fit(arrays, hyp, on_epoch=log_epoch, on_batch=on_batch)


def evaluate_logged(fitted: Fitted, arrays: Arrays) -> TrainResult:
    """Test the model; log test loss and accuracy and the pictures to the active run."""
    import mlflow

    result = score_on_test(fitted, arrays)
    mlflow.log_metrics(
        {
            "test_loss": result.test.loss,
            "test_accuracy": result.test.accuracy,
            "train_seconds": result.train_seconds,
        }
    )
    _log_pictures(arrays, result)
    return result


def _logged_model_of(client, run: TrackedRun) -> str | None:
    """The URI of the model this run logged already (a retried registration), if any."""
    found = client.search_logged_models(
        experiment_ids=[run.experiment_id], filter_string=f"source_run_id = '{run.run_id}'"
    )
    ready = [m for m in found if str(m.status).upper().endswith("READY")]
    return ready[0].model_uri if ready else None


def register_logged(
    settings: Settings, run: TrackedRun, hyp: HyperParameters, arrays: Arrays, result: TrainResult
) -> tuple[str, GateDecision]:
    """Log the model, register it as a new version, apply the champion gate.

    Safe to retry (the flow's task does): a model already logged by this run is reused,
    and a version already registered from it is finished, not registered again.
    """
    import mlflow
    from mlflow import MlflowClient

    from mnistops.stack.locks import champion_lock_name, held

    client = MlflowClient()
    name = settings.model_registry.name
    model_uri = _logged_model_of(client, run) or _log_model(result, arrays).model_uri
    version, decision = register(
        client,
        name,
        model_uri,
        {
            ACCURACY_TAG: f"{result.test.accuracy:.6f}",
            "data_version": run.data_version,
            "data_content_hash": arrays.source.content_hash,
            "phase": run.phase,
            "run_id": run.run_id,
            "model": hyp.model,
            RECIPE_TAG: recipe_of(hyp, len(arrays.train_y)),
            SUBSET_TAG: str(arrays.subset_of is not None).lower(),
        },
        settings.model_registry.champion_margin,
        lambda: held(settings, champion_lock_name(name)),
    )
    mlflow.set_tags(
        {"model_version": version.version, "champion_moved": str(decision.moved).lower()}
    )
    return version.version, decision


INTERRUPTIONS = {"KeyboardInterrupt", "SystemExit", "ExternalSignal"}
"""Ctrl-C, SIGTERM, and Prefect's signals to a flow run it cancels or stops"""


def end(error: BaseException | None = None) -> None:
    """Close the active run: FINISHED; KILLED when interrupted (Ctrl-C, SIGTERM); FAILED
    otherwise, with the reason as its `error` tag."""
    import mlflow

    if error is None:
        mlflow.end_run()
        return
    interrupted = any(kind.__name__ in INTERRUPTIONS for kind in type(error).__mro__)
    message = (
        f"interrupted ({error.__class__.__name__})"
        if interrupted
        else (str(error) or error.__class__.__name__)
    )
    # The server may be what failed: the original error is what the caller must see.
    with contextlib.suppress(Exception):
        mlflow.set_tag("error", message[:5000])
    with contextlib.suppress(Exception):
        mlflow.end_run(status="KILLED" if interrupted else "FAILED")


def end_orphans(settings: Settings, ended: Callable[[str], str | None]) -> list[str]:
    """End the runs left RUNNING by flow runs that are over: `ended(flow_run_id)` gives
    the flow run's final state (CRASHED, CANCELLED, ...) or None while it still runs.
    Each such MLflow run is set KILLED with the reason; returns their ids."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_uri)
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
        state = ended(run.data.tags["prefect_flow_run_id"])
        if state is None:
            continue
        client.set_tag(run.info.run_id, "error", f"its flow run ended {state}")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def train_and_track(
    settings: Settings,
    hyp: HyperParameters,
    arrays: Arrays,
    phase: str,
    extra_tags: dict[str, str] | None = None,
    on_epoch: Callable[[EpochMetrics], None] = lambda _m: None,
    on_batch: Callable[[int], None] = lambda _n: None,
    on_start: Callable[[str], None] = lambda _url: None,
) -> RunOutcome:
    """Train, log everything to one MLflow run, register the model, apply the champion gate.

    A failure marks the run FAILED with the reason as its `error` tag; nothing is then
    registered and `champion` does not move.
    """
    run = begin(settings, hyp, arrays, phase, extra_tags)
    on_start(run.url)
    try:
        fitted = fit_logged(hyp, arrays, on_epoch, on_batch)
        result = evaluate_logged(fitted, arrays)
        version, decision = register_logged(settings, run, hyp, arrays, result)
    except (KeyboardInterrupt, SystemExit) as exc:
        end(exc)
        raise KeyboardInterrupt(_settle_interrupted(settings, run)) from None
    except BaseException as exc:
        end(exc)
        raise
    end()
    return RunOutcome(
        run.run_id, run.url, run.experiment_id, version, decision, arrays.source, result
    )


INTERRUPTED_GATE = "its training was interrupted before the champion gate decided"


def _settle_interrupted(settings: Settings, run: TrackedRun) -> str:
    """After Ctrl-C: what became of the run's model. A version registered but not yet
    through the gate is marked a challenger that never counted (a scheduled run does
    not skip because of it). Returns a sentence for the user."""
    from mlflow import MlflowClient

    from mnistops.tracking.registry import (
        CHALLENGER_TAG,
        CHAMPION_REASON_TAG,
        champion,
        version_of_run,
    )

    name = settings.model_registry.name
    try:
        client = MlflowClient(settings.mlflow_uri)
        version = version_of_run(client, name, run.run_id)
        if version is None:
            return "the run is marked KILLED, nothing was registered"
        tags = version.tags or {}
        if CHAMPION_REASON_TAG not in tags and CHALLENGER_TAG not in tags:
            client.set_model_version_tag(name, version.version, CHALLENGER_TAG, INTERRUPTED_GATE)
            return (
                f"the run is marked KILLED; model version {version.version} was registered"
                " but not judged by the champion gate (tagged so), champion did not move"
            )
        current = champion(client, name)
        moved = current is not None and current.version == version.version
        return f"the run is marked KILLED; model version {version.version} was registered and" + (
            " is champion" if moved else " is a challenger"
        )
    except Exception:  # noqa: BLE001  the server may be what failed
        return "the run is marked KILLED; whether its model was registered is unknown"


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
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_uri)
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
            phase=run.data.tags.get("phase", ""),
            data_version=run.data.tags.get("data_version", ""),
            model=run.data.params.get("model", ""),
            epochs=run.data.params.get("n_epochs", ""),
            test_accuracy=run.data.metrics.get("test_accuracy"),
        )
        for run in runs
    ]
