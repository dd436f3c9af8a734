"""The one training pipeline: what `mnistops train`, the demo and the retraining flow run.

Each step is a plain function. `mnistops train` and the demo call them in turn; the
Prefect flow `MNIST` wraps the same functions as tasks (`train`'s `step` argument, and
its own tasks around `load_data`, `validate` and `preprocess`), the way Prefect's own
examples keep the logic in plain functions:

1. `hyperparameters`: hyp.yml < the deployment's < the run's parameters < the command's
   options, validated once; an error names where the bad value came from;
2. `check_ready`: the device exists and the tracking server answers (before any work);
3. `load_data` (a published version, or a plain folder), `validate`, `preprocess`;
4. `train`: an MLflow run is begun, the model fitted, evaluated, registered and judged by
   the champion gate, the run ended. A failure ends the run FAILED (KILLED when
   interrupted) and raises one error that says what became of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from mnistops.errors import BadInput, Interrupted, MnistopsError, as_bad_input
from mnistops.settings import HyperParameters, Settings
from mnistops.train.architecture import unknown_model

if TYPE_CHECKING:
    from mnistops.tracking.runs import RunOutcome, TrainingHooks
    from mnistops.train import data

# The steps import torch, MLflow and the gate where they run: `mnistops run` and the
# flow's parameter checks call `hyperparameters` alone, and should not pay seconds of
# imports for it.

T = TypeVar("T")
Report = Callable[[str], None]
Step = Callable[[str, Callable[..., Any]], Callable[..., Any]]
"""wraps a step by name (the flow makes each a Prefect task); the CLI runs it as it is"""


def as_it_is(_name: str, function: Callable[..., T]) -> Callable[..., T]:
    return function


@dataclass(frozen=True)
class Layer:
    """Hyperparameter values from one place, and how to name one of them in an error."""

    values: Mapping[str, object] | None
    where: Callable[[str], str]


FAST_EPOCHS = 1
"""what `--fast` (and the flow's parameter `fast`) trains for"""


def fast_recipe(fast: bool, where: str) -> Layer:
    """What `fast` means for the recipe: FAST_EPOCHS, a layer below the values given
    explicitly."""
    return Layer({"n_epochs": FAST_EPOCHS} if fast else None, lambda _field: where)


class DataInvalid(BadInput):
    """The arrays of a version are not what training needs; the message says what."""


def hyperparameters(settings: Settings, *layers: Layer) -> HyperParameters:
    """hyp.yml's values (`settings.hyperparameter`) with each layer on top (None values
    ignored), validated. BadInput names where each bad value came from: the option, the
    parameter, or the key of hyp.yml."""
    from pydantic import ValidationError

    merged = settings.hyperparameter.model_dump()
    source: dict[str, Callable[[str], str]] = {}
    for layer in layers:
        for key, value in (layer.values or {}).items():
            if value is not None:
                merged[key] = value
                source[key] = layer.where

    def where(field: str) -> str:
        found = source.get(field)
        return found(field) if found else settings.where(f"hyperparameter.{field}")

    try:
        hyp = HyperParameters(**merged)
    except ValidationError as exc:
        lines = [
            f"{where(str(error['loc'][0]))}: {error['msg']}" if error["loc"] else str(error["msg"])
            for error in exc.errors()
        ]
        raise BadInput("invalid hyperparameters:\n  " + "\n  ".join(lines)) from None
    why = unknown_model(hyp.model)
    if why:
        raise BadInput(f"{where('model')}: {why}")
    return hyp


def check_ready(settings: Settings, hyp: HyperParameters) -> None:
    """The device exists (else bad input), the tracking server answers, and so does the
    server of the champion gate's lock (with our login)."""
    from mnistops.stack.locks import champion_lock_name, check_reachable
    from mnistops.tracking.server import check_tracking_server
    from mnistops.train.loop import pick_device

    try:
        pick_device(hyp.device)
    except MnistopsError as exc:
        raise as_bad_input(exc) from None
    check_tracking_server(settings)
    check_reachable(settings, champion_lock_name(settings.model_registry.name))


def load_data(
    settings: Settings,
    data_version: str | None = None,
    data_dir: Path | None = None,
    report: Report = lambda _m: None,
) -> data.Arrays:
    """The arrays of a published version ('latest' by default) or of a plain folder."""
    from mnistops.train import data

    if data_dir is not None and data_version is not None:
        raise BadInput("--data-version and --data-dir exclude each other")
    if data_dir is not None:
        return data.load_folder(settings, data_dir, report)
    return data.load_version(settings, data_version or "latest", report)


def validate(arrays: data.Arrays) -> None:
    """What training relies on: 28x28 images, labels 0-9, every digit in both splits."""
    for split, x, y in (
        ("train", arrays.train_x, arrays.train_y),
        ("test", arrays.test_x, arrays.test_y),
    ):
        if x.shape[1:] != (28, 28) or len(x) != len(y):
            raise DataInvalid(f"{split}: images of shape {x.shape[1:]}, expected 28x28")
        missing = sorted(set(range(10)) - set(np.unique(y).tolist()))
        if missing:
            raise DataInvalid(f"{split}: no image of digit(s) {missing}")


def preprocess(
    settings: Settings, arrays: data.Arrays, fast: bool, hyp: HyperParameters
) -> data.Arrays:
    """`--fast`: a share of the training images (the same for the same seed)."""
    return arrays.subset(settings.dataset.fast_fraction, hyp.random_seed) if fast else arrays


def prepare(
    settings: Settings,
    hyp: HyperParameters,
    data_version: str | None = None,
    data_dir: Path | None = None,
    fast: bool = False,
    report: Report = lambda _m: None,
) -> data.Arrays:
    """Steps 2 and 3 in one call (what `mnistops train` and the demo run; the flow runs
    the same functions as tasks): ready, data loaded, validated and preprocessed."""
    check_ready(settings, hyp)
    arrays = load_data(settings, data_version, data_dir, report)
    validate(arrays)
    return preprocess(settings, arrays, fast, hyp)


def train(
    settings: Settings,
    hyp: HyperParameters,
    arrays: data.Arrays,
    phase: str,
    extra_tags: dict[str, str] | None = None,
    hooks: TrainingHooks | None = None,
    step: Step = as_it_is,
) -> RunOutcome:
    """Train, log everything to one MLflow run, register the model, apply the champion gate.

    A failure marks the run FAILED with the reason as its `error` tag (KILLED when
    interrupted; left RUNNING when the server went away, which one quick probe tells:
    marking it would only wait out the client's retries); nothing is then registered
    and `champion` does not move. The error raised says so: `Interrupted` for Ctrl-C and
    SIGTERM, `TrainingError` for a training that failed, `TrackingError` for a server
    that failed (a model registered before that, its gate undecided, is named).
    """
    from mnistops.tracking import registration, runs
    from mnistops.tracking.server import TrackingError
    from mnistops.train.loop import TrainingError

    hooks = hooks or runs.TrainingHooks()
    run = runs.begin(settings, hyp, arrays, phase, extra_tags)
    try:
        hooks.on_start(run.url)
        fitted = step("Model training", runs.fit_logged)(
            run, hyp, arrays, hooks.on_epoch, hooks.on_batch
        )
        result = step("Evaluation", runs.evaluate_logged)(settings, run, fitted, arrays)
        version, decision = step("Registering model", registration.register_logged)(
            settings, run, hyp, arrays, result
        )
    except (KeyboardInterrupt, SystemExit) as exc:
        runs.end(run, exc)
        settled = registration.settle_interrupted(settings, run)
        raise Interrupted(f"interrupted: {settled}") from None
    except TrainingError as exc:
        runs.end(run, exc)
        raise TrainingError(f"{exc}; the run is marked FAILED, nothing was registered") from None
    except Exception as exc:  # noqa: BLE001  any other failure: the run ends, one message
        down = _server_down(settings)
        if down is not None:
            # Marking the run would only wait out the client's retries twice more.
            raise down from None
        runs.end(run, exc)
        settled = registration.settle_failed(settings, run)
        why = f"{exc.__class__.__name__}: {exc}"
        raise TrackingError(f"training failed: {why}; {settled}") from None
    except BaseException as exc:  # a flow run cancelled or crashed: its signal goes on
        runs.end(run, exc)
        raise
    runs.end(run)
    return runs.RunOutcome(
        run.run_id, run.url, run.experiment_id, version, decision, arrays.source, result
    )


def _server_down(settings: Settings) -> MnistopsError | None:
    """Why a training that failed outside the training loop stopped, when the reason is
    the tracking server gone away (one quick probe); None when the server answers."""
    from mnistops.tracking.server import TrackingError, check_tracking_server

    try:
        check_tracking_server(settings)
    except TrackingError as down:
        return TrackingError(
            f"training stopped: {down}. Nothing was registered and champion did not"
            " move; the run stays RUNNING in MLflow. Start the server again and re-run."
        )
    return None
