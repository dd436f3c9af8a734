"""A process record finds its process by when it started in clock ticks since boot, so a
stepped system clock (a VM resumed, NTP) never makes `stack down` or `stack status` lose
the services they started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
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


def test_a_service_whose_record_was_damaged_is_still_found_and_stopped(tmp_path: Path) -> None:
    """A record damaged by hand is removed as garbage; the service it named (and the
    child it started) is still found, by what `start` put in its environment, and
    stopped. A service of another state dir and a bystander are left alone."""
    parent_of_a_child = (
        "import subprocess, sys, time;"
        " subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        " time.sleep(60)"
    )
    run_dir, other_dir = tmp_path / "run", tmp_path / "other" / "run"
    server = process.start(
        "mlflow", [sys.executable, "-c", parent_of_a_child], {}, run_dir, tmp_path, ""
    )
    elsewhere = process.start(
        "mlflow", [sys.executable, "-c", "import time; time.sleep(60)"], {}, other_dir, tmp_path, ""
    )
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(server.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children()]
        assert len(tree) == 2, "the server started its child"
        process.record_path(run_dir, "mlflow").write_text("garbage{{{")
        assert process.read_record(run_dir, "mlflow") is None, "the damaged record is gone"

        found = process.unrecorded(run_dir)
        assert sorted(found) == ["mlflow"]
        assert sorted(p.pid for p in found["mlflow"]) == sorted(p.pid for p in tree)
        process.stop_processes(found["mlflow"], 5)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
        assert process.unrecorded(run_dir) == {}

        assert process.is_alive(elsewhere), "another state dir's service runs on"
        assert bystander.poll() is None, "a process `start` did not start runs on"
    finally:
        for pid in (server.pid, elsewhere.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        bystander.kill()


def test_a_record_copied_with_its_state_dir_never_stops_the_original(tmp_path: Path) -> None:
    """`cp -a` of a state dir copies its records: `stack down` in the copy must not stop
    the original's services. The same state dir by another spelling (a symlink) is
    still the same one."""
    run_dir, copy_dir = tmp_path / "a" / "run", tmp_path / "copy" / "run"
    server = process.start(
        "prefect", [sys.executable, "-c", "import time; time.sleep(60)"], {}, run_dir, tmp_path, ""
    )
    try:
        copy_dir.mkdir(parents=True)
        original = process.record_path(run_dir, "prefect").read_text()
        process.record_path(copy_dir, "prefect").write_text(original)
        assert process.read_record(copy_dir, "prefect") is None, "the copy names nothing"
        assert process.unrecorded(copy_dir) == {}
        assert process.is_alive(server), "the original runs on"
        record = process.read_record(run_dir, "prefect")
        assert record is not None and process.is_alive(record), "its own record still works"
        (tmp_path / "link").symlink_to(tmp_path / "a")
        process.record_path(run_dir, "prefect").unlink()
        assert sorted(process.unrecorded(tmp_path / "link" / "run")) == ["prefect"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
