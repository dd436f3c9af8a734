"""Shared fixtures: a clean environment, free ports, and stacks of real services in temp dirs."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mnistops import stack
from mnistops.settings import Settings, load_settings
from tests.helpers import (
    CHROMEDRIVER,
    CHROMIUM,
    FLAGS,
    SHOTS,
    TEST_OUTPUT,
    run_cli,
    write_stack_config,
)

CLEAN_PREFIXES = ("MNISTOPS_", "MLFLOW_", "PREFECT_", "AWS_")
KEEP = {"MNISTOPS_TEST_DATABASE_URL"}


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker chooses ports in its own part of the range: two workers that
    configure stacks at once never choose the same port before either starts (ci66 and
    ci70 lost a module's stack to another worker's S3 on a port both had chosen)."""
    from mnistops.stack import ports

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        ports.DEFAULT_LANE = (int(worker[2:]) % count, count)


DEMO_GROUP = "demo"

LONGEST_GROUPS = (
    DEMO_GROUP,
    "tests/tracking/test_runs.py",
    "tests/flows/test_retraining.py",
    "tests/stack/test_many_machines.py",
    "tests/stack/test_beside_the_stack.py",
    "tests/data/test_registry.py",
    "tests/data/test_publish_atomic.py",
    "tests/stack/test_lockdown.py",
    "tests/tracking/test_gate.py",
    "tests/test_readme_shell.py",
    "tests/test_unreachable.py",
    "tests/stack/test_stack.py",
    "tests/stack/test_postgres.py",
    "tests/data/test_order.py",
    "tests/data/test_attacks.py",
    "tests/flows/test_pools.py",
)
"""The groups that took longest in a clean-clone `make test` (its junit times summed per
group), longest first: they go to the workers first, so that none starts last. A group
left out goes after them (first if it holds a `slow` test); a stale order costs time,
never a result."""


UNIT_MARK = "mark.unit"
"""the text every test file with a unit test holds (`pytestmark = pytest.mark.unit` or
`@pytest.mark.unit`)"""


def only_the_unit_tier(config: pytest.Config) -> bool:
    """Whether this run selects the unit tier alone (`make test-fast`: `-m unit`)."""
    return str(config.getoption("markexpr", "")).strip() == "unit"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`-m unit` does not import the test files that mark no test `unit`: they import
    MLflow, pandas and the services' helpers, about a tenth of the tier's time, only for
    their tests to be deselected. Every other run fails a unit test in a file without
    that text (`marking_mistake`)."""
    name = collection_path.name
    if only_the_unit_tier(config) and name.startswith("test_") and name.endswith(".py"):
        return UNIT_MARK not in collection_path.read_text(encoding="utf-8") or None
    return None


TIERS = ("unit", "integration")
MARKING_MISTAKE = pytest.StashKey[str]()


@functools.cache
def marks_unit_tests(path: Path) -> bool:
    return UNIT_MARK in path.read_text(encoding="utf-8")


def marking_mistake(item: pytest.Item) -> str | None:
    """Why the test is marked wrongly: in no tier or in both (`make test-fast` would
    miss it), a unit test where `-m unit` does not look (`pytest_ignore_collect`), or
    `slow` without its one-line reason; None when it is marked right."""
    tiers = [tier for tier in TIERS if item.get_closest_marker(tier) is not None]
    if len(tiers) != 1:
        return f"marked {tiers or 'with no tier'}: mark it unit or integration"
    if tiers == ["unit"] and not marks_unit_tests(item.path):
        return (
            f"a unit test in a file without the text {UNIT_MARK!r}, which `make test-fast`"
            " (-m unit) does not collect: mark it with pytest.mark.unit"
        )
    slow = item.get_closest_marker("slow")
    if slow is not None and not (len(slow.args) == 1 and str(slow.args[0]).strip()):
        return 'slow without its reason: write slow("why, in one line")'
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if MARKING_MISTAKE in item.stash:
        pytest.fail(item.stash[MARKING_MISTAKE], pytrace=False)


def worker_group(item: pytest.Item) -> str:
    """The worker group (pytest-xdist's `loadgroup`) a test runs in: every test on the
    demo's stack in one, so that the demo runs once; any other test with its file, so
    that a module's stack starts once."""
    if "demo_run" in getattr(item, "fixturenames", ()):
        return DEMO_GROUP
    return item.nodeid.split("::")[0]


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`, handing a worker its next group only when one test of its
    group is left, not two: xdist's own rule queued a long group behind the last two
    tests of another (measured: the run's longest worker had many_machines' last two,
    ~200 s, before tracking/test_runs), while other workers ran out of work."""
    if config.getoption("dist", None) != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class OneTestAhead(LoadGroupScheduling):
        def _reschedule(self, node: Any) -> None:
            if self.workqueue and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return OneTestAhead(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups are handed to the workers longest first (LONGEST_GROUPS, then the others
    that hold a test marked `slow`). Within the demo's group, tests that kill
    its services run after every test that only looks at it, so that a failure to bring
    it back cannot fail those too; tests that may start a retraining on it (a drift
    event) run last, so that no model it registers changes what the others find."""
    for item in items:
        if (mistake := marking_mistake(item)) is not None:
            item.stash[MARKING_MISTAKE] = mistake
    groups = {item.nodeid: worker_group(item) for item in items}
    slow = {groups[i.nodeid] for i in items if i.get_closest_marker("slow")}
    rank = {group: place for place, group in enumerate(LONGEST_GROUPS)}

    def on_demo(item: pytest.Item, marker: str) -> bool:
        return groups[item.nodeid] == DEMO_GROUP and item.get_closest_marker(marker) is not None

    def group_rank(item: pytest.Item) -> tuple[int, int]:
        group = groups[item.nodeid]
        if group in rank:
            return (0, rank[group])
        return (1 if group in slow else 2, 0)

    items.sort(
        key=lambda item: (
            group_rank(item),
            on_demo(item, "retrains"),
            on_demo(item, "faults"),
        )
    )
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))


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


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One SQLite-backed stack for the whole session, stopped at the end."""
    root = tmp_path_factory.mktemp("stack")
    settings = load_settings(write_stack_config(root))
    stack.up(settings)
    yield settings
    stack.down(settings)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`mnistops demo --fast` as a new user runs it, in an empty folder, on its own stack
    (the browser tests look at what it leaves behind)."""
    root = tmp_path_factory.mktemp("demo")
    config_dir = write_stack_config(root)
    # a lenient gate: the loop's retraining (a --fast model on a few hundred more images)
    # takes champion when it fixes more test images than it breaks, and the test sees the
    # service swap to it
    (config_dir / "flow.yml").write_text(
        "model_registry:\n  significance: 1.0\n  max_class_drop: 100\n"
    )
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


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Headless Chromium driven by Selenium (the system's browser: nothing is downloaded)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = "no chromium/chromedriver: apt-get install chromium chromium-driver"
        if os.environ.get("MNISTOPS_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(20)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
