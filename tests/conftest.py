"""Shared fixtures: a clean environment, free ports, and stacks of real services in temp dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from prefect import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from mnistops import stack
from mnistops.settings import Settings, load_settings
from mnistops.stack.ports import free_port_config

CLEAN_PREFIXES = ("MNISTOPS_", "MLFLOW_", "PREFECT_", "AWS_")
KEEP = {"MNISTOPS_TEST_DATABASE_URL"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that kill the demo stack's services run after every test that only looks at
    it, so that a failure to bring it back cannot fail those too."""
    items.sort(
        key=lambda item: (
            "demo_run" in getattr(item, "fixturenames", ())
            and item.get_closest_marker("faults") is not None
        )
    )


@pytest.fixture(autouse=True, scope="session")
def clean_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests see none of the developer's stack variables, and Prefect keeps its files in temp."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(CLEAN_PREFIXES) and key not in KEEP:
            del os.environ[key]
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    # A test that finds a server gone fails in seconds, not after MLflow's minutes of retries.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "3"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    yield
    os.environ.clear()
    os.environ.update(saved)


def write_stack_config(root: Path, **extra: object) -> Path:
    """A config dir whose stack.yml puts the state in `root` and every service on free ports."""
    config = {**free_port_config(root), **extra}
    config_dir = root / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "stack.yml").write_text(yaml.safe_dump(config))
    return config_dir


def cli_command(args: tuple[str, ...], config_dir: Path | None) -> list[str]:
    config = ["--config-dir", str(config_dir)] if config_dir is not None else []
    return [sys.executable, "-m", "mnistops", *config, *args]


def run_cli(
    *args: str,
    config_dir: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run the installed `mnistops` command as a user would."""
    return subprocess.run(
        cli_command(args, config_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else dict(os.environ),
        cwd=cwd,
    )


@contextmanager
def cli_paused_at(
    *args: str,
    marker: str,
    config_dir: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> Iterator[subprocess.Popen[str]]:
    """Run the `mnistops` command until a line of its output contains `marker`; it is
    frozen (SIGSTOP) for the body of the `with` and let go (SIGCONT) afterwards. A test
    can thus break a service at an exact point of a command, with no race."""
    proc = subprocess.Popen(
        cli_command(args, config_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env if env is not None else dict(os.environ),
        cwd=cwd,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            raise AssertionError(f"never printed {marker!r}:\n{''.join(seen)}")
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            proc.output = seen  # type: ignore[attr-defined]
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
    except BaseException:
        proc.kill()
        raise


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    """Let a command started by cli_paused_at run to its end: exit code and whole output."""
    rest, _ = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(proc.output) + rest  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One SQLite-backed stack for the whole session, stopped at the end."""
    root = tmp_path_factory.mktemp("stack")
    settings = load_settings(write_stack_config(root))
    stack.up(settings)
    yield settings
    stack.down(settings)


def client_config(stack_settings: Settings, root: Path, bucket: str | None = None) -> Path:
    """A config dir for a machine that uses the session's stack from outside: its own state
    dir and data dir, the stack's URLs and keys, and (optionally) its own DVC bucket."""
    from mnistops.clients import s3_client
    from mnistops.stack.credentials import load_keys

    keys = load_keys(stack_settings.home)
    assert keys is not None
    s3 = {
        "endpoint_url": stack_settings.s3_endpoint,
        "access_key_id": keys.access_key_id,
        "secret_access_key": keys.secret_access_key,
    }
    if bucket:
        s3_client(stack_settings).create_bucket(Bucket=bucket)
        s3["buckets"] = {"dvc": bucket}
    config = {
        "home": str(root / ".mnistops"),
        "data_dir": str(root / "data"),
        "s3": s3,
        "mlflow": {"tracking_uri": stack_settings.mlflow_uri},
        "prefect": {"api_url": stack_settings.prefect_api_url},
    }
    config_dir = root / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "stack.yml").write_text(yaml.safe_dump(config))
    return config_dir


def client_with_v1(stack_settings: Settings, root: Path) -> Path:
    """The config dir of a machine with its own DVC bucket and v1.0 (--fast) published."""
    import uuid

    config_dir = client_config(stack_settings, root, bucket=f"dvc-{uuid.uuid4().hex[:8]}")
    for args in (("data", "ingest", "--fast"), ("data", "version", "v1.0", "-m", "first")):
        done = run_cli(*args, config_dir=config_dir)
        assert done.returncode == 0, done.stdout + done.stderr
    return config_dir


@contextmanager
def prefect_client(settings: Settings):
    """A client of the stack's Prefect server (this process imported prefect before the
    stack existed, so its settings must be given, not read from the environment)."""
    updates = {PREFECT_API_URL: settings.prefect_api_url}
    with temporary_settings(updates=updates), get_client(sync_client=True) as client:
        yield client


TEST_OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`mnistops demo --fast` as a new user runs it, in an empty folder, on its own stack
    (the browser tests look at what it leaves behind)."""
    root = tmp_path_factory.mktemp("demo")
    config_dir = write_stack_config(root)
    started = time.monotonic()
    done = run_cli("demo", "--fast", config_dir=config_dir, cwd=root, timeout=900)
    output = TEST_OUTPUT / "demo"
    output.mkdir(parents=True, exist_ok=True)
    (output / "demo-fast.txt").write_text(done.stdout + done.stderr)
    settings = load_settings(config_dir)
    yield {
        "root": root,
        "config_dir": config_dir,
        "settings": settings,
        "result": done,
        "seconds": time.monotonic() - started,
    }
    stack.down(settings)


def kill_service(settings: Settings, name: str) -> None:
    """kill -9 of a stack service's whole process group, as a crash would; returns once
    no process of the group runs. A zombie main thread whose other threads are still
    exiting counts as killed: waiting for those is `stack up`'s job, and this tests it."""
    import psutil

    from mnistops.stack import process

    record = process.read_record(stack.run_dir(settings), name)
    assert record is not None and process.is_alive(record), name
    group = os.getpgid(record.pid)
    os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        members = [
            p
            for p in psutil.process_iter(["status"])
            if _group_of(p.pid) == group and p.info["status"] != psutil.STATUS_ZOMBIE
        ]
        if not members and not process.is_alive(record):
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} survived SIGKILL for 60 s")


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
