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
import http.server, sys, time
ready_at = time.monotonic() + float(sys.argv[2])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if time.monotonic() >= ready_at else 503)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("loads_s", [1.5, None])
def test_up_waits_for_the_prediction_service_it_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loads_s: float | None
) -> None:
    """`stack up` prints its table once the service it started again has loaded the
    champion (it showed "unhealthy" while it loaded); one that dies at start is not
    waited for, and the line names its log."""
    import httpx

    monkeypatch.chdir(tmp_path)
    settings = load_settings(write_stack_config(tmp_path), STACK_KEYS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = [sys.executable, "-c", LOADING_SERVICE, str(port), str(loads_s)]
    cmd = service if loads_s is not None else [sys.executable, "-c", "raise SystemExit(3)"]
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
        if loads_s is not None:
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert said == ["starting serve again (`stack down` stopped it)"], said
        else:
            assert took < workers.SERVE_READY_S / 2, f"waited {took:.1f} s for a dead service"
            assert said[-1] == "serve is not ready yet: see `mnistops stack logs serve`", said
    finally:
        process.stop(started, run_dir(settings), grace_s=1)
