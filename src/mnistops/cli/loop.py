"""`mnistops predictions`: what the prediction service logged; `mnistops monitor`: is
it drifting."""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mnistops.cli._ui import console, settings, warn_refused

if TYPE_CHECKING:
    from mnistops.loop.monitoring import Monitored


def predictions(
    since: Annotated[
        str | None,
        typer.Option("--since", help="From this date (2026-12-03) or time (UTC) on."),
    ] = None,
    quarantine: Annotated[
        bool,
        typer.Option(
            "--quarantine",
            help="Move the refused objects of the log to quarantine/ in the bucket.",
        ),
    ] = False,
) -> None:
    """How many answers the prediction service logged, per model version and per digit."""
    from mnistops.data.images import shown_name
    from mnistops.loop import store

    cfg = settings()
    bucket = cfg.s3.buckets.dvc
    found = store.summary(cfg, store.parse_since(since))
    warn_refused(cfg, found.refused, hint=not quarantine)
    if quarantine:
        for name, target in store.quarantine(cfg, found.refused):
            console.print(
                f"moved s3://{bucket}/{escape(shown_name(name))} to s3://{bucket}/{target}"
            )
    where = f"s3://{cfg.s3.buckets.dvc}/predictions/"
    if not found.images:
        console.print(f"no predictions logged{f' since {since}' if since else ''} in {where}")
        return
    span = f"{found.first:%Y-%m-%d %H:%M:%S} to {found.last:%Y-%m-%d %H:%M:%S} UTC"
    console.print(
        f"{found.images} images in {found.requests} requests logged ({span}),"
        f" {found.labels} of them labelled through /feedback"
    )
    versions = Table(header_style="bold")
    versions.add_column("model")
    versions.add_column("images", justify="right")
    for version, n in sorted(found.per_version.items()):
        versions.add_row(version, str(n))
    digits = Table(header_style="bold")
    digits.add_column("digit", justify="right")
    digits.add_column("images", justify="right")
    for digit in range(10):
        digits.add_row(str(digit), str(found.per_digit.get(digit, 0)))
    console.print(versions)
    console.print(digits)


def monitor(
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the run; exit non-zero unless it completes.")
    ] = False,
    here: Annotated[
        bool,
        typer.Option("--here", help="Run the same steps in this process (no worker needed)."),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="With --here: judge the answers from this date or time on."),
    ] = None,
) -> None:
    """Monitoring now: a run of the deployment `MNIST monitoring` (a worker runs it), or
    with --here in this process. Judges the answers logged since the last monitoring run
    against the champion's training data, writes the report (MLflow run and object
    store) and emits mnistops.monitoring.drift on drift."""
    from mnistops.cli.flows import start_and_follow

    cfg = settings()
    if since is not None and not here:
        raise typer.BadParameter("--since goes with --here")
    if wait and here:
        raise typer.BadParameter("--wait follows a flow run: it does not go with --here")
    if not here:
        start_and_follow(cfg, {}, wait, monitoring=True)
        return
    from mnistops.flows.events import EventNotSent, announce_drift
    from mnistops.loop.monitoring import monitor as monitor_here
    from mnistops.loop.monitoring import one_window_at_a_time
    from mnistops.loop.store import parse_since

    begins = parse_since(since)
    with ExitStack() as locked:
        with console.status("taking the monitoring lock (Prefect)"):
            locked.enter_context(one_window_at_a_time(cfg))
        with console.status("judging the logged answers"):
            monitored = monitor_here(cfg, since=begins)
        warn_refused(cfg, monitored.refused)
        try:
            announced = announce_drift(cfg, monitored)
        except EventNotSent:
            show_monitored(monitored, announced=False)
            raise
    show_monitored(monitored, announced)


def show_monitored(monitored: Monitored, announced: bool) -> None:
    from mnistops.loop.monitoring import summary_markdown

    j = monitored.judgement
    console.print(
        f"window {monitored.start:%Y-%m-%d %H:%M:%S} to {monitored.end:%Y-%m-%d %H:%M:%S} UTC:"
        f" {monitored.champion.model_name} v{monitored.champion.version} against its"
        f" training data {escape(monitored.champion.data_version)}"
    )
    if j.tests:
        tests = Table(header_style="bold")
        for column in ("test", "effect", "p-value", "flags"):
            tests.add_column(column, justify="left" if column == "test" else "right")
        for t in j.tests:
            flag = "[bold red]drift[/]" if t.flagged else "no"
            tests.add_row(t.name, f"{t.effect:.3f}", f"{t.p_value:.3g}", flag)
        console.print(tests)
    console.print(escape(summary_markdown(j).replace("**", "")))
    if announced:
        console.print("emitted mnistops.monitoring.drift")
    console.print(f"report: {monitored.run_url} (report.html), {monitored.report_uri}")
