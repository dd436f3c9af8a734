"""The retraining flow `MNIST`: pull, validate, preprocess, train, evaluate, register.

The flow is part of the installed package: deployments point at it by module path
(`mnistops.flows.retrain.mnist_flow`), so a worker on any machine with mnistops installed and
the stack's variables (`mnistops stack env`) runs it without a shared folder or a copy of
the code. Every step calls the same functions as `mnistops train`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE
from prefect.runtime import flow_run

from mnistops import pipeline
from mnistops.clients import library_defaults, mlflow_client
from mnistops.errors import BadInput
from mnistops.settings import HyperParameters, Settings, load_settings
from mnistops.tracking import contract as c
from mnistops.tracking.significance import p_text

if TYPE_CHECKING:
    from mnistops.tracking.runs import RunOutcome
    from mnistops.train import data, loop

# Torch and MLflow are imported where the flow run trains, not here: `mnistops deploy`
# and `mnistops run --wait` import this module for the flow's signature and its
# artifact key, and pay seconds of CPU for nothing otherwise.

FLOW_TIMEOUT_S = 3 * 3600
SUMMARY_KEY = "mnist-retraining"
"""the key of the markdown artifact a flow run leaves: its result"""


def worth_retrying(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry what may pass another time (the store or the network failed), never an
    answer that cannot change: a refused or unknown version, a bad parameter."""
    return not isinstance(getattr(state, "data", None), BadInput)


@task(
    name="Pulling dataset",
    retries=3,
    retry_delay_seconds=[2, 5, 10],
    retry_condition_fn=worth_retrying,
    cache_policy=NO_CACHE,
)
def pull_dataset(settings: Settings, data_version: str) -> data.Arrays:
    arrays = pipeline.load_data(settings, data_version, report=print)
    print(
        f"data version {arrays.source.name}: {len(arrays.train_y)} training and"
        f" {len(arrays.test_y)} test images (content {arrays.source.content_hash[:12]})"
    )
    return arrays


@task(name="Validating dataset", cache_policy=NO_CACHE)
def validate_dataset(arrays: data.Arrays) -> None:
    pipeline.validate(arrays)
    print("dataset valid: 28x28 images, every digit in train and test")


@task(name="Preprocessing", cache_policy=NO_CACHE)
def preprocess(
    settings: Settings, arrays: data.Arrays, fast: bool, hyp: HyperParameters
) -> data.Arrays:
    arrays = pipeline.preprocess(settings, arrays, fast, hyp)
    if fast:
        print(f"fast mode: {len(arrays.train_y)} training images")
    return arrays


RETRIES = {"Registering model": 2}
"""the training steps that Prefect tries again (registering is safe to retry)"""


def as_task(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A step of `pipeline.train` as a Prefect task of this flow run."""
    wrap = task(
        name=name,
        cache_policy=NO_CACHE,
        retries=RETRIES.get(name, 0),
        retry_delay_seconds=5,
        retry_condition_fn=worth_retrying,
    )
    return wrap(function)


def print_epoch(hyp: HyperParameters) -> Callable[[loop.EpochMetrics], None]:
    def report(m: loop.EpochMetrics) -> None:
        print(
            f"epoch {m.epoch}/{hyp.n_epochs}: loss {m.train_loss:.4f} acc {m.train_accuracy:.4f}"
            f" | val loss {m.val_loss:.4f} acc {m.val_accuracy:.4f} | {m.seconds:.1f}s"
        )

    return report


def trained_on(
    settings: Settings, content_hash: str, recipe: str, any_recipe: bool = False
) -> tuple[str | None, str]:
    """(the registered version already trained on this data with this recipe, or with
    any recipe when `any_recipe`, or None; why). A model trained on a share of the data
    (`--fast`) never counts."""
    from mnistops.tracking import registration
    from mnistops.tracking.registry import versions

    client = mlflow_client(settings)
    same_data = []
    for version in versions(client, settings.model_registry.name):
        tags = version.tags or {}
        if tags.get(c.DATA_HASH_TAG) != content_hash or tags.get(c.SUBSET_TAG) == "true":
            continue
        if c.CHAMPION_REASON_TAG not in tags and c.CHALLENGER_TAG not in tags:
            continue  # registered, but never judged by the gate (an interrupted run)
        if tags.get(c.CHALLENGER_TAG) in registration.UNJUDGED:
            continue
        if any_recipe or tags.get(c.RECIPE_TAG) == recipe:
            which = "a recipe" if any_recipe else f"this recipe ({recipe})"
            return version.version, (
                f"model version {version.version} was trained on this data"
                f" ({content_hash[:12]}) with {which}"
            )
        same_data.append(version.version)
    if same_data:
        listed = ", ".join(same_data)
        return None, f"version(s) {listed} learned this data with another recipe than {recipe}"
    return None, f"no registered model was trained on all of this data ({content_hash[:12]})"


def _summary(outcome: RunOutcome, started_by: str) -> str:
    decision = outcome.decision
    state = "**moved** to this model" if decision.moved else "stayed"
    lines = [
        "# MNIST retraining\n",
        "| | |",
        "|---|---|",
        f"| MLflow run | [{outcome.run_id}]({outcome.run_url}) |",
        f"| data version | {outcome.data.name} |",
        f"| started by | {started_by} |",
        f"| test accuracy | {outcome.test_accuracy:.2%} |",
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


def end_own_run(flow: Any, flow_run: Any, state: Any) -> None:
    """on_crashed / on_cancellation: the MLflow run of this flow run is KILLED, not left
    RUNNING. (A run whose process was killed outright is ended by the next flow run.)"""
    from mnistops.tracking import runs

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
    any_recipe: bool = False,
    started_by: str = "hand",
) -> dict[str, object]:
    """Retrain on a data version; register the model; move `champion` if it is better.

    `hyperparameters` (set by `mnistops deploy` from its hyp.yml) overrides the worker's
    hyp.yml; `model`, `n_epochs`, ... (hyp.yml's keys) override both.
    `skip_if_unchanged` (scheduled and triggered runs): when a registered model was
    already trained on this very data (the champion, or a challenger that lost to it), say
    so and train nothing; with `any_recipe` (the drift trigger's runs), a model trained on
    this data with any recipe counts. `started_by` says why the run exists: by hand (a Quick run,
    `mnistops run`), the schedule, or the publication of the version it trains (the
    deployment's trigger passes the event's tag as `data_version`).
    """
    from mnistops.tracking import runs

    library_defaults()
    settings = load_settings()
    parameters = {
        "model": model,
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "random_seed": random_seed,
        "val_size": val_size,
        "device": device,
    }
    hyp = pipeline.hyperparameters(
        settings,
        pipeline.Layer(hyperparameters, lambda f: f"the deployment's hyperparameters.{f}"),
        pipeline.fast_recipe(fast, "the flow run's parameter fast"),
        pipeline.Layer(parameters, lambda f: f"the flow run's parameter {f}"),
    )
    pipeline.check_ready(settings, hyp)
    for orphan in runs.end_orphans(settings, flow_run_ended):
        print(f"MLflow run {orphan} of an earlier flow run that ended without it: now KILLED")
    arrays = pull_dataset(settings, data_version)
    if data_version == "latest":
        started_by = f"{started_by}, on the newest version (latest)"
    print(f"training data version {arrays.source.name}, started by {started_by}")
    if skip_if_unchanged and not fast:
        recipe = runs.recipe_of(hyp, len(arrays.train_y))
        done_before, why = trained_on(settings, arrays.source.content_hash, recipe, any_recipe)
        if done_before is not None:
            message = (
                f"nothing new for {arrays.source.name} (started by {started_by}): {why};"
                " nothing to do"
            )
            print(message)
            create_markdown_artifact(f"# MNIST retraining\n\nSkipped: {message}.", key=SUMMARY_KEY)
            return {"skipped": True, "reason": message}
        print(f"training: {why}")
    validate_dataset(arrays)
    arrays = preprocess(settings, arrays, fast, hyp)
    tags = {c.FLOW_RUN_ID_TAG: str(flow_run.id), c.FLOW_RUN_NAME_TAG: str(flow_run.name)}
    hooks = runs.TrainingHooks(
        on_start=lambda url: print(f"MLflow run: {url}"), on_epoch=print_epoch(hyp)
    )
    outcome = pipeline.train(settings, hyp, arrays, c.RETRAINING, tags, hooks, as_task)
    create_markdown_artifact(
        _summary(outcome, started_by), key=SUMMARY_KEY, description="MNIST retraining result"
    )
    decision = outcome.decision
    print(
        f"model version {outcome.model_version}: test accuracy {outcome.test_accuracy:.2%};"
        f" champion {'moved' if decision.moved else 'stayed'} ({decision.reason})"
    )
    return {
        "skipped": False,
        "run_id": outcome.run_id,
        "model_version": outcome.model_version,
        "test_accuracy": outcome.test_accuracy,
        "champion_moved": decision.moved,
        "data_version": outcome.data.name,
        "started_by": started_by,
    }
