"""A background service started again by `stack up` gets the settings it was started
with: a prediction service started with an API key in the environment is not started
again without it from a shell that lacks the variable."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from mnistops.settings import load_settings
from mnistops.stack import process
from mnistops.stack.state import run_dir
from mnistops.stack.workers import spec_path, start_background

pytestmark = [pytest.mark.integration, pytest.mark.security]


def test_a_restart_keeps_the_services_own_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(tmp_path / "config")
    monkeypatch.setenv("MNISTOPS_SERVE__API_KEY", "k3y-of-the-service")
    monkeypatch.setenv("UNRELATED_SHELL_VARIABLE", "x")
    env = {**os.environ, "MNISTOPS_HOME": str(settings.home)}
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    record = start_background(settings, "serve", cmd, env, "http://127.0.0.1:1", "a sleeper")
    try:
        spec = json.loads(spec_path(settings, "serve").read_text())
        assert spec["env"]["MNISTOPS_SERVE__API_KEY"] == "k3y-of-the-service"
        assert "UNRELATED_SHELL_VARIABLE" not in spec["env"]
        assert "MNISTOPS_S3__ENDPOINT_URL" not in spec["env"], "derived: taken fresh"
        assert oct(spec_path(settings, "serve").stat().st_mode & 0o777) == "0o600"
    finally:
        process.stop(record, run_dir(settings))
