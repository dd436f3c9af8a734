"""The suite's parallel run keeps its groups: every test on the demo's stack in one worker
(the demo runs once) and each other file in one worker (its module stack starts once).
Run on a small suite of its own with the real grouping hook, in `make test`'s workers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CONFTEST = """
import os
import pytest
from tests.conftest import (  # the suite's own hooks
    pytest_collection_modifyitems,
    pytest_xdist_make_scheduler,
)


@pytest.fixture(scope="session")
def demo_run():
    return os.environ["PYTEST_XDIST_WORKER"]
"""

TEST_FILE = """
import os
import time

def where(name):
    with open(os.environ["WHERE"], "a") as out:
        out.write(f"{{name}} {{os.environ['PYTEST_XDIST_WORKER']}}\\n")
    time.sleep(0.3)

{tests}
"""


def make_flags() -> list[str]:
    """The flags of `make test`'s pytest (the Makefile is what users run)."""
    recipe = (REPO / "Makefile").read_text().split("\ntest: setup", 1)[1].split("\n\n", 1)[0]
    flags = re.search(r"-m pytest \\\s*\n\s*(.*)", recipe)
    assert flags, recipe
    workers = re.search(r"TEST_WORKERS \?= (\d+)", (REPO / "Makefile").read_text())
    assert workers
    return flags.group(1).replace("$(TEST_WORKERS)", workers.group(1)).split()


@pytest.mark.integration
def test_groups_stay_on_one_worker(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    names = {}
    for file in "abcd":
        demo = [f"def test_{file}_demo{i}(demo_run): where('{file}-demo')" for i in range(2)]
        own = [f"def test_{file}_own{i}(): where('{file}-own')" for i in range(3)]
        (suite / f"test_{file}.py").write_text(TEST_FILE.format(tests="\n".join(demo + own)))
        names[file] = demo + own
    where = tmp_path / "where.txt"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *make_flags(),
            "-p",
            "no:cacheprovider",
            "-q",
            "-o",
            "addopts=",
            "--rootdir",
            str(suite),
            str(suite),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "WHERE": str(where)},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ran: dict[str, set[str]] = {}
    for line in where.read_text().splitlines():
        group, worker = line.split()
        ran.setdefault(group.split("-")[1] if "demo" in group else group, set()).add(worker)
    assert sum(1 for _ in where.read_text().splitlines()) == 20
    assert all(len(workers) == 1 for workers in ran.values()), ran
    # and the work was shared: more than one worker ran something
    assert len(set().union(*ran.values())) > 1, ran


@pytest.mark.unit
def test_the_longest_groups_name_groups_that_exist() -> None:
    """A renamed or removed file in the scheduling order is named here, not silently
    scheduled last."""
    from tests.conftest import DEMO_GROUP, LONGEST_GROUPS

    missing = [g for g in LONGEST_GROUPS if g != DEMO_GROUP and not (REPO / g).is_file()]
    assert missing == [], f"LONGEST_GROUPS in tests/conftest.py names no file: {missing}"
    assert len(set(LONGEST_GROUPS)) == len(LONGEST_GROUPS)
