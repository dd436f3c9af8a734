"""What `stack up` starts again of the background services `stack down` stopped."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from mnistops.settings import STACK_KEYS, load_settings
from mnistops.stack import process, run_dir, workers
from tests.helpers import write_stack_config

pytestmark = pytest.mark.unit


def test_up_does_not_start_serve_again_on_settings_serve_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad `model_registry` in flow.yml: `stack up` works (the key set aside), but the
    detached prediction service would die on it at once; it is not started, the line
    says why, and its mark stays for the `up` after the fix."""
    config_dir = write_stack_config(tmp_path)
    (config_dir / "flow.yml").write_text("model_registry:\n  name: [not, a, name]\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(config_dir, STACK_KEYS)
    assert "model_registry" in settings.set_aside_keys
    spec = workers.spec_path(settings, workers.SERVE_NAME)
    spec.parent.mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    spec.write_text(json.dumps({"cmd": sleeper, "env": {}, "url": "", "restart": True}))
    said: list[str] = []
    workers.restart_workers(settings, said.append)
    started = process.read_record(run_dir(settings), workers.SERVE_NAME)
    if started is not None:
        process.stop(started, run_dir(settings), grace_s=1)
    assert started is None, "the service was not started on settings it refuses"
    assert len(said) == 1 and said[0].startswith("not starting serve again"), said
    assert "model_registry" in said[0]
    assert json.loads(spec.read_text())["restart"] is True, "the next `up` starts it"


LOADING_SERVICE = """
import http.server, json, sys, time
ready_at = time.monotonic() + float(sys.argv[2])
refuses = sys.argv[3] == "refuses"
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ready = time.monotonic() >= ready_at and not refuses
        said = {"status": "ready" if ready else "refused" if refuses else "loading"}
        self.send_response(200 if ready else 503)
        self.end_headers()
        self.wfile.write(json.dumps(said).encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("mode", ["loads", "dies", "refuses"])
def test_up_waits_for_the_prediction_service_it_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """`stack up` prints its table once the service it started again has loaded the
    champion (it showed "unhealthy" while it loaded); one that dies at start is not
    waited for, and the line names its log; one that refuses the champion is not waited
    for either, and the line says why (a helper waited 30 s for no word of it)."""
    import httpx

    monkeypatch.chdir(tmp_path)
    settings = load_settings(write_stack_config(tmp_path), STACK_KEYS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = [sys.executable, "-c", LOADING_SERVICE, str(port), "1.5", mode]
    cmd = service if mode != "dies" else [sys.executable, "-c", "raise SystemExit(3)"]
    spec = workers.spec_path(settings, workers.SERVE_NAME)
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"cmd": cmd, "env": {}, "url": url, "restart": True}))
    said: list[str] = []
    began = time.monotonic()
    workers.restart_workers(settings, said.append)
    took = time.monotonic() - began
    started = process.read_record(run_dir(settings), workers.SERVE_NAME)
    assert started is not None
    try:
        if mode == "loads":
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert said == ["starting serve again (`stack down` stopped it)"], said
        else:
            assert took < workers.SERVE_READY_S / 2, f"waited {took:.1f} s ({mode})"
        if mode == "dies":
            assert said[-1] == "serve stopped as it started: see `mnistops stack logs serve`"
        if mode == "refuses":
            assert "serve runs but serves no model: it refused the champion" in said[-1], said
    finally:
        process.stop(started, run_dir(settings), grace_s=1)


def test_a_background_service_that_died_is_started_again_by_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A detached worker or service killed (kill -9, a crash) is started again by the
    next `stack up`, and `stack down` in between does not forget it (found by a helper:
    the service stayed down, then vanished from the table)."""
    import os
    import signal

    from mnistops import stack
    from mnistops.stack.state import log_dir

    monkeypatch.chdir(tmp_path)
    settings = load_settings(write_stack_config(tmp_path), STACK_KEYS)
    name = f"{workers.WORKER_PREFIX}cpu"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    spec = workers.spec_path(settings, name)
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"cmd": sleeper, "env": {}, "url": "pool cpu", "restart": False}))
    first = process.start(name, sleeper, dict(os.environ), run_dir(settings), log_dir(settings), "")
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not process.exited(first) and time.monotonic() < deadline:
        time.sleep(0.05)
    said: list[str] = []
    workers.restart_workers(settings, said.append)
    second = process.read_record(run_dir(settings), name)
    assert second is not None and second.pid != first.pid and process.is_alive(second)
    assert said == [f"starting {name} again (it had died)"], said
    workers.restart_workers(settings, said.append)
    assert len(said) == 1, "a live one is left alone"

    os.kill(second.pid, signal.SIGKILL)
    while not process.exited(second) and time.monotonic() < deadline:
        time.sleep(0.05)
    stack.down(settings)
    said.clear()
    workers.restart_workers(settings, said.append)
    third = process.read_record(run_dir(settings), name)
    try:
        assert third is not None and process.is_alive(third), said
        assert said == [f"starting {name} again (`stack down` stopped it)"], said
    finally:
        if third is not None:
            process.stop(third, run_dir(settings), grace_s=1)
