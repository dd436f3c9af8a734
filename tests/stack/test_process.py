"""A process record finds its process by when it started in clock ticks since boot, so a
stepped system clock (a VM resumed, NTP) never makes `stack down` or `stack status` lose
the services they started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mnistops.stack import process

pytestmark = pytest.mark.unit


def test_a_record_finds_its_process_after_the_clock_moved() -> None:
    child = subprocess.Popen(  # in its own session, as `process.start` starts services
        [sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True
    )
    try:
        ticks = process.start_ticks(child.pid)
        assert ticks is not None
        moved = psutil.Process(child.pid).create_time() + 120  # the wall clock stepped
        record = process.ProcessRecord("t", child.pid, moved, os.devnull, "", ticks)
        assert process.is_alive(record)
        other = process.ProcessRecord("t", child.pid, moved, os.devnull, "", ticks + 1)
        assert not process.is_alive(other), "a reused pid is another process"
    finally:
        child.kill()
        child.wait()
    assert not process.is_alive(record)


def test_a_crafted_record_never_names_another_process_of_the_user(tmp_path: Path) -> None:
    """Its pid and start time are public in /proc; the process is not one `stack up`
    started (no session of its own), so status and down see nothing to stop."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        ticks = process.start_ticks(bystander.pid)
        created = psutil.Process(bystander.pid).create_time()
        crafted = process.ProcessRecord("mlflow", bystander.pid, created, os.devnull, "", ticks)
        (tmp_path / "mlflow.json").write_text(json.dumps(crafted.__dict__))
        record = process.read_record(tmp_path, "mlflow")
        assert record is not None and not process.is_alive(record)
        process.stop(record, tmp_path)
        assert bystander.poll() is None, "the bystander still runs"
    finally:
        bystander.kill()


GARBAGE = {
    "pid as text": {"pid": "1523"},
    "negative pid": {"pid": -1},
    "pid 1": {"pid": 1},
    "start ticks as text": {"start_ticks": "25"},
    "a list": None,
}


@pytest.mark.parametrize("change", GARBAGE.values(), ids=list(GARBAGE))
def test_a_malformed_record_is_removed_not_a_traceback(tmp_path: Path, change: dict | None) -> None:
    good = {"name": "mlflow", "pid": 4242, "create_time": 1.0, "log": "", "url": ""}
    body = [1, 2] if change is None else {**good, **change}
    (tmp_path / "mlflow.json").write_text(json.dumps(body))
    assert process.read_record(tmp_path, "mlflow") is None
    assert not (tmp_path / "mlflow.json").exists(), "garbage is removed"


def test_a_fifo_or_a_link_as_record_neither_hangs_nor_is_followed(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "mlflow.json")
    began = time.monotonic()
    assert process.read_record(tmp_path, "mlflow") is None
    assert time.monotonic() - began < 5 and not (tmp_path / "mlflow.json").exists()
    target = tmp_path / "elsewhere.json"
    target.write_text('{"name": "s3", "pid": 4242, "create_time": 1.0, "log": "", "url": ""}')
    (tmp_path / "s3.json").symlink_to(target)
    assert process.read_record(tmp_path, "s3") is None
    assert target.is_file() and not (tmp_path / "s3.json").is_symlink()


def test_stopping_several_waits_for_each_together_and_no_longer_than_it_must(
    tmp_path: Path,
) -> None:
    """`stop_all`: every service gets SIGTERM at once; one that ends at once is not
    waited for (an unreaped zombie has ended), one that ignores SIGTERM is killed after
    its grace, and the slowest sets the time, not their sum."""
    quick = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    ignoring = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('ready', flush=True); time.sleep(60)"
    )
    stubborn = [
        subprocess.Popen(
            [sys.executable, "-c", ignoring],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    for child in stubborn:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    records = []
    for name, child in (("quick", quick), ("stubborn-1", stubborn[0]), ("stubborn-2", stubborn[1])):
        ticks = process.start_ticks(child.pid)
        assert ticks is not None
        created = psutil.Process(child.pid).create_time()
        records.append(process.ProcessRecord(name, child.pid, created, os.devnull, "", ticks))
    began = time.monotonic()
    process.stop_all(records, tmp_path, grace_s=1.0)
    took = time.monotonic() - began
    assert not any(process.is_alive(r) for r in records), "both ended (and were reaped)"
    assert 0.95 < took < 1.9, f"the stubborn ones are killed after one grace: {took:.1f} s"
