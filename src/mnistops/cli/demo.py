"""`mnistops demo`: the story of `mnistops.demo`, told on the console."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from mnistops.cli import _ui
from mnistops.cli._ui import console, settings
from mnistops.cli.data import (
    show_announced,
    show_feedback_added,
    show_ingested,
    show_published,
    show_versions_of,
)
from mnistops.cli.flows import show_deployed, show_run_finished, show_run_started, state_printer
from mnistops.cli.models import (
    announce_training,
    show_outcome,
    sigterm_interrupts,
    training_progress,
)
from mnistops.cli.stack import show_services
from mnistops.demo import DEMO_EPOCHS, ProgressFor, run_demo
from mnistops.demo_summary import Summary
from mnistops.settings import HyperParameters, Settings

if TYPE_CHECKING:
    from mnistops.data.ingest import IngestResult
    from mnistops.data.registry import PublishResult
    from mnistops.flows.deployment import DeployResult
    from mnistops.flows.events import Announcement
    from mnistops.flows.quick_runs import FinishedRun
    from mnistops.loop.labels import FeedbackAdded
    from mnistops.stack import ServiceStatus
    from mnistops.tracking.runs import RunOutcome, TrainingHooks
    from mnistops.train.data import Arrays


def demo(
    fast: Annotated[
        bool, typer.Option("--fast", help="A small share of MNIST and 1 epoch (a smoke test).")
    ] = False,
    n_epochs: Annotated[
        int, typer.Option(_ui.HYP_OPTIONS["n_epochs"], help="Epochs of the demo's two trainings.")
    ] = DEMO_EPOCHS,
) -> None:
    """The whole walkthrough on the local stack, from nothing to a retraining on what the
    served model saw.

    Stack up, MNIST as PNG folders, data version v1.0, a tracked experimental training
    on v1.0, new images and v2.0, the retraining deployment from config/flow.yml, a
    worker, a Quick run on v2.0, the champion served; then the loop: drawn digits sent to
    the service, its mistakes corrected through /feedback, the labels become v3.0, the
    retraining v3.0's publication triggers, the gate, and the champion served; a summary.
    Trainings are short (--epochs, default 1) to keep the demo quick, the deployment's
    too; `mnistops train` and `mnistops deploy` use hyp.yml. Safe to re-run: what exists
    (versions, models, the deployment, the worker, the service) is kept and reused.
    """
    cfg = settings()
    sigterm_interrupts()
    run_demo(cfg, ConsoleReporter(cfg), fast, n_epochs)


class ConsoleReporter:
    """The demo's `Reporter`: the same tables and bars as the commands of each stage."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._on_state: Callable[[str, str], None] | None = None

    def stage(self, number: int, title: str) -> None:
        console.rule(f"[bold]{number}. {title}")

    def say(self, message: str) -> None:
        console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        _ui.warn(message)

    def busy(self, title: str) -> AbstractContextManager[Callable[[str], None]]:
        return _ui.spinner(title)

    def progress(self) -> AbstractContextManager[ProgressFor]:
        return _ui.progress_bars()

    @contextmanager
    def training(self, hyp: HyperParameters, arrays: Arrays) -> Iterator[TrainingHooks]:
        announce_training(hyp, arrays)
        with training_progress(hyp, arrays) as hooks:
            yield hooks

    def stack_ready(self, statuses: list[ServiceStatus]) -> None:
        show_services(statuses)

    def ingested(self, result: IngestResult) -> None:
        show_ingested(result)

    def published(self, result: PublishResult, announcement: Announcement) -> None:
        show_published(result)
        show_announced(announcement)

    def trained(self, outcome: RunOutcome) -> None:
        show_outcome(self.settings, outcome)

    def deployed(self, result: DeployResult) -> None:
        show_deployed(self.settings, result)

    def run_started(self, run_id: str, url: str) -> None:
        show_run_started(run_id, url)
        self._on_state = state_printer()

    def run_state(self, name: str, message: str) -> None:
        if self._on_state is not None:
            self._on_state(name, message)

    def run_finished(self, run: FinishedRun) -> None:
        show_run_finished(run)

    def feedback_added(self, report: FeedbackAdded) -> None:
        show_feedback_added(self.settings, report)

    def summary(self, summary: Summary) -> None:
        show_summary(self.settings, summary)


def show_summary(cfg: Settings, summary: Summary) -> None:
    console.rule("[bold]summary")
    show_versions_of(summary.versions, summary.problems, summary.places, summary.warnings)
    runs = Table(title=f"MLflow experiment {cfg.experiment_name}")
    for column in ("run", "phase", "data", "model", "epochs", "test acc", "status"):
        runs.add_column(column, justify="right" if column == "test acc" else "left")
    for row in summary.runs:
        accuracy = f"{row.test_accuracy:.2%}" if row.test_accuracy is not None else ""
        runs.add_row(
            row.name, row.phase, row.data_version, row.model, row.epochs, accuracy, row.status
        )
    console.print(runs)
    best = summary.champion
    if best is not None:
        shown = f"{best.accuracy:.2%}" if best.accuracy is not None else "unknown accuracy"
        console.print(
            f"champion: [bold]{best.name} v{best.version}[/]"
            f" ({shown} on the test set, trained on {best.data_version},"
            f" {best.phase}): {best.reason}",
            highlight=False,
        )
    console.print(f"next scheduled run: {summary.next_run or 'none planned'}")
    ui = cfg.prefect_api_url.removesuffix("/api")
    console.print(f"MLflow UI:    {cfg.mlflow_uri}")
    console.print(f"Prefect UI:   {ui}  (deployments: {ui}/deployments)")
    console.print(f"Prediction:   {cfg.serve_url}  (draw a digit; API docs: {cfg.serve_url}/docs)")
    buckets = ", ".join(cfg.s3.buckets.model_dump().values())
    console.print(
        f"object store: {cfg.s3_endpoint}  (buckets: {buckets}; keys: `mnistops stack env`)"
    )
    console.print(
        "Try: [bold]mnistops predict IMAGE.png[/], [bold]mnistops models promote N[/],"
        " [bold]mnistops run --wait[/], [bold]mnistops data diff v2.0 v3.0[/],"
        " [bold]mnistops predictions[/], [bold]mnistops monitor --here[/] (a drift report"
        " on what the service saw)."
    )
    console.print("Stop everything with [bold]mnistops stack down[/] (nothing is lost).")
