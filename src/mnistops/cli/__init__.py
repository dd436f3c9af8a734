"""The `mnistops` command: a thin layer over the package's functions.

One module per command group: `stack`, `data`, `models` (train, models, predict), `flows`
(deploy, worker, run), `loop` (predictions, monitor) and `demo`; `_ui` holds the consoles,
progress bars and the settings of this invocation. Commands parse their options, call
the package and show the result. Errors are caught once, here: a `MnistopsError` ends
the command with its message and its exit code (1: a service or a run failed, 2: bad
input or configuration), never a traceback.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from mnistops.cli import _ui, data, demo, flows, loop, models, serve, stack
from mnistops.compat import leave
from mnistops.errors import INTERRUPTED, MnistopsError
from mnistops.logs import Verbosity, quiet_libraries


class _Root(TyperGroup):
    """The root command group: where every command's `MnistopsError` is caught."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except MnistopsError as exc:
            _ui.fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _ui.fail("interrupted", INTERRUPTED)


app = typer.Typer(
    cls=_Root,
    help="MNIST MLOps: versioned data, tracked training, scheduled retraining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(stack.app, name="stack")
app.add_typer(data.app, name="data")
app.command("demo")(demo.demo)
app.command("train")(models.train)
app.add_typer(models.models_app, name="models")
app.command("serve")(serve.serve)
app.command("predictions")(loop.predictions)
app.command("monitor")(loop.monitor)
app.command("predict")(models.predict)
app.command("deploy")(flows.deploy)
app.command("worker")(flows.worker)
app.command("run")(flows.run)


@app.callback()
def main(
    config_dir: Annotated[
        Path | None,
        typer.Option("--config-dir", help="Folder of the YAML settings (default ./config)."),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Also show what DVC, MLflow and Prefect log."),
    ] = False,
) -> None:
    _ui.State.config_dir = config_dir
    Verbosity.verbose = verbose
    quiet_libraries()


def entry() -> None:
    """The `mnistops` command: private files by default, the tools' telemetry off."""
    from mnistops.clients import library_defaults
    from mnistops.credentials import PRIVATE_UMASK

    os.umask(PRIVATE_UMASK)
    library_defaults()
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # A shell starts background jobs with Ctrl-C ignored: every command still stops
        # cleanly on SIGINT (a publish, a training), as its messages promise.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app(prog_name="mnistops")
    except SystemExit as done:
        leave(done.code)
    except OSError as exc:  # a folder not writable, a full disk (Click ends a broken pipe)
        _ui.error(_ui.os_error_text(exc))
        leave(1)
