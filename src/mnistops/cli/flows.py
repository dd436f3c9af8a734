"""`mnistops deploy`, `mnistops worker`, `mnistops run`: the scheduled retraining."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mnistops.cli._ui import HYP_OPTIONS, Detach, console, settings, shorter, warn
from mnistops.errors import Interrupted, MnistopsError
from mnistops.settings import Settings

if TYPE_CHECKING:
    from mnistops.flows.deployment import DeployResult
    from mnistops.flows.quick_runs import FinishedRun


def deploy() -> None:
    """Create or update the retraining deployment from config/flow.yml (idempotent).

    Creates the process work pools of deployment.pools that are missing. The deployment
    runs on deployment.pool_name, training on that pool's device; it runs the flow `MNIST`
    on its schedule, on every new data version (a trigger on the event `data version`
    sends), and on `mnistops run`; at most one run at a time (a second one waits in the
    queue).
    """
    deploy_retraining(settings())


def deploy_retraining(cfg: Settings) -> None:
    from mnistops.flows.deployment import deploy

    show_deployed(cfg, deploy(cfg))


def show_deployed(cfg: Settings, result: DeployResult) -> None:
    for pool in result.pools_created:
        console.print(f"work pool {pool} (process, device {cfg.deployment.pools[pool]}) created")
    console.print(
        f"deployment {result.full_name}: [bold]{result.action}[/]; schedule {result.schedule};"
        f" pool {cfg.deployment.pool_name} (device {cfg.deployment.device}),"
        f" queue {cfg.deployment.queue_name}"
    )
    console.print("next runs of the schedule: " + ", ".join(result.next_runs))
    if result.next_scheduled:
        console.print(f"next scheduled run: {result.next_scheduled}")
    if result.monitoring:
        console.print(f"deployment {result.monitoring}")
    console.print(
        f"start a worker: [bold]mnistops worker --pool {cfg.deployment.pool_name}[/]"
        f"; UI: {cfg.prefect_api_url.removesuffix('/api')}/deployments"
    )


def worker(
    pool: Annotated[
        str | None, typer.Option("--pool", help="Work pool; default deployment.pool_name.")
    ] = None,
    detach: Detach = False,
) -> None:
    """Start a Prefect worker that runs the retraining flow's runs from a work pool.

    The flow is part of the installed package, so any machine with mnistops and the
    variables of `mnistops stack env` can serve the pool. The pool must exist on the
    server (`mnistops deploy` creates those of deployment.pools).
    """
    cfg = settings()
    start_worker(cfg, pool or cfg.deployment.pool_name, detach)


def start_worker(cfg: Settings, pool: str, detach: bool) -> None:
    """A worker for `pool`: in the foreground (this process becomes it), or detached as a
    background service of the stack."""
    from mnistops.flows.workers import device_warning, run_in_foreground, start_detached

    def announce_device() -> None:
        warning = device_warning(cfg, pool)
        if warning:
            warn(warning)

    def ready() -> None:
        announce_device()
        console.print(f"worker for pool {pool} (Ctrl-C stops it)")

    if not detach:
        run_in_foreground(cfg, pool, ready)
    record = start_detached(cfg, pool)
    announce_device()
    console.print(
        f"worker for pool {pool} started (pid {record.pid}, log {shorter(record.log_path)});"
        " `mnistops stack down` stops it"
    )


def run(
    data_version: Annotated[
        str | None, typer.Option("--data-version", help="Default: the latest.")
    ] = None,
    model: Annotated[str | None, typer.Option(HYP_OPTIONS["model"])] = None,
    n_epochs: Annotated[int | None, typer.Option(HYP_OPTIONS["n_epochs"])] = None,
    batch_size: Annotated[int | None, typer.Option(HYP_OPTIONS["batch_size"])] = None,
    learning_rate: Annotated[float | None, typer.Option(HYP_OPTIONS["learning_rate"])] = None,
    random_seed: Annotated[int | None, typer.Option(HYP_OPTIONS["random_seed"])] = None,
    device: Annotated[
        str | None, typer.Option(HYP_OPTIONS["device"], help="auto, cpu or cuda")
    ] = None,
    fast: Annotated[bool, typer.Option("--fast", help="A small share, 1 epoch.")] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the run; exit non-zero unless it completes.")
    ] = False,
) -> None:
    """Quick run: a run of the retraining deployment, now."""
    given = {
        "data_version": data_version,
        "model": model,
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "random_seed": random_seed,
        "device": device,
        "fast": fast or None,
    }
    cfg = settings()
    chosen = {k: v for k, v in given.items() if v is not None}
    check_run(cfg, chosen)
    start_and_follow(cfg, chosen, wait)


def check_run(cfg: Settings, parameters: dict[str, Any]) -> None:
    """Refuse bad hyperparameters (named by their option, exit 2) before the run exists.
    The data version is the flow's to find: it may be published before a worker takes
    the run, and a pull that fails is retried."""
    from mnistops.cli.models import hyperparameters

    hyperparameters(cfg, {k: v for k, v in parameters.items() if k in HYP_OPTIONS})


def start_and_follow(
    cfg: Settings, parameters: dict[str, Any], wait: bool, monitoring: bool = False
) -> None:
    """Start a run of the deployment (or the monitoring one); with `wait`, report its
    states, then its summary."""
    from mnistops.flows.quick_runs import quick_run, run_and_wait

    if not wait:
        show_run_started(*quick_run(cfg, parameters, monitoring))
        return
    started: list[str] = []

    def on_started(run_id: str, url: str) -> None:
        started.append(url)
        show_run_started(run_id, url)

    try:
        finished = run_and_wait(cfg, parameters, on_started, state_printer(), monitoring)
    except KeyboardInterrupt:
        goes_on = f": the flow run goes on ({started[0]})" if started else ""
        raise Interrupted(f"interrupted{goes_on}") from None
    show_run_finished(finished)


def show_run_started(run_id: str, url: str) -> None:
    console.print(f"flow run {run_id}: {url}")


def state_printer() -> Callable[[str, str], None]:
    """Prints each state of a flow run with the seconds since it was asked for."""
    began = time.monotonic()

    def on_state(name: str, message: str) -> None:
        note = f" ({message})" if message else ""
        console.print(f"{time.monotonic() - began:6.1f}s  {name}{note}", highlight=False)

    return on_state


def show_run_finished(run: FinishedRun) -> None:
    """The run's summary; an error (exit 1) unless it completed."""
    from rich.markdown import Markdown

    if run.summary:
        console.print(Markdown(run.summary))
    if not run.completed:
        raise MnistopsError(f"flow run {run.run_id} ended {run.state}; see {run.url}")
