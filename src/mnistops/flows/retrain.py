"""The retraining flow `MNIST`: pull, validate, preprocess, train, evaluate, register.

The flow is part of the installed package: deployments point at it by module path
(`mnistops.flows.retrain.mnist_flow`), so a worker on any machine with mnistops installed and
the stack's variables (`mnistops stack env`) runs it without a shared folder or a copy of
the code. Every step calls the same functions as `mnistops train`.
"""

from __future__ import annotations

import numpy as np
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE
from prefect.runtime import flow_run

from mnistops.clients import library_defaults, mlflow_client
from mnistops.settings import HyperParameters, Settings, load_settings
from mnistops.tracking import runs
from mnistops.tracking.registry import GateDecision
from mnistops.tracking.significance import p_text
from mnistops.train import data, loop

FLOW_TIMEOUT_S = 3 * 3600
SUMMARY_KEY = "mnist-retraining"
"""the key of the markdown artifact a flow run leaves: its result"""


@task(name="Pulling dataset", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def pull_dataset(settings: Settings, data_version: str) -> data.Arrays:
    arrays = data.load_version(settings, data_version, print)
    print(
        f"data version {arrays.source.name}: {len(arrays.train_y)} training and"
        f" {len(arrays.test_y)} test images (content {arrays.source.content_hash[:12]})"
    )
    return arrays


@task(name="Validating dataset", cache_policy=NO_CACHE)
def validate_dataset(arrays: data.Arrays) -> None:
    """What training relies on: 28x28 images, labels 0-9, every class present in both splits."""
    for split, x, y in (
        ("train", arrays.train_x, arrays.train_y),
        ("test", arrays.test_x, arrays.test_y),
    ):
        if x.shape[1:] != (28, 28) or len(x) != len(y):
            raise ValueError(f"{split}: images of shape {x.shape[1:]}, expected 28x28")
        missing = sorted(set(range(10)) - set(np.unique(y).tolist()))
        if missing:
            raise ValueError(f"{split}: no image of digit(s) {missing}")
    print("dataset valid: 28x28 images, every digit in train and test")


@task(name="Preprocessing", cache_policy=NO_CACHE)
def preprocess(arrays: data.Arrays, fast: bool, fraction: float, seed: int) -> data.Arrays:
    if fast:
        arrays = arrays.subset(fraction, seed)
        print(f"fast mode: {len(arrays.train_y)} training images")
    return arrays


@task(name="Model training", cache_policy=NO_CACHE)
def train_model(run: runs.TrackedRun, hyp: HyperParameters, arrays: data.Arrays) -> loop.Fitted:
    def report(m: loop.EpochMetrics) -> None:
        print(
            f"epoch {m.epoch}/{hyp.n_epochs}: loss {m.train_loss:.4f} acc {m.train_accuracy:.4f}"
            f" | val loss {m.val_loss:.4f} acc {m.val_accuracy:.4f} | {m.seconds:.1f}s"
        )

    return runs.fit_logged(run, hyp, arrays, on_epoch=report)


@task(name="Evaluation", cache_policy=NO_CACHE)
def evaluate_model(
    settings: Settings, run: runs.TrackedRun, fitted: loop.Fitted, arrays: data.Arrays
) -> loop.TrainResult:
    result = runs.evaluate_logged(settings, run, fitted, arrays)
    print(f"test accuracy {result.test.accuracy:.4f} (loss {result.test.loss:.4f})")
    return result


@task(name="Registering model", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_model(
    settings: Settings,
    run: runs.TrackedRun,
    hyp: HyperParameters,
    arrays: data.Arrays,
    result: loop.TrainResult,
) -> tuple[str, GateDecision]:
    return runs.register_logged(settings, run, hyp, arrays, result)


def trained_on(settings: Settings, content_hash: str, recipe: str) -> tuple[str | None, str]:
    """(the registered version already trained on this data with this recipe, or None;
    why). A model trained on a share of the data (`--fast`) never counts."""
    from mnistops.tracking.registry import CHALLENGER_TAG, CHAMPION_REASON_TAG, versions

    client = mlflow_client(settings)
    same_data = []
    for version in versions(client, settings.model_registry.name):
        tags = version.tags or {}
        if tags.get("data_content_hash") != content_hash or tags.get(runs.SUBSET_TAG) == "true":
            continue
        if CHAMPION_REASON_TAG not in tags and CHALLENGER_TAG not in tags:
            continue  # registered, but never judged by the gate (an interrupted run)
        if tags.get(CHALLENGER_TAG) == runs.INTERRUPTED_GATE:
            continue
        if tags.get(runs.RECIPE_TAG) == recipe:
            return version.version, (
                f"model version {version.version} was trained on this data"
                f" ({content_hash[:12]}) with this recipe ({recipe})"
            )
        same_data.append(version.version)
    if same_data:
        listed = ", ".join(same_data)
        return None, f"version(s) {listed} learned this data with another recipe than {recipe}"
    return None, f"no registered model was trained on all of this data ({content_hash[:12]})"


def _summary(
    run: runs.TrackedRun, data_version: str, accuracy: float, decision: GateDecision
) -> str:
    state = "**moved** to this model" if decision.moved else "stayed"
    lines = [
        "# MNIST retraining\n",
        "| | |",
        "|---|---|",
        f"| MLflow run | [{run.run_id}]({run.url}) |",
        f"| data version | {data_version} |",
        f"| test accuracy | {accuracy:.2%} |",
        f"| champion | {state}: {decision.reason} |",
    ]
    evidence = decision.evidence
    if evidence is not None:
        lines += [
            f"| compared with | v{decision.previous_version} (the champion then) |",
            f"| p-value | p {p_text(evidence.p_value)} (exact one-sided McNemar) |",
            f"| errors | {evidence.new_errors} (this model) vs {evidence.champion_errors}"
            f" (champion); {evidence.new_only} fixed, {evidence.champion_only} broken |",
            f"| worst digit | {evidence.worst_class}: {evidence.worst_class_change:+.2f} points |",
        ]
    return "\n".join(lines) + "\n"


def flow_run_ended(flow_run_id: str) -> str | None:
    """The final state of a flow run (its name), or None while it is not over."""
    from uuid import UUID

    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except (ObjectNotFound, ValueError):
            return "unknown to Prefect"
    state = run.state
    return state.name if state is not None and state.is_final() else None


def end_own_run(flow, flow_run, state) -> None:  # noqa: ARG001  Prefect passes all three
    """on_crashed / on_cancellation: the MLflow run of this flow run is KILLED, not left
    RUNNING. (A run whose process was killed outright is ended by the next flow run.)"""
    settings = load_settings()
    runs.end_orphans(settings, lambda fid: state.name if fid == str(flow_run.id) else None)


@flow(
    name="MNIST",
    log_prints=True,
    timeout_seconds=FLOW_TIMEOUT_S,
    on_crashed=[end_own_run],
    on_cancellation=[end_own_run],
)
def mnist_flow(
    data_version: str = "latest",
    hyperparameters: dict[str, object] | None = None,
    model: str | None = None,
    n_epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    random_seed: int | None = None,
    val_size: float | None = None,
    device: str | None = None,
    fast: bool = False,
    skip_if_unchanged: bool = False,
) -> dict[str, object]:
    """Retrain on a data version; register the model; move `champion` if it is better.

    `hyperparameters` (set by `mnistops deploy` from its hyp.yml) overrides the worker's
    hyp.yml; `model`, `n_epochs`, ... (hyp.yml's keys) override both.
    `skip_if_unchanged` (scheduled and triggered runs): when a registered model was
    already trained on this very data (the champion, or a challenger that lost to it), say
    so and train nothing.
    """
    library_defaults()
    settings = load_settings()
    hyp = loop.with_overrides(
        settings.hyperparameter,
        hyperparameters,
        {"n_epochs": 1} if fast else None,
        {
            "model": model,
            "n_epochs": n_epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "random_seed": random_seed,
            "val_size": val_size,
            "device": device,
        },
    )
    loop.check_hyperparameters(hyp)
    loop.pick_device(hyp.device)
    runs.check_tracking_server(settings)
    for orphan in runs.end_orphans(settings, flow_run_ended):
        print(f"MLflow run {orphan} of an earlier flow run that ended without it: now KILLED")
    arrays = pull_dataset(settings, data_version)
    if skip_if_unchanged and not fast:
        recipe = runs.recipe_of(hyp, len(arrays.train_y))
        done_before, why = trained_on(settings, arrays.source.content_hash, recipe)
        if done_before is not None:
            message = f"nothing new for {arrays.source.name}: {why}; nothing to do"
            print(message)
            create_markdown_artifact(f"# MNIST retraining\n\nSkipped: {message}.", key=SUMMARY_KEY)
            return {"skipped": True, "reason": message}
        print(f"training: {why}")
    validate_dataset(arrays)
    arrays = preprocess(arrays, fast, settings.dataset.fast_fraction, hyp.random_seed)
    run = runs.begin(
        settings,
        hyp,
        arrays,
        "retraining",
        {"prefect_flow_run_id": str(flow_run.id), "prefect_flow_run_name": str(flow_run.name)},
    )
    print(f"MLflow run: {run.url}")
    try:
        fitted = train_model(run, hyp, arrays)
        result = evaluate_model(settings, run, fitted, arrays)
        version, decision = register_model(settings, run, hyp, arrays, result)
    except BaseException as exc:
        runs.end(run, exc)
        raise
    runs.end(run)
    create_markdown_artifact(
        _summary(run, arrays.source.name, result.test.accuracy, decision),
        key=SUMMARY_KEY,
        description="MNIST retraining result",
    )
    print(
        f"model version {version}: test accuracy {result.test.accuracy:.2%};"
        f" champion {'moved' if decision.moved else 'stayed'} ({decision.reason})"
    )
    return {
        "skipped": False,
        "run_id": run.run_id,
        "model_version": version,
        "test_accuracy": result.test.accuracy,
        "champion_moved": decision.moved,
        "data_version": arrays.source.name,
    }
