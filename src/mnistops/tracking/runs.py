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
from typing import Any

import numpy as np
from mlflow import MlflowClient

from mnistops.clients import mlflow_client, mlflow_module_functions, model_signing_key
from mnistops.errors import BadInput, Interrupted
from mnistops.settings import HyperParameters, Settings
from mnistops.tracking import model_files, plots
from mnistops.tracking.predictions import LabelledImages, champion_predictions, log_predictions
from mnistops.tracking.registry import ACCURACY_TAG, Candidate, GateDecision, GateRules, register
from mnistops.tracking.server import TrackingError, check_tracking_server
from mnistops.train.data import Arrays, DataSource
from mnistops.train.loop import (
    EpochMetrics,
    Fitted,
    TrainingError,
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


def _log_dataset(run: TrackedRun, arrays: Arrays) -> None:
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = arrays.source
    label = source.name if source.tracked else "untracked"
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
                dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "training")]
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


def _log_model(
    settings: Settings, run: TrackedRun, hyp: HyperParameters, result: TrainResult, arrays: Arrays
) -> Any:
    """MLflow's PyTorch model (an exported `pt2` archive, for MLflow's own tools) with
    mnistops' format beside it: the weights as plain arrays and the architecture's name
    (`tracking.model_files`), the only thing mnistops ever loads."""
    import tempfile

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
    with (
        tempfile.TemporaryDirectory(prefix="weights-") as tmp,
        mlflow_module_functions(settings),
    ):
        weights = model_files.save_weights(model, Path(tmp))
        return mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            run_id=run.run_id,
            serialization_format="pt2",
            extra_files=[str(weights)],
            metadata=model_files.metadata(hyp.model),
        )


def signing_key(settings: Settings) -> bytes:
    """The key that signs what this run registers; BadInput before any work without one."""
    key = model_signing_key(settings)
    if key is None:
        raise BadInput(model_files.no_key_message(settings.where("model_registry.signing_key")))
    return key


def model_record(client: MlflowClient, model_uri: str, key: bytes) -> dict[str, str]:
    """The signed file record of a logged model, made from its files as the server
    stores them (downloaded back), after checking they are in mnistops' format."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="model-record-") as tmp:
        folder = model_files.download(client, model_uri, Path(tmp))
        record = model_files.file_record(folder)
        model_files.check_format(folder)
    return model_files.record_tags(key, record)


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""without it, MLflow 3's UI opens an experiment on its GenAI pages, not on its runs"""


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id (made if missing), marked as one of model training."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name)
        except MlflowException as exc:  # made by another process just now
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise TrackingError(f"the experiment '{name}' could not be created")
    key, kind = EXPERIMENT_KIND
    if (experiment.tags or {}).get(key) != kind:
        client.set_experiment_tag(experiment.experiment_id, key, kind)
    return str(experiment.experiment_id)


def begin(
    settings: Settings,
    hyp: HyperParameters,
    arrays: Arrays,
    phase: str,
    extra_tags: dict[str, str] | None = None,
) -> TrackedRun:
    """Open the run with its tags, params and dataset."""
    from mlflow.entities import Param

    signing_key(settings)
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
        tags["data_version"],
    )
    try:
        params = run_params(hyp, arrays, thread_count(hyp))
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        _log_dataset(tracked, arrays)
    except BaseException as exc:
        end(tracked, exc)
        raise
    return tracked


def _log_metrics(run: TrackedRun, values: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    run.client.log_batch(
        run.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()]
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
        _log_metrics(
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
    _log_metrics(
        run,
        {
            "test_loss": result.test.loss,
            "test_accuracy": result.test.accuracy,
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
    _log_metrics(run, found.metrics())
    fig = plots.evaluation_figure(found)
    run.client.log_figure(run.run_id, fig, "plots/evaluation.png")
    plots.close(fig)


def _logged_model_of(run: TrackedRun) -> str | None:
    """The URI of the model this run logged already (a retried registration), if any."""
    found = run.client.search_logged_models(
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
    from mnistops.stack.locks import champion_lock_name, held

    name = settings.model_registry.name
    rules = settings.model_registry
    test = LabelledImages(arrays.test_x, arrays.test_y)
    key = signing_key(settings)
    candidate = Candidate(
        arrays.test_y,
        result.test.predicted,
        champion_predictions(
            run.client, test, lambda v: model_files.load_registered(run.client, v, key)
        ),
        key,
    )
    model_uri = _logged_model_of(run) or _log_model(settings, run, hyp, result, arrays).model_uri
    record = model_record(run.client, model_uri, key)
    run.client.set_tag(run.run_id, model_files.FILES_TAG, record[model_files.FILES_TAG])
    version, decision = register(
        run.client,
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
            **record,
        },
        candidate,
        GateRules(rules.significance, rules.max_class_drop, rules.champion_margin),
        lambda: held(settings, champion_lock_name(name)),
    )
    _log_decision(run, version.version, decision)
    return version.version, decision


def _log_decision(run: TrackedRun, version: str, decision: GateDecision) -> None:
    """The gate's decision and evidence on the run too, where the MLflow UI shows them."""
    from mnistops.tracking.registry import evidence_tags

    tags = {
        "model_version": version,
        "champion_moved": str(decision.moved).lower(),
        "gate_reason": decision.reason[:5000],
    }
    if decision.evidence is not None and decision.previous_version is not None:
        evidence = decision.evidence
        tags.update(evidence_tags(decision.previous_version, evidence))
        _log_metrics(
            run,
            {
                "gate_p_value": evidence.p_value,
                "gate_worst_class_change": evidence.worst_class_change,
            },
        )
    for key, value in tags.items():
        run.client.set_tag(run.run_id, key, value)


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
        run.client.set_tag(run.run_id, "error", message[:5000])
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
        state = ended(run.data.tags["prefect_flow_run_id"])
        if state is None:
            continue
        client.set_tag(run.info.run_id, "error", f"its flow run ended {state}")
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


def train_and_track(
    settings: Settings,
    hyp: HyperParameters,
    arrays: Arrays,
    phase: str,
    extra_tags: dict[str, str] | None = None,
    hooks: TrainingHooks | None = None,
) -> RunOutcome:
    """Train, log everything to one MLflow run, register the model, apply the champion gate.

    A failure marks the run FAILED with the reason as its `error` tag (KILLED when
    interrupted); nothing is then registered and `champion` does not move. The error
    raised says so: `Interrupted` for Ctrl-C and SIGTERM, `TrainingError` for a training
    that failed, `TrackingError` for a server that failed.
    """
    hooks = hooks or TrainingHooks()
    run = begin(settings, hyp, arrays, phase, extra_tags)
    try:
        hooks.on_start(run.url)
        fitted = fit_logged(run, hyp, arrays, hooks.on_epoch, hooks.on_batch)
        result = evaluate_logged(settings, run, fitted, arrays)
        version, decision = register_logged(settings, run, hyp, arrays, result)
    except (KeyboardInterrupt, SystemExit) as exc:
        end(run, exc)
        raise Interrupted(f"interrupted: {_settle_interrupted(settings, run)}") from None
    except TrainingError as exc:
        end(run, exc)
        raise TrainingError(f"{exc}; the run is marked FAILED, nothing was registered") from None
    except Exception as exc:
        end(run, exc)
        raise _failure(settings, exc) from None
    end(run)
    return RunOutcome(
        run.run_id, run.url, run.experiment_id, version, decision, arrays.source, result
    )


def _failure(settings: Settings, exc: Exception) -> TrackingError:
    """What to tell about a training that failed outside the training loop: a server that
    went away, or the error itself."""
    try:
        check_tracking_server(settings)
    except TrackingError as down:
        return TrackingError(
            f"training stopped: {down}. Nothing was registered and champion did not"
            " move; the run stays RUNNING in MLflow. Start the server again and re-run."
        )
    return TrackingError(
        f"training failed: {exc.__class__.__name__}: {exc}; the run is marked FAILED,"
        " nothing was registered"
    )


INTERRUPTED_GATE = "its training was interrupted before the champion gate decided"


def _settle_interrupted(settings: Settings, run: TrackedRun) -> str:
    """After Ctrl-C: what became of the run's model. A version registered but not yet
    through the gate is marked a challenger that never counted (a scheduled run does
    not skip because of it). Returns a sentence for the user."""

    from mnistops.tracking.registry import (
        CHALLENGER_TAG,
        CHAMPION_REASON_TAG,
        champion,
        version_of_run,
    )

    name = settings.model_registry.name
    try:
        client = mlflow_client(settings)
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
            phase=run.data.tags.get("phase", ""),
            data_version=run.data.tags.get("data_version", ""),
            model=run.data.params.get("model", ""),
            epochs=run.data.params.get("n_epochs", ""),
            test_accuracy=run.data.metrics.get("test_accuracy"),
        )
        for run in runs
    ]
