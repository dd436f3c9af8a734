"""One step of a story run in another process while the story goes on, its words told
later in its own place.

The demo publishes v2.0 while v1.0 trains: most of a training (imports, MLflow calls, the
evaluation, the registration) keeps one core of two busy, and so does a publication: side
by side, the two stages took 13 s less of the demo on two cores (README, the walkthrough).
The step runs in a
fresh interpreter (`python -c`, not a fork: the parent's threads and open clients stay
its own), with a `Recorder` for its reporter: what it says is kept and told to the real
reporter by `Started.tell`, in order, with its error if it failed.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

from mnistops.compat import leave
from mnistops.errors import MnistopsError

ENTRY = "from mnistops.background import main; main()"
STOP_WAIT_S = 120.0
"""how long a step that was told to stop may take to leave nothing half-made"""
Told = list[tuple[str, tuple[Any, ...]]]


class Recorder:
    """A reporter that keeps what it is told and shows no progress."""

    def __init__(self) -> None:
        self.told: Told = []

    def progress(self) -> nullcontext[Callable[[str, int], Callable[[int], None]]]:
        return nullcontext(lambda _label, _total: lambda _n: None)

    def busy(self, _title: str) -> nullcontext[Callable[[str], None]]:
        return nullcontext(lambda _message: None)

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):
            raise AttributeError(name)

        def keep(*args: Any) -> None:
            self.told.append((name, args))

        return keep


@dataclass
class Started:
    """A step running in another process (`started`); once the block ended, what it said."""

    process: subprocess.Popen[bytes]
    errors: Any
    """the file the step's own stderr goes to (read when it failed)"""
    what: str
    told: Told = field(default_factory=list)
    error: BaseException | None = None

    def tell(self, reporter: Any) -> None:
        """Tell `reporter` what the step said, in order; then raise its error, if any."""
        for name, args in self.told:
            getattr(reporter, name)(*args)
        if self.error is not None:
            raise self.error


@contextmanager
def started(
    what: str,
    function: Callable[..., None],
    stopped: Callable[[Started], None] = lambda _job: None,
    **arguments: Any,
) -> Iterator[Started]:
    """`function(**arguments, reporter=Recorder())` in another process while the block
    runs; when the block ends, the step's words and error are in the `Started` it yielded.
    A block that fails (Ctrl-C included) stops the step first: it is interrupted as by
    Ctrl-C and waited for, so that it leaves nothing half-made; then `stopped(job)`, with
    what the step had said, can tell what became of it."""
    call = pickle.dumps((function, arguments))  # a module-level function: by its name
    with tempfile.TemporaryFile() as errors:
        # its own process group: what the step starts (an ingest's workers) is stopped
        # with it, and none of it outlives it holding the answer's pipe open
        process = subprocess.Popen(
            [sys.executable, "-c", ENTRY],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            process_group=0,
        )
        job = Started(process, errors, what)
        assert process.stdin is not None
        process.stdin.write(call)
        process.stdin.close()
        process.stdin = None  # written and closed: `communicate` has nothing to send
        reader = _Reader(process)
        try:
            yield job
        except BaseException:
            _collect(job, _stop(process, reader))
            stopped(job)
            raise
        process.wait()
        _collect(job, reader.answer())


class _Reader:
    """Reads the step's answer while it runs (an answer larger than the pipe's buffer
    would otherwise block it); `answer` once it exited: what it wrote, after its group's
    leftovers were killed (a killed step's workers would hold the pipe open for ever)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        self.chunks.append(self.process.stdout.read())

    def answer(self) -> bytes:
        _signal_group(self.process, signal.SIGKILL)
        self.thread.join()
        return b"".join(self.chunks)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):  # the group is empty: all gone
        os.killpg(process.pid, signum)


def _stop(process: subprocess.Popen[bytes], reader: _Reader) -> bytes:
    """Interrupt the step and wait for it to clean up; its answer (empty if it had none)."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()
    return reader.answer()


def _collect(job: Started, answer: bytes) -> None:
    try:
        job.told, job.error = pickle.loads(answer)
    except Exception:  # noqa: BLE001  no answer: the process died; its stderr says why
        job.errors.seek(0)
        last = job.errors.read().decode(errors="replace").strip().splitlines()[-5:]
        code = job.process.returncode
        ended = (
            f"was stopped by {signal.Signals(-code).name}"
            if code < 0 and -code in signal.valid_signals()
            else f"ended with exit code {code}"
        )
        job.error = MnistopsError(
            f"{job.what} (in another process) {ended}"
            + (":\n  " + "\n  ".join(last) if last else "")
            + "\nRun the command again: what it had done is kept or undone."
        )


def main() -> None:
    """The other process: the call from stdin, what it told and its error to stdout."""
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the step prints goes to stderr, never into the answer
    _interrupted_once()
    function, arguments = pickle.load(sys.stdin.buffer)
    recorder = Recorder()
    error: BaseException | None = None
    try:
        function(**arguments, reporter=recorder)
    except BaseException as exc:  # noqa: BLE001  sent to the parent, which raises it
        error = _sendable(exc)
    pickle.dump((recorder.told, error), answer)
    answer.close()
    leave(0)  # the parent waits for the exit: not for the teardown of what the step imported


def _interrupted_once() -> None:
    """SIGTERM or Ctrl-C interrupts the step once (as KeyboardInterrupt); a second signal
    does not interrupt its cleanup (the terminal's Ctrl-C and the parent's SIGTERM)."""

    def interrupt(_signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def _sendable(error: BaseException) -> BaseException:
    """The error itself where it pickles; else the nearest of its mnistops kinds that
    does, with its words (the same message and exit code); else its type and words."""
    if _pickles(error):
        return error
    for kind in type(error).__mro__:
        if isinstance(kind, type) and issubclass(kind, MnistopsError):
            try:
                again = kind(str(error))
            except Exception:  # noqa: BLE001  a kind made otherwise: the next one
                continue
            if str(again) == str(error) and _pickles(again):
                return again
    return MnistopsError(f"{type(error).__name__}: {error}")


def _pickles(error: BaseException) -> bool:
    """Whether the error arrives whole: unpickled (made again from its args), it has the
    same type and words."""
    try:
        again = pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001  any failure to travel
        return False
    return type(again) is type(error) and str(again) == str(error)
