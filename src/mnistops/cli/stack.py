"""`mnistops stack ...`: start, stop and inspect the local stack of services."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from mnistops.cli._ui import console, fail, settings, shorter, spinner, warn
from mnistops.settings import STACK_KEYS, STATE_DIR_KEYS, Settings, with_database_url

if TYPE_CHECKING:
    from mnistops.stack import ServiceStatus

app = typer.Typer(help="Start, stop and inspect the local stack of services.", no_args_is_help=True)


@app.command("up")
def up(
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="PostgreSQL URL for MLflow and Prefect "
            "(postgresql://USER:PASSWORD@HOST:PORT); default SQLite in the state dir.",
        ),
    ] = None,
) -> None:
    """Start the S3 store, the MLflow server and the Prefect server; wait until healthy."""
    cfg = settings(STACK_KEYS)
    if db:
        cfg = with_database_url(cfg, db)
    start(cfg)
    console.print(
        f'Use it from another shell: [bold]eval "$(mnistops stack env)"[/]. '
        f"Stop it: [bold]mnistops stack down[/]. State: {cfg.home}"
    )


def start(cfg: Settings) -> None:
    """`stack up` with its warnings, spinner and table."""
    from mnistops import stack

    for warning in stack.exposure(cfg):
        warn(warning)
    with spinner("starting the stack...") as report:
        stack.up(cfg, report=report)
    show_services(stack.status(cfg))


def show_services(statuses: list[ServiceStatus]) -> None:
    """The table of services: state, pid, URL, who can reach it; and where the logs are."""
    table = Table(title="mnistops stack", show_header=True, header_style="bold")
    table.add_column("service", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("pid", justify="right", no_wrap=True, min_width=5)
    table.add_column("URL", overflow="fold")
    table.add_column("reachable from", overflow="fold")
    for st in statuses:
        state = (
            "[green]healthy[/]"
            if st.healthy
            else ("[yellow]unhealthy[/]" if st.running else "[red]down[/]")
        )
        if st.external:
            state += " (external)"
        table.add_row(st.title, state, str(st.pid or ""), st.url, st.reach)
    console.print(table)
    logs = sorted({shorter(st.log.parent) for st in statuses if st.log is not None})
    if logs:
        console.print(f"logs: {', '.join(logs)} (`mnistops stack logs NAME`)", soft_wrap=True)


@app.command("down")
def down() -> None:
    """Stop every service started from this state dir (children included)."""
    from mnistops import stack

    stopped = stack.down(settings(STATE_DIR_KEYS), report=console.log)
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command("status")
def status() -> None:
    """Show each service: running, pid, URL, healthy. Exit 1 if any is not healthy."""
    from mnistops import stack

    cfg = settings(STACK_KEYS)
    require_stack(cfg)
    statuses = stack.status(cfg)
    show_services(statuses)
    if not all(st.healthy for st in statuses):
        raise typer.Exit(1)


def require_stack(cfg: Settings) -> None:
    """Stop with where we looked when no stack is found: the object store is ours to run
    but there is no state dir with its keys (a keyless `stack env` helps nobody)."""
    from mnistops.settings import where_looked

    if cfg.s3.endpoint_url is not None or (cfg.home / "credentials.json").is_file():
        return
    default_home = cfg.home.name == ".mnistops" and cfg.home.parent == Path.cwd().absolute()
    looked = where_looked() if default_home else str(cfg.home)
    fail(
        f"no mnistops stack found: looked for its state dir (with the S3 keys) in {looked}."
        " Run this in the folder where you ran `mnistops stack up` (or below it), set"
        " MNISTOPS_HOME to its state dir, or start one here with `mnistops stack up`.",
        code=2,
    )


@app.command("env")
def env() -> None:
    """Print `export` lines with which dvc, mlflow, prefect, boto3 and mnistops use this stack."""
    from mnistops.clients import client_env

    cfg = settings(STACK_KEYS)
    require_stack(cfg)
    for key, value in client_env(cfg).items():
        typer.echo(f"export {key}={shlex.quote(value)}")


@app.command("serve")
def serve(
    service: Annotated[str, typer.Argument(help="s3, mlflow or prefect")],
) -> None:
    """Run one service in the foreground (for a container or a systemd unit).

    The same server, flags and environment as `stack up` starts, from the same settings;
    ports, bind address, database (database_url) and object store (s3.*) included.
    """
    from mnistops import stack

    stack.serve(settings(STACK_KEYS), service)


@app.command("logs")
def logs(
    service: Annotated[
        str,
        typer.Argument(
            help="s3, mlflow, prefect, serve (the detached prediction service), or a"
            " detached worker (worker-POOL)"
        ),
    ],
    lines: Annotated[int, typer.Option("-n", "--lines", min=1, help="How many last lines.")] = 50,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing.")] = False,
) -> None:
    """Print the last lines of a service's log (or a detached worker's)."""
    from mnistops import stack
    from mnistops.stack import process
    from mnistops.stack.services import SERVICE_NAMES
    from mnistops.stack.workers import SERVE_NAME

    cfg = settings(STACK_KEYS)
    written = sorted(p.stem for p in stack.log_dir(cfg).glob("*.log"))
    # a service that died has no record left, but its log says why
    workers = [r.name for r in stack.worker_records(cfg)]
    known = list(dict.fromkeys([*SERVICE_NAMES, *workers, SERVE_NAME, *written]))
    if service not in known:
        fail(f"unknown service '{service}'; choose one of: {', '.join(known)}", code=2)
    path = stack.log_dir(cfg) / f"{service}.log"
    if not path.exists():
        fail(f"no log for {service} yet ({path}); start the stack with `mnistops stack up`")
    typer.echo(process.tail(path, lines))
    if follow:
        with open(path, errors="replace") as handle:
            handle.seek(0, 2)
            while True:
                line = handle.readline()
                if line:
                    typer.echo(line, nl=False)
                else:
                    time.sleep(0.5)
