"""Every use of a dependency's private API, in one place, each with a way out.

An upgrade of MLflow, Prefect, PyTorch or uvicorn may rename what is private to them.
Each function here uses the private name only where no public one does the job, and
falls back to a public way (or a safe default) when the private one is gone;
`tests/test_compat.py` fails with a clear message when one of them changed, so an
upgrade is caught by the suite, not in the middle of a run.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, NoReturn


@contextmanager
def mlflow_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's module-level tracking URI set to `uri` inside the block only.

    Private: `mlflow.tracking._tracking_service.utils._use_tracking_uri`, which also puts
    back the `MLFLOW_TRACKING_URI` variable MLflow exports. Public fallback: set the URI
    and set the previous one again afterwards."""
    use = private_tracking_uri_setter()
    if use is not None:
        with use(uri):
            yield
        return
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def private_tracking_uri_setter() -> Any:
    """MLflow's `_use_tracking_uri`, or None where this MLflow has none."""
    try:
        module = importlib.import_module("mlflow.tracking._tracking_service.utils")
    except ImportError:
        return None
    return getattr(module, "_use_tracking_uri", None)


def before_teardown() -> Callable[[], None] | None:
    """What the interpreter does at exit before it tears its modules down: wait for the
    threads that are not daemons (after telling `concurrent.futures`' idle workers to
    stop, else they would wait for work forever), then run the `atexit` handlers.

    Private: `threading._shutdown` (what the interpreter itself calls) and
    `atexit._run_exitfuncs`; no public call tells the executors to stop. Where either is
    gone: None, and the caller exits the usual way."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:
        return None

    def steps() -> None:
        shutdown()
        run_exitfuncs()

    return steps


def leave(code: str | int | None) -> NoReturn:
    """End the process as the interpreter would (threads finished, `atexit` handlers
    run, output flushed, the same exit status) but without tearing down every module
    it imported: that teardown alone took 0.7 s after importing PyTorch and 1.2-2 s
    after PyTorch, MLflow and Prefect, at the end of every command (bench/exit.py)."""
    steps = before_teardown()
    if steps is None:
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        if sys.stderr is not None:
            with suppress(OSError, ValueError):
                print(code, file=sys.stderr)
        status = 1
    steps()
    for stream in (sys.stdout, sys.stderr):
        # None: started with that stream closed; an error: a closed pipe, a full disk
        if stream is not None:
            with suppress(OSError, ValueError):
                stream.flush()
    os._exit(status)


def bf16_is_native() -> bool:
    """Whether this CPU runs bf16 matrix work natively (oneDNN's own test).

    Private: `torch.ops.mkldnn._is_mkldnn_bf16_supported`; PyTorch has no public
    equivalent. Without it: False, so training stays fp32, which is always correct."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None:
        return False
    return bool(check())


def is_cron_without_dates(exc: BaseException) -> bool:
    """Whether `exc` is croniter's "no date matches" (Prefect vendors croniter under a
    private module; its class is matched by name where the module moved)."""
    try:
        module = importlib.import_module("prefect._vendor.croniter.croniter")
        return isinstance(exc, module.CroniterBadDateError)
    except (ImportError, AttributeError):
        return type(exc).__name__ == "CroniterBadDateError"


HTTP_PROTOCOL_HOOKS = (
    "connection_made",
    "connection_lost",
    "on_message_complete",
    "on_response_complete",
)
"""the methods of uvicorn's httptools protocol that `serving.connections` extends"""


def uvicorn_http_protocol() -> type:
    """uvicorn's httptools HTTP protocol class, which `serving.connections` extends.
    uvicorn documents `http=` as taking a protocol class, not this class's internals
    (its `connections`, `cycle`, `loop` and `transport` are used too: the connection
    tests exercise them). RuntimeError names a hook that is gone, at `serve`'s start."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    missing = [name for name in HTTP_PROTOCOL_HOOKS if not hasattr(HttpToolsProtocol, name)]
    if missing:
        raise RuntimeError(
            f"uvicorn's HttpToolsProtocol has no {', '.join(missing)} any more:"
            " serving/connections.py must be adapted to this uvicorn"
        )
    return HttpToolsProtocol


def mlflow_server_in_one_process(args: list[str]) -> NoReturn:
    """`mlflow server ARGS`, whose uvicorn server takes this process's place.

    MLflow's command checks its options, prepares the database and the login, then
    starts uvicorn as a child and waits for it: two processes of about 250 MB each for
    the life of the stack, the first one idle. Here the same command runs, but its last
    step (`mlflow.server._exec_cmd`, private) becomes an `execve` of the same command
    line and environment: one process, under the pid the stack recorded (the stack
    turns MLflow's job execution off; with it on, or where that name is gone, MLflow's
    own two processes run)."""
    import mlflow.server
    from mlflow.cli import cli
    from mlflow.environment_variables import MLFLOW_SERVER_ENABLE_JOB_EXECUTION

    # With job execution on, MLflow starts its job runners after the server: keep its way.
    jobs_on = MLFLOW_SERVER_ENABLE_JOB_EXECUTION.get()  # type: ignore[no-untyped-call]
    if not jobs_on and callable(getattr(mlflow.server, "_exec_cmd", None)):

        def exec_instead(
            command: list[str], *, extra_env: dict[str, str] | None = None, **_: Any
        ) -> NoReturn:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(command[0], list(command), {**os.environ, **(extra_env or {})})

        mlflow.server._exec_cmd = exec_instead  # type: ignore[attr-defined,assignment]
    cli.main(["server", *args], prog_name="mlflow")
    raise SystemExit(0)


PREFECT_DATABASE_WITH_BLOCK_TYPES = """\
import asyncio

from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration


async def main() -> None:
    db = provide_database_interface()
    await db.create_db()
    session = await db.session()
    async with session:
        await run_block_auto_registration(session=session)


asyncio.run(main())
"""
"""A Python program that migrates the Prefect database its settings name and registers
Prefect's block types in it: what `prefect server start` does to a new database before
it answers (1.5 s of its CPU when the types are there already). Private:
`run_block_auto_registration` and `provide_database_interface`, Prefect's own startup
calls. Public fallback (`stack.prefect_db`): `prefect server database upgrade`, the
migrations alone."""
