"""The local stack: the S3 store, the MLflow server and the Prefect server, and the
workers started beside them.

- `lifecycle`: start (`up`), stop (`down`), `status`, run one in the foreground (`serve`)
- `services`: what each service runs, on which ports, how to tell it is healthy
- `store_checks`, `store_security`: the object store locked, its buckets closed
- `workers`: workers started with `mnistops worker --detach`
- `state`: the state dir's records, logs and lock; `process`: starting and stopping
- `ports`, `postgres`, `locks`: free ports, databases, stack-wide locks
(the generated keys and logins are `mnistops.credentials`, below the clients)

The names below are re-exported, and loaded on first use: a module that only needs,
say, `mnistops.stack.ports` does not load the process code and psutil.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mnistops.stack.lifecycle import ServiceStatus, down, exposure, reach, serve, status, up
    from mnistops.stack.state import StackError, log_dir, run_dir
    from mnistops.stack.workers import (
        WORKER_PREFIX,
        start_background,
        start_worker,
        worker_records,
    )

_HOMES = {
    "ServiceStatus": "lifecycle",
    "down": "lifecycle",
    "exposure": "lifecycle",
    "reach": "lifecycle",
    "serve": "lifecycle",
    "status": "lifecycle",
    "up": "lifecycle",
    "StackError": "state",
    "log_dir": "state",
    "run_dir": "state",
    "WORKER_PREFIX": "workers",
    "start_background": "workers",
    "start_worker": "workers",
    "worker_records": "workers",
}
__all__ = [
    "ServiceStatus",
    "StackError",
    "WORKER_PREFIX",
    "down",
    "exposure",
    "log_dir",
    "reach",
    "run_dir",
    "serve",
    "start_background",
    "start_worker",
    "status",
    "up",
    "worker_records",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f"mnistops.stack.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'mnistops.stack' has no attribute '{name}'")
