"""A process record finds its process by when it started in clock ticks since boot, so a
stepped system clock (a VM resumed, NTP) never makes `stack down` or `stack status` lose
the services they started."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from mnistops.stack import process

pytestmark = pytest.mark.unit


def test_a_record_finds_its_process_after_the_clock_moved() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
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
