"""What tests share that is not a fixture: the `mnistops` command run as a user runs it,
config dirs for a stack and for machines that use it, a crash of a service, and an
attacker's hand in the bucket."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mnistops import stack
from mnistops.clients import s3_client
from mnistops.data import manifests, packs, remote
from mnistops.settings import Settings
from mnistops.stack.ports import free_port_config


def put_object(settings: Settings, key: str, body: bytes) -> None:
    """Write one object to the DVC bucket with the stack's keys, as anyone holding them can."""
    s3_client(settings).put_object(Bucket=settings.s3.buckets.dvc, Key=key, Body=body)


def craft_version(
    settings: Settings,
    tag: str,
    images: dict[str, bytes],
    key: str | None = None,
    filler: bytes = b"",
    **record_changes: object,
) -> str:
    """Publish a version by hand, bypassing every check of `data version`: a pack of the
    given bytes, a manifest naming them by the given paths (any string), and a record
    stored under versions/<key or tag>.json that agrees with the manifest (counts and
    content hash), so that what is tested is the manifest itself. With `filler` (an
    image's bytes), every class of both splits gets one more image. Returns the key."""
    if filler:
        images = {**images}
        for split in packs.SPLIT_NAMES:
            for digit in packs.DIGIT_NAMES:
                images[f"{split}/{digit}/filler.png"] = filler
    pack = b"".join(images.values())
    pack_md5 = packs.md5_bytes(pack)
    rows, offset = [], 0
    counts = {s: dict.fromkeys(packs.DIGIT_NAMES, 0) for s in packs.SPLIT_NAMES}
    for path, data in images.items():
        rows.append([path, hashlib.sha256(data).hexdigest(), pack_md5, offset, len(data)])
        offset += len(data)
        split, digit = (path.split("/") + ["", ""])[:2]
        if split in counts and digit in counts[split]:
            counts[split][digit] += 1
    manifest = gzip.compress(
        json.dumps({"columns": manifests.MANIFEST_COLUMNS, "rows": rows}).encode()
    )
    manifest_md5 = packs.md5_bytes(manifest)
    put_object(settings, remote.object_key(pack_md5), pack)
    put_object(settings, remote.object_key(manifest_md5), manifest)
    record = {
        "tag": tag,
        "message": "crafted",
        "created": "2099-01-01T00:00:00+00:00",
        "content_hash": manifests.rows_content_hash(manifests.ManifestRow._make(r) for r in rows),
        "counts": counts,
        "files": {packs.MANIFEST: manifest_md5, f"packs/{pack_md5}.pack": pack_md5},
        "previous": None,
        "commit": None,
        "remote": "",
        "format": packs.FORMAT,
        **record_changes,
    }
    object_key = f"{packs.VERSIONS_PREFIX}{key or tag}.json"
    put_object(settings, object_key, json.dumps(record).encode())
    return object_key


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


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port held by this process but not listening: connections to it are
    refused at once, and no other process takes it while the block runs."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield int(holder.getsockname()[1])


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    """Let a command started by cli_paused_at run to its end: exit code and whole output."""
    rest, _ = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(proc.output) + rest  # type: ignore[attr-defined]


def client_config(stack_settings: Settings, root: Path, bucket: str | None = None) -> Path:
    """A config dir for a machine that uses the session's stack from outside: its own state
    dir and data dir, the stack's URLs and keys, and (optionally) its own DVC bucket."""
    from mnistops.clients import s3_client
    from mnistops.credentials import ensure_model_key, load_keys

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
        "model_registry": {"signing_key": ensure_model_key(stack_settings.home)},
    }
    config_dir = root / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "stack.yml").write_text(yaml.safe_dump(config))
    return config_dir


def _read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def write_flow_yml(config_dir: Path, flow: dict[str, Any]) -> None:
    """flow.yml in a client's config dir, keeping the model signing key that
    `client_config` wrote (a top-level key lives in one file only, so it moves from
    stack.yml into flow.yml's `model_registry`)."""
    stack_config = _read_yaml(config_dir / "stack.yml")
    kept = stack_config.pop("model_registry", None) or _read_yaml(config_dir / "flow.yml").get(
        "model_registry", {}
    )
    key = kept.get("signing_key")
    if key:
        flow = {**flow, "model_registry": {"signing_key": key, **flow.get("model_registry", {})}}
    if (config_dir / "stack.yml").is_file():
        (config_dir / "stack.yml").write_text(yaml.safe_dump(stack_config))
    (config_dir / "flow.yml").write_text(yaml.safe_dump(flow))


def client_with_v1(stack_settings: Settings, root: Path) -> Path:
    """The config dir of a machine with its own DVC bucket and v1.0 (--fast) published."""
    import uuid

    config_dir = client_config(stack_settings, root, bucket=f"dvc-{uuid.uuid4().hex[:8]}")
    for args in (("data", "ingest", "--fast"), ("data", "version", "v1.0", "-m", "first")):
        done = run_cli(*args, config_dir=config_dir)
        assert done.returncode == 0, done.stdout + done.stderr
    return config_dir


TEST_OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


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


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = TEST_OUTPUT / "screenshots"
"""the browser tests' screenshots"""
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1800,1000",
]
