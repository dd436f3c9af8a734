"""What other machines are told: the advertised host in `stack env`, MLflow's allowed
hosts and presigned URLs, the Prefect UI; and a service that would answer other hosts
without a key refuses to start."""

from pathlib import Path

import pytest

from mnistops.clients import client_env
from mnistops.serving.server import ServiceExposed, exposure
from mnistops.settings import ConfigError, load_settings, primary_address
from mnistops.stack.services import allowed_hosts, mlflow_service, prefect_service

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def in_a_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings resolve the state dir from the working dir: make it a fresh one."""
    monkeypatch.chdir(tmp_path)


def settings_with(tmp_path: Path, text: str):
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    (config / "stack.yml").write_text(text)
    return load_settings(config)


def test_bound_to_an_address_it_advertises_that_address(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, "bind: 198.18.3.1\n")
    assert settings.advertised_host == "198.18.3.1"
    env = client_env(settings)
    assert env["MNISTOPS_S3__ENDPOINT_URL"] == "http://198.18.3.1:8333"
    assert env["MLFLOW_TRACKING_URI"] == "http://198.18.3.1:5050"
    assert env["PREFECT_API_URL"] == "http://198.18.3.1:4200/api"
    assert env["MNISTOPS_SERVE__URL"] == "http://198.18.3.1:5060"


def test_bound_to_every_interface_it_advertises_this_hosts_address(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, "bind: 0.0.0.0\n")
    assert settings.client_host == "127.0.0.1", "clients here still use loopback"
    assert settings.advertised_host == primary_address()
    assert primary_address() != "0.0.0.0"


def test_advertise_names_the_host_everywhere_other_machines_look(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, "bind: 0.0.0.0\nadvertise: stack.example\n")
    env = client_env(settings)
    assert env["AWS_ENDPOINT_URL"] == "http://stack.example:8333"
    assert env["MLFLOW_TRACKING_URI"] == "http://stack.example:5050"
    assert "stack.example:5050" in allowed_hosts(settings)
    mlflow = mlflow_service(settings, None)
    assert mlflow.env["MLFLOW_S3_ENDPOINT_URL"] == "http://stack.example:8333"
    assert "--allowed-hosts" in mlflow.command
    prefect = prefect_service(settings)
    assert prefect.env["PREFECT_UI_API_URL"] == "http://stack.example:4200/api"


def test_external_services_keep_their_own_urls(tmp_path: Path) -> None:
    text = "advertise: stack.example\nmlflow:\n  tracking_uri: http://mlflow.corp:5000\n"
    env = client_env(settings_with(tmp_path, text))
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.corp:5000"
    assert env["PREFECT_API_URL"] == "http://stack.example:4200/api"


def test_the_advertised_urls_read_back_are_still_this_stacks_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`eval "$(mnistops stack env)"` on the stack host, then `stack up`: the exported
    URLs name the advertised host, and they are still the stack's own services."""
    settings = settings_with(tmp_path, "bind: 0.0.0.0\nadvertise: stack.example\n")
    for name in ("s3", "mlflow", "prefect"):
        (settings.home / name).mkdir(parents=True)
    for key, value in client_env(settings).items():
        if key.startswith("MNISTOPS_") and ("URL" in key or "URI" in key):
            monkeypatch.setenv(key, value)
    again = load_settings(tmp_path / "config")
    assert again.s3.endpoint_url is None
    assert again.mlflow.tracking_uri is None
    assert again.prefect.api_url is None


BAD_HOSTS = [
    "host name",
    "a/b",
    "x;y",
    "$(id)",
    "http://stack.example",
    "stack.example:80",
    "-rf",
    "...",
    "1.2.3.4.5",
    "0.0.0.0",
    "::",
    "::ffff:0.0.0.0",
    "fe80::1%eth0",
]


@pytest.mark.parametrize("bad", BAD_HOSTS)
def test_a_bad_advertise_is_named(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="advertise.*(host name or an IP|not an address|zone)"):
        settings_with(tmp_path, f"advertise: '{bad}'\n")


@pytest.mark.parametrize("good", ["stack.example.com", "stack.example.", "10.0.0.5", "fd00::5"])
def test_host_names_and_addresses_are_advertised(tmp_path: Path, good: str) -> None:
    assert settings_with(tmp_path, f"advertise: '{good}'\n").advertised_host == good


def test_a_loopback_advertise_beyond_loopback_is_named_at_up(tmp_path: Path) -> None:
    from mnistops.stack.lifecycle import exposure

    warned = exposure(settings_with(tmp_path, "bind: 0.0.0.0\nadvertise: 127.0.0.1\n"))
    assert any("loopback address" in w and "works on this machine only" in w for w in warned)
    assert exposure(settings_with(tmp_path, "advertise: localhost\n")) == []


def test_serving_other_hosts_needs_a_key_or_a_decision(tmp_path: Path) -> None:
    assert exposure(settings_with(tmp_path, "{}\n")) is None, "loopback: no key needed"
    with pytest.raises(ServiceExposed, match=r"serve\.api_key.*serve\.public"):
        exposure(settings_with(tmp_path, "bind: 198.18.3.1\n"))
    keyed = settings_with(tmp_path, "bind: 198.18.3.1\nserve:\n  api_key: k3y-k3y-k3y\n")
    assert exposure(keyed) is None
    public = settings_with(tmp_path, "bind: 198.18.3.1\nserve:\n  public: true\n")
    assert "no API key" in (exposure(public) or "")


BAD_URLS = [
    ("MNISTOPS_MLFLOW__TRACKING_URI", "http://198.18.3.1:5o50", "not a valid URL"),
    ("MNISTOPS_S3__ENDPOINT_URL", "http://[::1", "not a valid URL"),
    ("MNISTOPS_S3__ENDPOINT_URL", "ftp://store:21", "http:// or https://"),
    ("MNISTOPS_PREFECT__API_URL", "http://[::1", "not a valid URL"),
    ("MNISTOPS_PREFECT__API_URL", "http://:4200/api", "names no host"),
    ("MNISTOPS_SERVE__URL", "http://serving:99999", "not a valid URL"),
]


@pytest.mark.parametrize(("variable", "value", "said"), BAD_URLS)
def test_a_malformed_url_is_named_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, said: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=said) as refused:
        settings_with(tmp_path, "{}\n")
    assert variable in str(refused.value)
