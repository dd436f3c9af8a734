import json
import stat
from pathlib import Path

import pytest

from mnistops.credentials import ensure_keys, keys_path, seaweed_identities

pytestmark = pytest.mark.unit


def test_keys_are_generated_once_and_private(tmp_path: Path) -> None:
    keys = ensure_keys(tmp_path)
    assert len(keys.access_key_id) >= 32 and len(keys.secret_access_key) >= 32
    mode = stat.S_IMODE(keys_path(tmp_path).stat().st_mode)
    assert mode == 0o600
    assert ensure_keys(tmp_path) == keys, "a second call reuses the stored keys"
    assert ensure_keys(tmp_path / "other") != keys, "another state dir gets other keys"


def test_identities_have_no_anonymous_access(tmp_path: Path) -> None:
    identities = json.loads(seaweed_identities(ensure_keys(tmp_path)))["identities"]
    assert [i["name"] for i in identities] == ["mnistops"]


LOGIN_TRUST_CASES = {"": 60, "  auth_cache_s: 0\n": 0}
"""what stack.yml says under `mlflow:` → how long MLflow's login app trusts a login (s)"""


def test_mlflows_login_app_reads_how_long_it_trusts_a_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ini the stack writes for MLflow's basic-auth app, read by MLflow's own reader
    (in a process of its own, as the server reads it: importing MLflow's auth app here
    would build that app inside the test run); one process reads every case's ini."""
    import subprocess
    import sys

    from mnistops.settings import load_settings
    from mnistops.stack.services import mlflow_service

    ini_paths = []
    for number, configured in enumerate(LOGIN_TRUST_CASES):
        case = tmp_path / f"case-{number}"
        (case / "config").mkdir(parents=True)
        (case / "config" / "stack.yml").write_text(f"mlflow:\n  auth: true\n{configured}")
        monkeypatch.chdir(case)
        service = mlflow_service(load_settings(case / "config"), None)
        service.prepare()
        ini_paths.append(service.env["MLFLOW_AUTH_CONFIG_PATH"])
    code = (
        "import os, sys\n"
        "from mlflow.server.auth.config import read_auth_config\n"
        "for path in sys.argv[1:]:\n"
        "    os.environ['MLFLOW_AUTH_CONFIG_PATH'] = path\n"
        "    c = read_auth_config()\n"
        "    print(c.auth_cache_ttl_seconds, c.default_permission)"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, *ini_paths], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    read = [line.split() for line in done.stdout.splitlines()]
    assert read == [[str(expected), "NO_PERMISSIONS"] for expected in LOGIN_TRUST_CASES.values()]
