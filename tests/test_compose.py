"""deploy/compose.yml, the production layout: what can be checked without a Docker engine.

It parses; each of our services runs a `mnistops` command that exists with those options;
every MNISTOPS_* name is a setting and the values validate; no password is written in
it, each comes from the env file a user makes from deploy/env.example.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mnistops.cli import app
from mnistops.settings import environment_variables, load_settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
REFERENCE = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|KEY")
URL_PASSWORD = re.compile(r"://[^:/@\s]+:(?P<password>[^@\s]+)@")
OURS = {
    "buckets",
    "mlflow",
    "prefect",
    "deploy",
    "worker-cpu",
    "deploy-gpu",
    "worker-gpu",
    "serve",
}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def example_env() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines())
    return {k.strip(): v.strip() for k, v in (p for p in pairs if len(p) == 2) if k[:1] != "#"}


def interpolate(value: str, env: dict[str, str]) -> str:
    def one(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == "-":
            return arg
        raise AssertionError(f"${{{name}}} has no value and no default: {arg}")

    return REFERENCE.sub(one, value)


def filled_example() -> dict[str, str]:
    """The example env file with every empty value filled, as a user would."""
    return {k: v or f"generated-{k.lower()}-{'x' * 24}" for k, v in example_env().items()}


def test_it_has_every_service_of_the_layout() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "minio", "prometheus"} | OURS
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"
    ] == ["gpu"]
    assert services["worker-gpu"]["build"]["args"]["TORCH_INDEX"].endswith("cu128")


def test_the_gpu_profile_moves_the_retraining_to_the_gpu_workers_pool() -> None:
    services = compose()["services"]
    pool = services["deploy-gpu"]["environment"]["MNISTOPS_DEPLOYMENT__POOL_NAME"]
    assert services["worker-gpu"]["command"][-2:] == ["--pool", pool]
    assert load_settings(ROOT / "config").deployment.pools[pool] == "cuda"
    for worker in ("worker-cpu", "worker-gpu", "deploy-gpu"):
        after = services[worker]["depends_on"]["deploy"]["condition"]
        assert after == "service_completed_successfully", f"{worker}: its pool must exist"


@pytest.mark.parametrize("name", sorted(OURS))
def test_our_services_run_a_mnistops_command_that_exists(name: str) -> None:
    service = compose()["services"][name]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / service["build"]["context"].replace("..", ".")).is_dir()
    command = service["command"]
    assert command[0] == "mnistops", command
    result = CliRunner().invoke(app, [*command[1:], "--help"])
    assert result.exit_code == 0, f"{command}: {result.output}"


def test_the_dockerfile_copies_what_exists() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), line


@pytest.mark.parametrize("name", sorted(OURS))
def test_environment_names_are_settings_and_values_validate(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = compose()["services"][name]["environment"]
    known = set(environment_variables())
    ours = {k: v for k, v in environment.items() if k.startswith("MNISTOPS_")}
    assert ours, "no MNISTOPS_* settings"
    assert set(ours) <= known, f"not settings: {sorted(set(ours) - known)}"
    filled = filled_example()
    for key, value in ours.items():
        monkeypatch.setenv(key, interpolate(str(value), filled))
    settings = load_settings(ROOT / "config")
    assert settings.s3_endpoint == "http://minio:9000"
    assert settings.s3.secret_access_key.get_secret_value() == filled["MINIO_ROOT_PASSWORD"]


def test_no_password_is_written_in_it() -> None:
    problems = []
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET_NAME.search(key) and not REFERENCE.fullmatch(value):
                problems.append(f"{name}: {key} is not taken from the env file")
            for match in URL_PASSWORD.finditer(value):
                if not REFERENCE.fullmatch(match["password"]):
                    problems.append(f"{name}: {key} has a password in its URL")
    assert not problems, problems


def test_every_reference_is_documented_in_the_example_and_secrets_are_empty() -> None:
    documented = example_env()
    used = {m["name"] for m in REFERENCE.finditer(COMPOSE.read_text())}
    assert used <= set(documented), f"not in env.example: {sorted(used - set(documented))}"
    required = {m["name"] for m in REFERENCE.finditer(COMPOSE.read_text()) if m["op"] == "?"}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MODEL_SIGNING_KEY"} <= required
    for key, value in documented.items():
        if SECRET_NAME.search(key):
            assert value == "", f"env.example gives {key} a value: leave it for the user"
    assert "deploy/.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_prometheus_scrapes_the_services_metrics_with_its_key(tmp_path: Path) -> None:
    """deploy/prometheus.yml names the compose service `serve` at its port, the app's
    /metrics route, and the API key compose mounts for Prometheus."""
    from mnistops.serving.app import create_app

    layout = compose()
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    serve = layout["services"]["serve"]
    port = serve["environment"]["MNISTOPS_SERVE__PORT"]
    assert job["static_configs"][0]["targets"] == [f"serve:{port}"]
    settings = load_settings(ROOT / "config").model_copy(update={"home": tmp_path})
    routes = {r.path for r in create_app(settings).routes}
    assert job["metrics_path"] in routes
    prometheus = layout["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    (secret,) = prometheus["secrets"]
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": f"/run/secrets/{secret}",
    }
    key = serve["environment"]["MNISTOPS_SERVE__API_KEY"]
    assert key == "${" + layout["secrets"][secret]["environment"] + ":?set it in deploy/.env}"
