"""A command ends as the interpreter would end it, without its teardown: the same exit
status, every line it wrote, its threads finished and its exit handlers run, whatever
was left behind (an idle thread pool, buffered output)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

LEAVING = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from mnistops import compat
out = sys.argv[1]
if sys.argv[3] == "without":
    compat.before_teardown = lambda: None
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))

def late():
    time.sleep(0.5)
    open(out + ".thread", "w").write("done")

threading.Thread(target=late).start()
ThreadPoolExecutor(2).submit(lambda: None).result()  # its idle workers stay behind
print("said, not flushed", end="")
compat.leave(eval(sys.argv[2]))
"""


@pytest.mark.parametrize("private", ["with", "without"])
@pytest.mark.parametrize(
    ("code", "status", "error"),
    [("None", 0, ""), ("0", 0, ""), ("3", 3, ""), ("'why it stopped'", 1, "why it stopped")],
)
def test_a_command_leaves_with_its_status_its_words_its_threads_and_handlers(
    tmp_path: Path, code: str, status: int, error: str, private: str
) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", LEAVING, str(out), code, private],
        capture_output=True,
        text=True,
        timeout=60,  # an idle pool's workers not told to stop would wait here forever
    )
    assert done.returncode == status, done.stderr
    assert done.stdout == "said, not flushed"
    assert done.stderr.strip() == error
    assert (tmp_path / "out.thread").read_text() == "done", "the thread was cut short"
    assert (tmp_path / "out.atexit").read_text() == "ran", "the exit handler did not run"


def test_a_real_command_keeps_its_exit_codes(tmp_path: Path) -> None:
    mnistops = [sys.executable, "-m", "mnistops", "--config-dir", str(tmp_path)]
    helped = subprocess.run([*mnistops, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "Usage" in helped.stdout
    refused = subprocess.run(
        [*mnistops, "train", "--epochs", "0"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--epochs" in refused.stdout + refused.stderr


@pytest.mark.parametrize("closed", [1, 2], ids=["stdout", "stderr"])
def test_a_command_started_with_an_output_closed_keeps_its_status(
    tmp_path: Path, closed: int
) -> None:
    """`mnistops ... >&-` (Python then has no sys.stdout): the same status, no traceback."""
    mnistops = [sys.executable, "-m", "mnistops", "--config-dir", str(tmp_path)]
    for args, status in ((["--help"], 0), (["train", "--epochs", "0"], 2)):
        done = subprocess.run(
            [*mnistops, *args],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=lambda: os.close(closed),  # as the shell's `>&-` does
        )
        assert done.returncode == status, done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr


def test_help_to_a_full_disk_is_one_line() -> None:
    """The top-level help is printed before any command runs (helper-38's find)."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "mnistops", "--help"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "No space left on device" in done.stderr
