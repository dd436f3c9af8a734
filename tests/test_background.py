"""A step run in another process (`mnistops.background`): its words told later in order,
its error raised, a death named, and a block that fails stops it cleanly first."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
import pytest

from mnistops import background
from mnistops.errors import BadInput, MnistopsError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other process imports this file's steps (`tests.test_background`)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "src")]))


class Listener:
    def __init__(self) -> None:
        self.heard: list[tuple[str, tuple[Any, ...]]] = []

    def say(self, message: str) -> None:
        self.heard.append(("say", (message,)))

    def published(self, *args: Any) -> None:
        self.heard.append(("published", args))


def speaks(words: list[str], reporter: Any) -> None:
    print("printed, not part of the answer")
    with reporter.progress() as progress_for:
        progress_for("counting", 3)(1)
    for word in words:
        reporter.say(word)
    reporter.published({"tag": "v2.0"}, None)


def fails(reporter: Any) -> None:
    reporter.say("before the failure")
    raise BadInput("flow.yml: key 'x' is unknown")


def dies(reporter: Any) -> None:
    print("its last words", file=sys.stderr)
    os._exit(3)


class Refused(BadInput):
    """An error made from more than its words (it does not pickle as it is)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"the dataset is invalid: {problems[0]}")


def refuses(reporter: Any) -> None:
    raise Refused(["train/3/bad.png: not an image"])


def is_killed(reporter: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def leaves_a_worker_then_is_killed(pid_file: str, reporter: Any) -> None:
    """A step whose worker (a fork: it holds the answer's pipe) outlives it."""
    worker = os.fork()
    if worker == 0:
        time.sleep(600)
        os._exit(0)
    Path(pid_file).write_text(str(worker))
    os.kill(os.getpid(), signal.SIGKILL)


def waits(flag: str, reporter: Any) -> None:
    Path(flag).write_text("started")
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        time.sleep(0.5)  # a cleanup that a second signal must not cut short
        Path(flag).write_text("cleaned up")
        raise


def test_what_the_step_said_is_told_in_order() -> None:
    with background.started("speaking", speaks, words=["one", "two"]) as job:
        pass
    listener = Listener()
    job.tell(listener)
    assert listener.heard == [
        ("say", ("one",)),
        ("say", ("two",)),
        ("published", ({"tag": "v2.0"}, None)),
    ]


def test_its_error_is_raised_after_its_words() -> None:
    with background.started("failing", fails) as job:
        pass
    listener = Listener()
    with pytest.raises(BadInput, match="flow.yml: key 'x' is unknown"):
        job.tell(listener)
    assert listener.heard == [("say", ("before the failure",))]


def test_a_step_that_dies_is_named_with_its_last_words() -> None:
    with background.started("dying", dies) as job:
        pass
    with pytest.raises(MnistopsError, match="dying") as raised:
        job.tell(Listener())
    assert "exit code 3" in str(raised.value) and "its last words" in str(raised.value)


def test_an_error_that_does_not_pickle_keeps_its_words_and_exit_code() -> None:
    with background.started("refusing", refuses) as job:
        pass
    with pytest.raises(BadInput) as raised:
        job.tell(Listener())
    assert str(raised.value) == "the dataset is invalid: train/3/bad.png: not an image"


def test_a_step_killed_by_a_signal_is_named_with_it() -> None:
    with background.started("publishing v2.0", is_killed) as job:
        pass
    with pytest.raises(
        MnistopsError, match="publishing v2.0 .in another process. was stopped by SIGKILL"
    ):
        job.tell(Listener())


def test_a_killed_step_whose_worker_lives_on_is_named_and_its_worker_stopped(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "worker"
    ended: list[background.Started] = []

    def run() -> None:
        with background.started(
            "writing the PNG folders", leaves_a_worker_then_is_killed, pid_file=str(pid_file)
        ) as job:
            pass
        ended.append(job)

    waiting = threading.Thread(target=run, daemon=True)
    waiting.start()
    waiting.join(30)
    worker = int(pid_file.read_text())
    if not ended:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the caller waited for ever on the worker that held the answer's pipe")
    with pytest.raises(MnistopsError, match="was stopped by SIGKILL"):
        ended[0].tell(Listener())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and psutil.pid_exists(worker):
        with suppress(psutil.Error):
            if psutil.Process(worker).status() == psutil.STATUS_ZOMBIE:
                break
        time.sleep(0.1)
    else:
        assert not psutil.pid_exists(worker), "the step's worker outlived it"


def test_a_failing_block_stops_the_step_and_waits_for_its_cleanup(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt), background.started("waiting", waits, flag=str(flag)):
        while not flag.exists():
            time.sleep(0.05)
        raise KeyboardInterrupt
    assert flag.read_text() == "cleaned up"
    assert time.monotonic() - began < 30


@pytest.mark.parametrize(
    ("told", "error", "said"),
    [
        ([("say", ("added 600 images to train",)), ("published", (1, 2))], None, "was published"),
        (
            [("say", ("added 600 images to train",))],
            KeyboardInterrupt(),
            "as after `mnistops data add`",
        ),
        ([], KeyboardInterrupt(), "the training folder is as it was"),
        ([], None, "see `mnistops data list`"),
    ],
    ids=["published", "added", "nothing", "unknown"],
)
def test_the_demo_says_what_became_of_a_stopped_v2(
    told: background.Told, error: BaseException | None, said: str
) -> None:
    from mnistops.demo import v2_stopped

    job = background.Started(None, None, "publishing v2.0", told, error)  # type: ignore[arg-type]
    assert said in v2_stopped(job)


@pytest.mark.parametrize(
    ("told", "warned"), [([("ingested", (None,))], False), ([], True)], ids=["done", "cut"]
)
def test_the_demo_warns_of_png_folders_a_stop_left_unfinished(
    told: background.Told, warned: bool
) -> None:
    from mnistops.demo import pngs_stopped

    job = background.Started(None, None, "writing the PNG folders", told)  # type: ignore[arg-type]
    reporter = background.Recorder()
    pngs_stopped(job, reporter)
    warnings = [args[0] for name, args in reporter.told if name == "warn"]
    assert bool(warnings) == warned
    assert all("running the demo again" in w for w in warnings)
