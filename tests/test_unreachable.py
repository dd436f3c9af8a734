"""Unreachable or misconfigured services: every command fails with a message that names
the service and the setting, within 30 s, never a hang or a stack trace."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mnistops.data.remote import UNREACHABLE_ADVICE
from mnistops.settings import Settings
from tests.helpers import client_config, run_cli
from tests.helpers import closed_port as held_closed_port

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module")
def closed_port() -> Iterator[int]:
    """A port held by this process but not listening: connections are refused at once."""
    with held_closed_port() as port:
        yield port


def nowhere_config(root: Path, port: int) -> Path:
    config_dir = root / "config"
    config_dir.mkdir(parents=True)
    url = f"http://127.0.0.1:{port}"
    (config_dir / "stack.yml").write_text(
        yaml.safe_dump(
            {
                "home": str(root / "home"),
                "data_dir": str(root / "data"),
                "s3": {
                    "endpoint_url": url,
                    "access_key_id": "nobody",
                    "secret_access_key": "not-a-real-secret-key-000000000000",
                },
                "mlflow": {"tracking_uri": url},
                "prefect": {"api_url": f"{url}/api"},
            }
        )
    )
    return config_dir


CASES = [
    (("data", "list"), "object store"),
    (("data", "pull", "v1.0", "--to", "pulled"), "object store"),
    (("train", "--fast"), "MLflow server"),
    (("models",), "MLflow server"),
    (("deploy",), "Prefect server"),
    (("run", "--wait"), "Prefect server"),
    (("worker",), "Prefect server"),
    (("stack", "up"), "object store"),
]


@pytest.mark.parametrize(("args", "service"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_unreachable_service_is_a_clear_error_within_30_s(
    args: tuple[str, ...], service: str, closed_port: int, tmp_path: Path
) -> None:
    config_dir = nowhere_config(tmp_path, closed_port)
    began = time.monotonic()
    done = run_cli(*args, config_dir=config_dir, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - began
    assert done.returncode != 0
    assert elapsed < 30, f"{args} took {elapsed:.1f} s"
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert service in message and f"127.0.0.1:{closed_port}" in message, message


def test_wrong_s3_keys_are_a_clear_error(stack_settings: Settings, tmp_path: Path) -> None:
    config_dir = client_config(stack_settings, tmp_path)
    config = yaml.safe_load((config_dir / "stack.yml").read_text())
    config["s3"]["secret_access_key"] = "wrong-" + config["s3"]["secret_access_key"][6:]
    (config_dir / "stack.yml").write_text(yaml.safe_dump(config))
    began = time.monotonic()
    done = run_cli("data", "list", config_dir=config_dir, timeout=60)
    assert done.returncode != 0
    assert time.monotonic() - began < 30
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "object store" in message and "SignatureDoesNotMatch" in message, message


def test_pull_and_training_explain_an_unreachable_store_alike(
    stack_settings: Settings, closed_port: int, tmp_path: Path
) -> None:
    """The MLflow server answers, the object store does not: `data pull` and `train` (its
    data is read the same way) give the one explanation, with what to do."""
    config_dir = client_config(stack_settings, tmp_path)
    config = yaml.safe_load((config_dir / "stack.yml").read_text())
    config["s3"]["endpoint_url"] = f"http://127.0.0.1:{closed_port}"
    (config_dir / "stack.yml").write_text(yaml.safe_dump(config))
    for args in (("data", "pull", "v1.0", "--to", "pulled"), ("train", "--data-version", "v1.0")):
        done = run_cli(*args, config_dir=config_dir, cwd=tmp_path, timeout=60)
        message = " ".join(done.stderr.split())
        assert done.returncode != 0 and "Traceback" not in done.stderr, message
        assert f"object store at http://127.0.0.1:{closed_port} cannot be reached" in message
        assert UNREACHABLE_ADVICE in message, message
