"""The stack refuses to open its object store: a damaged key file or an identities file
that would let anonymous requests in stops the start; nothing is left listening."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
import pytest
import yaml

from mnistops import stack
from mnistops.credentials import (
    keys_path,
    mlflow_auth_path,
    prefect_auth_path,
    seaweed_identities,
)
from mnistops.settings import Settings, load_settings
from mnistops.stack.ports import free_port_config, port_in_use
from tests.helpers import client_config, run_cli, write_stack_config

pytestmark = [pytest.mark.integration, pytest.mark.security]


def s3_only_config(root: Path, stack_settings) -> Path:
    """A stack whose S3 store is started here, with MLflow and Prefect the session's."""
    return write_stack_config(
        root,
        mlflow={"tracking_uri": stack_settings.mlflow_uri},
        prefect={"api_url": stack_settings.prefect_api_url},
    )


def listening_ports(settings) -> list[int]:
    return [p for p in (settings.s3.port, settings.s3.filer_port) if port_in_use(settings.bind, p)]


def test_a_damaged_key_file_stops_the_start(tmp_path: Path, stack_settings) -> None:
    config_dir = s3_only_config(tmp_path, stack_settings)
    settings = load_settings(config_dir)
    settings.home.mkdir(parents=True, exist_ok=True)
    for damaged in ('{"s3_access_key_id": "short", "s3_secret_access_key": "x"}', "{oops"):
        keys_path(settings.home).write_text(damaged)
        done = run_cli("stack", "up", config_dir=config_dir)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        assert str(keys_path(settings.home)) in " ".join(done.stderr.split()).replace(" ", "")
        assert listening_ports(settings) == []
        listed = run_cli("data", "list", config_dir=config_dir)
        assert listed.returncode == 2 and "is damaged" in listed.stderr


def malformed(_keys) -> str:
    return '{"identities": [{"name": "mnistops", "credentials": ['


def ours_and_anonymous(keys) -> str:
    """Our identity, plus one SeaweedFS treats as anonymous access: the store opens."""
    identities = json.loads(seaweed_identities(keys))
    identities["identities"].append({"name": "anonymous", "actions": ["Read", "List"]})
    return json.dumps(identities)


@pytest.mark.parametrize(
    ("identities", "expected"),
    [
        (malformed, "exited during start-up"),
        (ours_and_anonymous, "answered a request without keys"),
    ],
    ids=["malformed", "open-to-anonymous"],
)
def test_an_identities_file_that_would_open_the_store_stops_the_start(
    tmp_path: Path, stack_settings, monkeypatch: pytest.MonkeyPatch, identities, expected: str
) -> None:
    from mnistops.stack import services

    settings = load_settings(s3_only_config(tmp_path, stack_settings))
    monkeypatch.setattr(services, "seaweed_identities", identities)
    with pytest.raises(stack.StackError, match=expected):
        stack.up(settings)
    assert listening_ports(settings) == []
    assert not any(s.running for s in stack.status(settings) if s.name == "s3")


def with_login_here(tmp_path: Path, stack_settings: Settings, service: str) -> tuple[Path, dict]:
    """A config dir whose stack starts only `service` (with `auth: true`) and uses the
    session's other services; and the settings any client of those services shares."""
    shared = yaml.safe_load(
        client_config(stack_settings, tmp_path / "shared").joinpath("stack.yml").read_text()
    )
    port = free_port_config(tmp_path)[service]["port"]
    config = {**shared, "home": str(tmp_path / "home"), service: {"port": port, "auth": True}}
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "stack.yml").write_text(yaml.safe_dump(config))
    return config_dir, shared


def stranger(tmp_path: Path, shared: dict, service: dict) -> Path:
    """A client that knows the URL of the service but not its login."""
    config_dir = tmp_path / "stranger"
    config_dir.mkdir()
    config = {**shared, "home": str(tmp_path / "stranger-home"), **service}
    (config_dir / "stack.yml").write_text(yaml.safe_dump(config))
    return config_dir


def assert_refused_clearly(done) -> None:
    """A client without the login: exit 1, our message, no stack trace."""
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "refused a request without a login" in " ".join(done.stderr.split())


def assert_login_private(config_dir: Path, password: str, exported: str) -> None:
    """`stack status` never shows the password; `stack env` exports it on purpose."""
    status = run_cli("stack", "status", config_dir=config_dir)
    assert password not in status.stdout + status.stderr
    assert exported in run_cli("stack", "env", config_dir=config_dir).stdout


def test_prefect_with_a_login_refuses_clients_without_it(tmp_path: Path, stack_settings) -> None:
    """prefect.auth: the embedded server asks for a generated login; our commands with the
    stack's settings use it, a client without it gets a clear refusal."""
    config_dir, shared = with_login_here(tmp_path, stack_settings, "prefect")
    settings = load_settings(config_dir)
    stack.up(settings)
    try:
        login = prefect_auth_path(settings.home)
        assert stat.S_IMODE(login.stat().st_mode) == 0o600
        user, password = login.read_text().split(":", 1)
        assert user == "admin" and len(password) >= 32
        api = settings.prefect_api_url
        assert httpx.get(f"{api}/admin/version", timeout=10).status_code == 401

        deployed = run_cli("deploy", config_dir=config_dir)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr

        outsider = stranger(tmp_path, shared, {"prefect": {"api_url": api}})
        assert_refused_clearly(run_cli("deploy", config_dir=outsider))
        assert_login_private(config_dir, password, f"PREFECT_API_AUTH_STRING=admin:{password}")
    finally:
        stack.down(settings)


def test_mlflow_with_a_login_refuses_clients_without_it(tmp_path: Path, stack_settings) -> None:
    """mlflow.auth: MLflow's basic-auth app with a generated admin password (never its
    example one); our commands use it, a client without it gets a clear refusal."""
    config_dir, shared = with_login_here(tmp_path, stack_settings, "mlflow")
    settings = load_settings(config_dir)
    stack.up(settings)
    try:
        login = mlflow_auth_path(settings.home)
        assert stat.S_IMODE(login.stat().st_mode) == 0o600
        password = json.loads(login.read_text())["password"]
        assert len(password) >= 32 and password != "password1234"
        search = f"{settings.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(search, timeout=10).status_code == 401
        assert httpx.get(search, auth=("admin", password), timeout=10).status_code == 200
        # The login app trusts a checked login for a while (mlflow.auth_cache_s): what
        # it trusts is that user with that password, never a guess made after it.
        for guess in (("admin", password[:-1]), ("admin", password + "x"), ("root", password)):
            assert httpx.get(search, auth=guess, timeout=10).status_code == 401, guess
        assert httpx.get(search, auth=("admin", password), timeout=10).status_code == 200

        models = run_cli("models", config_dir=config_dir)
        assert models.returncode == 0, models.stdout + models.stderr

        outsider = stranger(tmp_path, shared, {"mlflow": {"tracking_uri": settings.mlflow_uri}})
        assert_refused_clearly(run_cli("models", config_dir=outsider))
        assert_login_private(config_dir, password, f"MLFLOW_TRACKING_PASSWORD={password}")
        assert password not in (settings.home / "logs" / "mlflow.log").read_text()
    finally:
        stack.down(settings)


def test_up_makes_an_existing_state_dir_private(tmp_path: Path, stack_settings) -> None:
    """A state dir left readable by others (made by an older mnistops, or by hand) is
    narrowed on `up`, with a note; what the store then writes is private too."""
    config_dir = s3_only_config(tmp_path, stack_settings)
    settings = load_settings(config_dir)
    (settings.home / "logs").mkdir(parents=True)
    (settings.home / "logs" / "old.log").write_text("secret-ish")
    for path, mode in ((settings.home, 0o755), (settings.home / "logs", 0o775)):
        path.chmod(mode)
    (settings.home / "logs" / "old.log").chmod(0o644)
    done = run_cli("stack", "up", config_dir=config_dir)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "private" in done.stdout and "other users could read them" in done.stdout
        assert stat.S_IMODE(settings.home.stat().st_mode) == 0o700
        wide = [p for p in settings.home.rglob("*") if p.lstat().st_mode & 0o077]
        assert wide == []
        again = run_cli("stack", "up", config_dir=config_dir)
        assert again.returncode == 0 and "private" not in again.stdout
    finally:
        stack.down(settings)
