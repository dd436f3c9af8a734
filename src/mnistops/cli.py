"""The `mnistops` command: a thin layer over the package's functions."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mnistops import stack
from mnistops.settings import ConfigError, Settings, load_settings, with_database_url
from mnistops.stack import process
from mnistops.stack.endpoints import client_env
from mnistops.stack.services import SERVICE_NAMES

app = typer.Typer(
    help="MNIST MLOps: versioned data, tracked training, scheduled retraining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(
    help="Start, stop and inspect the local stack of services.", no_args_is_help=True
)
app.add_typer(stack_app, name="stack")

console = Console(log_path=False)
err = Console(stderr=True)


class State:
    config_dir: Path | None = None


@app.callback()
def main(
    config_dir: Annotated[
        Path | None,
        typer.Option("--config-dir", help="Folder of the YAML settings (default ./config)."),
    ] = None,
) -> None:
    State.config_dir = config_dir


def settings() -> Settings:
    try:
        return load_settings(State.config_dir)
    except ConfigError as exc:
        fail(str(exc), code=2)
    raise AssertionError("unreachable")


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def print_urls(cfg: Settings) -> None:
    table = Table(title="mnistops stack", show_header=True, header_style="bold")
    table.add_column("service")
    table.add_column("state")
    table.add_column("pid", justify="right")
    table.add_column("URL", no_wrap=True)
    table.add_column("log", overflow="fold")
    for st in stack.status(cfg):
        state = (
            "[green]healthy[/]"
            if st.healthy
            else ("[yellow]unhealthy[/]" if st.running else "[red]down[/]")
        )
        if st.external:
            state += " (external)"
        table.add_row(st.title, state, str(st.pid or ""), st.url, _shorter(st.log))
    console.print(table)


def _shorter(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@stack_app.command("up")
def stack_up(
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
    cfg = settings()
    if db:
        try:
            cfg = with_database_url(cfg, db)
        except ConfigError as exc:
            fail(str(exc), code=2)
    try:
        with console.status("starting the stack...") as spinner:
            stack.up(cfg, report=lambda msg: (console.log(msg), spinner.update(msg)))
    except (stack.StackError, FileNotFoundError) as exc:
        fail(str(exc))
    print_urls(cfg)
    console.print(
        f'Use it from another shell: [bold]eval "$(mnistops stack env)"[/]. '
        f"Stop it: [bold]mnistops stack down[/]. State: {cfg.home}"
    )


@stack_app.command("down")
def stack_down() -> None:
    """Stop every service started from this state dir (children included)."""
    cfg = settings()
    stopped = stack.down(cfg, report=console.log)
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@stack_app.command("status")
def stack_status() -> None:
    """Show each service: running, pid, URL, healthy. Exit 1 if any is not healthy."""
    cfg = settings()
    print_urls(cfg)
    if not all(st.healthy for st in stack.status(cfg)):
        raise typer.Exit(1)


@stack_app.command("env")
def stack_env() -> None:
    """Print `export` lines with which dvc, mlflow, prefect, boto3 and mnistops use this stack."""
    cfg = settings()
    for key, value in client_env(cfg).items():
        typer.echo(f"export {key}={shlex.quote(value)}")


@stack_app.command("logs")
def stack_logs(
    service: Annotated[str, typer.Argument(help="s3, mlflow or prefect")],
    lines: Annotated[int, typer.Option("-n", "--lines", help="How many last lines.")] = 50,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing.")] = False,
) -> None:
    """Print the last lines of a service's log."""
    cfg = settings()
    if service not in SERVICE_NAMES:
        fail(f"unknown service '{service}'; choose one of: {', '.join(SERVICE_NAMES)}", code=2)
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


@app.command("demo")
def demo() -> None:
    """Bring the local stack up and show where everything is."""
    stack_up(db=None)
