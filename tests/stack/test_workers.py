"""What `stack up` starts again of the background services `stack down` stopped."""

from __future__ import annotations

import json
import sys
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
