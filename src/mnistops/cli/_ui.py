"""What every command shares: the consoles, the settings of this invocation, errors,
progress bars and spinners."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mnistops.settings import SERVING_KEYS, ConfigError, Settings, load_settings

console = Console(log_path=False)
err = Console(stderr=True, soft_wrap=True)

ProgressFor = Callable[[str, int], Callable[[int], None]]

HYP_OPTIONS = {
    "n_epochs": "--epochs",
    "batch_size": "--batch-size",
    "learning_rate": "--lr",
    "random_seed": "--seed",
    "val_size": "--val-size",
    "device": "--device",
    "model": "--model",
}
"""The CLI's short options for hyp.yml's keys. The keys are the names everywhere inside
(the commands' parameters, the flow's parameters, MLflow's params); this table is the one
place where an option is translated."""


Detach = Annotated[
    bool,
    typer.Option(
        "--detach", help="Run in the background as part of the stack (stopped by stack down)."
    ),
]
"""the option of the commands that can run as a background service of the stack"""


class State:
    """What the root command was given, for the command that runs under it."""

    config_dir: Path | None = None
    noted = False
    """the notes of the settings (ignored keys) were printed"""


MODEL_KEYS = SERVING_KEYS | {"experiment_name"}


def settings(needs: frozenset[str] | None = None) -> Settings:
    """The settings of this invocation; their notes (ignored keys) printed once. With
    `needs` (the top-level keys the command reads), invalid keys elsewhere are set aside
    with one warning line."""
    given = State.config_dir or os.environ.get("MNISTOPS_CONFIG_DIR")
    if given is not None and not Path(given).is_dir():
        where = "--config-dir" if State.config_dir else "MNISTOPS_CONFIG_DIR"
        raise ConfigError(
            f"{where} {given}: no such folder (the folder of stack.yml, flow.yml, hyp.yml"
            " and dataset.yml)"
        )
    loaded = load_settings(State.config_dir, needs)
    if not State.noted:
        State.noted = True
        for note in loaded.notes:
            err.print(f"[dim]note:[/] {escape(note)}", highlight=False)
        if loaded.set_aside:
            warn(
                f"not used here, left at their defaults: {'; '.join(loaded.set_aside)}"
                " (commands that use them refuse until they are fixed)"
            )
    return loaded


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with `message` on stderr and exit `code`."""
    error(message)
    raise typer.Exit(code)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(without_controls(message))}", highlight=False)


FIXES = {
    errno.EACCES: "check that this user may write there (permissions, `chattr`)",
    errno.EPERM: "check that this user may write there (permissions, `chattr`)",
    errno.EROFS: "the file system is mounted read-only: choose a folder on another",
    errno.ENOSPC: "the disk is full: free some space and run the command again",
    errno.EDQUOT: "the disk quota is used up: free some space and run the command again",
    errno.ENOTDIR: "a file stands where a folder is needed: move it, or set another folder",
}


def os_error_text(exc: OSError) -> str:
    """An error of the operating system (a folder not writable, a full disk) in one line:
    the file it names, what went wrong and what to do."""
    where = f"{exc.filename}: " if exc.filename is not None else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    fix = FIXES.get(exc.errno or 0)
    return f"{where}{what}" + (f"; {fix}" if fix else "")


def warn(message: str) -> None:
    err.print(f"[bold yellow]warning:[/] {escape(without_controls(message))}", highlight=False)


QUARANTINE_HINT = "`mnistops predictions --quarantine` moves the refused objects out of the way"


def warn_refused(settings: Settings, refused: list[tuple[str, str]], hint: bool = True) -> None:
    """One line per object of the service's log that was refused (its name, why), then
    how to move them out of the way."""
    from mnistops.data.images import shown_name

    for name, why in refused:
        warn(f"s3://{settings.s3.buckets.dvc}/{shown_name(name)} refused: {why}")
    if refused and hint:
        warn(QUARANTINE_HINT)


def without_controls(message: str) -> str:
    """`message` with every control character but newline and tab written as an escape:
    an error may quote a server's answer or a file name, which must not drive the
    terminal."""
    if message.isprintable():
        return message
    return "".join(c if c in "\n\t" or c.isprintable() else ascii(c)[1:-1] for c in message)


def shorter(path: Path | None) -> str:
    """`path` relative to the working folder where it lies below it."""
    if path is None:
        return ""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextmanager
def progress_bars() -> Iterator[ProgressFor]:
    """Rich progress bars; yields `progress_for(label, total)` -> advance(n)."""
    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bars:

        def progress_for(label: str, total: int) -> Callable[[int], None]:
            task = bars.add_task(label, total=total or None)
            return lambda n: bars.advance(task, n)

        yield progress_for


@contextmanager
def spinner(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner; yields `report(message)`, which logs the message and shows it."""
    with console.status(title) as status:

        def report(message: str) -> None:
            console.log(message)
            status.update(message)

        yield report
