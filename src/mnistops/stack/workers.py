"""Background services that commands start beside the stack (`mnistops worker --detach`,
`mnistops serve --detach`): stopped by `stack down` and started again by the next
`stack up`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mnistops.clients import client_env
from mnistops.credentials import write_private
from mnistops.settings import ENV_PREFIX, SERVING_KEYS, Settings
from mnistops.stack import process
from mnistops.stack.state import Report, StackError, log_dir, run_dir, state_lock

WORKER_PREFIX = "worker-"
SERVE_NAME = "serve"


def worker_records(settings: Settings) -> list[process.ProcessRecord]:
    """The records of the workers started with `mnistops worker --detach`."""
    folder = run_dir(settings)
    names = sorted(p.stem for p in folder.glob(f"{WORKER_PREFIX}*.json")) if folder.is_dir() else []
    return [r for r in (process.read_record(folder, n) for n in names) if r is not None]


def background_records(settings: Settings) -> list[process.ProcessRecord]:
    """The records of every background service: the workers, then the prediction service."""
    serve = process.read_record(run_dir(settings), SERVE_NAME)
    return worker_records(settings) + ([serve] if serve is not None else [])


def spec_path(settings: Settings, name: str) -> Path:
    """How a detached worker was started (its command, and the variables mnistops set),
    so that `up` can start again the workers `down` stopped."""
    return run_dir(settings) / "workers" / f"{name}.json"


def mark_for_restart(settings: Settings, name: str, restart: bool) -> None:
    path = spec_path(settings, name)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    write_private(path, json.dumps({**spec, "restart": restart}))


def restart_workers(settings: Settings, report: Report) -> None:
    folder = run_dir(settings) / "workers"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        record = process.read_record(run_dir(settings), path.stem)
        died = record is not None and not process.is_alive(record)
        if not spec.get("restart") and not died:
            continue
        if path.stem == SERVE_NAME and (invalid := settings.set_aside_keys & SERVING_KEYS):
            report(
                f"not starting {SERVE_NAME} again: its settings {', '.join(sorted(invalid))}"
                " are invalid (the warning above names the key); fix them and run"
                " `mnistops stack up` again"
            )
            continue  # its mark stays: the next `up` starts it
        if record is None or died:
            why = "it had died" if died and not spec.get("restart") else "`stack down` stopped it"
            report(f"starting {path.stem} again ({why})")
            fresh = client_env(settings)
            derived = {k: fresh[k] for k in spec.get("derived", []) if k in fresh}
            env = {**os.environ, **spec["env"], **derived}
            record = process.start(
                path.stem, spec["cmd"], env, run_dir(settings), log_dir(settings), spec["url"]
            )
            if path.stem == SERVE_NAME:
                wait_serving(record, report)
        mark_for_restart(settings, path.stem, False)


SERVE_READY_S = 30.0
"""how long `stack up` waits for the prediction service it started again to load the
champion (it is ready in about 3 s on a quiet 2-core machine)"""


def wait_serving(record: process.ProcessRecord, report: Report) -> None:
    """Wait until the prediction service answers /health with a loaded model, so that
    the table `stack up` prints next shows it healthy, not "unhealthy" while it loads;
    one that dies or is not ready in SERVE_READY_S is left to that table and its log."""
    deadline = time.monotonic() + SERVE_READY_S
    while time.monotonic() < deadline and not process.exited(record):
        status = _health(record.url)
        if status == "ready":
            return
        if status == "refused":
            report(
                f"{SERVE_NAME} runs but serves no model: it refused the champion (why: `mnistops"
                f" stack logs {SERVE_NAME}`); it serves the next champion it can load"
                " (`mnistops models promote VERSION`)"
            )
            return
        time.sleep(0.25)
    ended = "stopped as it started" if process.exited(record) else "is not ready yet"
    report(f"{SERVE_NAME} {ended}: see `mnistops stack logs {SERVE_NAME}`")


def _health(url: str) -> str:
    """The service's /health status: "ready", "loading" or "refused"; "" without one."""
    import httpx

    try:
        found = httpx.get(f"{url}/health", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return ""
    return str(found.get("status", "")) if isinstance(found, dict) else ""


def start_worker(
    settings: Settings, pool: str, cmd: list[str], env: dict[str, str]
) -> process.ProcessRecord:
    """Start a worker for `pool` as a background service of the stack (one per pool)."""
    return start_background(
        settings, f"{WORKER_PREFIX}{pool}", cmd, env, f"pool {pool}", f"a worker for pool '{pool}'"
    )


def start_background(
    settings: Settings, name: str, cmd: list[str], env: dict[str, str], url: str, what: str
) -> process.ProcessRecord:
    """Start `cmd` as the background service `name` of the stack (one of each name)."""
    with state_lock(settings):
        record = process.read_record(run_dir(settings), name)
        if record is not None and process.is_alive(record):
            raise StackError(f"{what} is already running (pid {record.pid})")
        # Keys and logins are not kept: a restart takes them fresh from the state dir.
        # The service's own settings are (its API key too, in this 0600 file): a restart
        # from another shell must not serve without the key it was started with.
        derived = set(client_env(settings))
        own = {
            k: v
            for k, v in env.items()
            if k not in derived and (os.environ.get(k) != v or k.startswith(ENV_PREFIX))
        }
        spec = {
            "cmd": cmd,
            "env": own,
            "derived": sorted(derived & set(env)),
            "url": url,
            "restart": False,
        }
        write_private(spec_path(settings, name), json.dumps(spec))
        record = process.start(name, cmd, env, run_dir(settings), log_dir(settings), url)
    time.sleep(2)
    if process.exited(record):
        process.record_path(run_dir(settings), name).unlink(missing_ok=True)
        log = process.tail(record.log_path)
        raise StackError(f"{what} exited at start; its log:\n{log}")
    return record
