"""Whose messages a user sees: ours, and the libraries' warnings and errors.

DVC, MLflow and Alembic log at INFO ("Initialized DVC repository", artifact download
bars); `mnistops --verbose` shows them. DVC sets its own levels when it is first
imported, so the places that import it call `quiet_libraries()` again afterwards.
"""

from __future__ import annotations

import logging
import os

LOUD = ("mlflow", "dvc", "dvc_data", "dvc_objects", "alembic", "botocore")


class Verbosity:
    verbose = False


def quiet_libraries() -> None:
    """The libraries' INFO lines and progress bars off, unless `--verbose` was given.
    Our own warnings stay on (a library that `train` loads sets the root logger to
    ERROR, which hid the gate's "waiting for the lock" line)."""
    logging.getLogger("mnistops").setLevel(logging.INFO if Verbosity.verbose else logging.WARNING)
    if Verbosity.verbose:
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow sets its loggers' level from this when it is first imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Our commands print the run's URL themselves.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in LOUD:
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Still processing items: 1 items remaining..." at the end of a command that held
    # the gate's lock: Prefect sending its last event before the process ends, as it
    # should. Its errors still show.
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
