"""One typed settings object, read from `config/*.yml` and `MNISTOPS_*` variables.

Precedence, highest first: environment variables (`MNISTOPS_HOME`,
`MNISTOPS_MLFLOW__PORT`, ... nested keys joined by `__`), then the YAML files
of the config dir, then the defaults written in the models below. Nothing is
read at import time: call `load_settings()`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from mnistops.errors import BadInput

ENV_PREFIX = "MNISTOPS_"
ENV_NESTED = "__"
CONFIG_FILES = ("stack.yml", "dataset.yml", "hyp.yml", "flow.yml")


class ConfigError(BadInput):
    """A setting is wrong; the message names the file (or variable) and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


Port = int
Device = Literal["auto", "cpu", "cuda"]
"""where training runs: `auto` is CUDA when there is one"""


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be a TCP port between 1 and 65535")
    return value


def _web_url(value: str | None) -> str | None:
    """An http(s) URL with a host and, if any, a numeric port."""
    if value is not None and _checked_url(value).scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL, e.g. http://host:9000")
    return value


def _any_url(value: str | None) -> str | None:
    """A URL; an http(s) one must have a host and, if any, a numeric port."""
    if value is not None:
        _checked_url(value)
    return value


def _checked_url(value: str) -> Any:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc}), e.g. http://host:5000") from None
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise ValueError("names no host, e.g. http://host:5000")
    return parts


class Buckets(Section):
    dvc: str = "dvc"
    mlflow: str = "mlflow"
    prefect: str = "prefect"


class S3Settings(Section):
    """The object store. `endpoint_url` set means: use that one, start none."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    buckets: Buckets = Buckets()
    port: Port = 8333
    master_port: Port = 9333
    volume_port: Port = 9340
    filer_port: Port = 8888
    grpc_offset: int = Field(10000, description="gRPC port = HTTP port + this")
    volume_size_limit_mb: int = Field(64, ge=8, le=30000)

    _ports = field_validator("port", "master_port", "volume_port", "filer_port")(_check_port)
    _url = field_validator("endpoint_url")(_web_url)


class MlflowSettings(Section):
    """The MLflow tracking server. `tracking_uri` set means: use that one, start none."""

    tracking_uri: str | None = None
    port: Port = 5050
    workers: int = Field(1, ge=1, le=16)
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="more Host headers the server accepts (e.g. mlflow:5000 behind a proxy)",
    )
    auth: bool | None = Field(
        None,
        description="the embedded server asks for a login (generated, in the state dir);"
        " default: on when bind is not a loopback address",
    )
    username: str | None = Field(None, description="login of an MLflow server that asks for one")
    password: SecretStr | None = None

    _ports = field_validator("port")(_check_port)
    _url = field_validator("tracking_uri")(_any_url)


class PrefectSettings(Section):
    """The Prefect server. `api_url` set means: use that one, start none."""

    api_url: str | None = None
    port: Port = 4200
    ui_api_url: str | None = Field(
        None, description="the API URL the UI's browser uses; default: the server's own"
    )
    auth: bool | None = Field(
        None,
        description="the embedded server asks for a login (generated, in the state dir);"
        " default: on when bind is not a loopback address",
    )
    auth_string: SecretStr | None = Field(
        None, description="USER:PASSWORD of a Prefect server that asks for a login"
    )

    _ports = field_validator("port")(_check_port)
    _urls = field_validator("api_url", "ui_api_url")(_web_url)


class ServeSettings(Section):
    """`mnistops serve`: the champion over HTTP. `url` is where clients find it (`stack
    env` exports it); `mnistops serve` always answers on `port` of this machine."""

    url: str | None = None
    port: Port = 5060
    api_key: SecretStr | None = Field(
        None, description="when set, required as `Authorization: Bearer KEY` (but / and /health)"
    )
    public: bool = Field(
        False,
        description="answer without an API key on an address other hosts reach (a warning"
        " is printed); else such a service refuses to start without serve.api_key",
    )
    poll_s: float = Field(5.0, gt=0, le=60, description="how often the registry is asked")
    max_batch: int = Field(256, ge=1, le=4096, description="images per request and per pass")
    max_body_bytes: int = Field(
        8 << 20, ge=1024, le=256 << 20, description="larger request bodies are refused (413)"
    )
    threads: int | None = Field(
        None, gt=0, description="CPU threads of a forward pass; default 1 (batches are small)"
    )
    request_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="a request whose headers and body have not all arrived within this many"
        " seconds of the connection (or of the previous answer) is cut",
    )
    max_connections: int = Field(
        10_000,
        ge=16,
        description="open connections at most (capped below the process's file limit);"
        " past it new connections are closed at once",
    )

    _ports = field_validator("port")(_check_port)
    _url = field_validator("url")(_web_url)


class DatasetSettings(Section):
    """`config/dataset.yml`, key `dataset`: how MNIST is split into PNG folders."""

    name: str = Field("MNIST", pattern=r"^[A-Za-z0-9_.-]+$")
    train_size: int = Field(30000, ge=10, le=60000, description="images in train/")
    new_data_size: int = Field(
        30000, ge=0, le=60000, description="images kept aside in train_v2/ as new data"
    )
    test_size: int = Field(10000, ge=10, le=10000, description="images in test/")
    fast_fraction: float = Field(0.02, gt=0, le=1, description="share of each split in --fast")
    registry: Path | None = Field(None, description="git+DVC registry; default <home>/registry")

    @model_validator(mode="after")
    def _fits_mnist(self) -> DatasetSettings:
        if self.train_size + self.new_data_size > 60000:
            raise ValueError(
                "train_size + new_data_size must be at most 60000 (MNIST's training set)"
            )
        return self


class HyperParameters(Section):
    """`config/hyp.yml`, key `hyperparameter`: the tutorial's keys, then ours."""

    random_seed: int = Field(42, ge=0, le=2**32 - 1)
    val_size: float = Field(0.1, gt=0, lt=1, description="share of train held out to validate")
    shuffle_data: bool = True
    batch_size: int = Field(256, gt=0)
    learning_rate: float = Field(0.004, gt=0)
    n_epochs: int = Field(8, gt=0)
    model: str = Field("digitnet", description="seednet (the tutorial's CNN) or digitnet")
    schedule: Literal["constant", "onecycle"] = "onecycle"
    weight_decay: float = Field(0.01, ge=0)
    augment: bool = Field(True, description="random small shifts, turns and zooms while training")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    calibrate: bool = Field(
        True,
        description="fit a temperature on the validation images so that confidence matches"
        " accuracy (folded into the last layer; the predicted digits do not change)",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="arithmetic of the training steps on the CPU: bf16 where the CPU has it"
        " natively (auto), else fp32; evaluation is always fp32",
    )
    device: Device = "auto"
    threads: int | None = Field(None, gt=0, description="CPU threads; default: all cores")


DEFAULT_POOLS: dict[str, Device] = {"mnist-cpu": "cpu", "mnist-gpu": "cuda"}


class DeploymentSettings(Section):
    """`config/flow.yml`, key `deployment`: the Prefect deployment of the retraining flow,
    the work pools `deploy` creates and the one the deployment runs on."""

    flow_name: str = "MNIST"
    deploy_name: str = "mnist-retraining"
    # Declared before pool_name: its validator reads the pools.
    pools: dict[str, Device] = Field(
        default_factory=DEFAULT_POOLS.copy,
        description="work pool -> the device its runs train on",
    )
    pool_name: str = "mnist-cpu"
    queue_name: str = "default"

    @field_validator("pool_name")
    @classmethod
    def _one_of_the_pools(cls, value: str, info: ValidationInfo) -> str:
        pools = info.data.get("pools")
        if pools is not None and value not in pools:
            raise ValueError(
                f"'{value}' is not one of deployment.pools ({', '.join(pools) or 'none'})"
            )
        return value

    @property
    def full_name(self) -> str:
        """`FLOW/DEPLOYMENT`, how Prefect names the deployment."""
        return f"{self.flow_name}/{self.deploy_name}"

    @property
    def device(self) -> Device:
        """The device of the deployment's runs: its pool's."""
        return self.pools[self.pool_name]


class SchedulerSettings(Section):
    """`config/flow.yml`, key `scheduler`: when the retraining runs."""

    method: Literal["interval", "cron", "rrule"] = "cron"
    timezone: str = "UTC"
    interval: int = Field(86400, gt=0, description="seconds between runs (method: interval)")
    cron: str = "0 3 * * *"
    rrule: str = "FREQ=WEEKLY;BYDAY=MO;BYHOUR=3;BYMINUTE=0"


class ModelRegistrySettings(Section):
    """`config/flow.yml`, key `model_registry`: where models go and when `champion` moves."""

    name: str = Field("mnist-classifier", pattern=r"^[A-Za-z0-9_.-]+$")
    champion_margin: float = Field(
        0.0, ge=0, le=1, description="test accuracy a new model must gain to become champion"
    )
    significance: float = Field(
        0.05,
        gt=0,
        le=1,
        description="a new model becomes champion only if the exact one-sided McNemar test"
        " on paired test predictions gives p below this",
    )
    max_class_drop: float = Field(
        0.5,
        ge=0,
        le=100,
        description="most accuracy points any one digit may lose for a new model to become"
        " champion",
    )
    signing_key: SecretStr | None = Field(
        None,
        description="the key that signs the file record of every model mnistops registers;"
        " the same on every machine that trains or loads models. Default with the embedded"
        " MLflow: generated into <home>/model-signing-key",
    )

    @field_validator("signing_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError(
                "the model signing key must be at least 32 characters: generate one, e.g."
                " `openssl rand -hex 24`"
            )
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED,
        extra="forbid",
        validate_default=True,
    )

    home: Path = Field(Path(".mnistops"), description="state dir: pids, logs, databases, keys")
    data_dir: Path = Path("data")
    bind: str = Field("127.0.0.1", description="address the services listen on")
    advertise: str | None = Field(
        None,
        description="host name or address other machines reach this stack at (the URLs of"
        " `stack env`, the Prefect UI's API URL, MLflow's allowed hosts); default: bind, or"
        " this host's primary address when bind is 0.0.0.0",
    )
    database_url: SecretStr | None = Field(
        None, description="postgresql://USER:PASSWORD@HOST:PORT for MLflow and Prefect"
    )
    database_prefix: str = Field("mnistops", pattern=r"^[a-z_][a-z0-9_]{0,40}$")
    s3: S3Settings = S3Settings()
    mlflow: MlflowSettings = MlflowSettings()
    prefect: PrefectSettings = PrefectSettings()
    serve: ServeSettings = ServeSettings()
    dataset: DatasetSettings = DatasetSettings()
    hyperparameter: HyperParameters = HyperParameters()
    deployment: DeploymentSettings = DeploymentSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    experiment_name: str = Field("MNIST", min_length=1)
    developer_name: str | None = Field(None, description="user tag of runs; default: login name")
    model_registry: ModelRegistrySettings = ModelRegistrySettings()
    _sources: dict[str, Path] = PrivateAttr(default_factory=dict)
    _notes: list[str] = PrivateAttr(default_factory=list)
    _config_dir: Path | None = PrivateAttr(default=None)

    @property
    def config_dir(self) -> Path | None:
        """The folder of YAML files these settings were read from (None: not from files)."""
        return self._config_dir

    def where(self, key: str) -> str:
        """Where the setting `key` (dotted) is written, for a message: its file and key,
        or the variable that sets it."""
        loc = tuple(key.split("."))
        variables = [_env_var_for(loc[:n]) for n in range(len(loc), 0, -1)]
        variable = next((name for name in variables if name in os.environ), None)
        if variable:
            return f"environment variable {variable}"
        source = self._sources.get(loc[0])
        return f"{source}: key '{key}'" if source else f"key '{key}'"

    @property
    def notes(self) -> list[str]:
        """What was read but not used (keys of the tutorial's docker layout), one line each."""
        return list(self._notes)

    @field_validator("advertise")
    @classmethod
    def _host_to_reach(cls, value: str | None) -> str | None:
        if value is not None:
            check_reachable_host(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _is_postgres_url(value.get_secret_value()):
            raise ValueError(POSTGRES_ONLY)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # YAML values arrive as init kwargs; environment variables must win over them.
        return (env_settings, init_settings)

    @property
    def beyond_loopback(self) -> bool:
        """The services listen where other hosts can reach them."""
        return not is_loopback(self.bind)

    @property
    def mlflow_login_on(self) -> bool:
        """The embedded MLflow server asks for a login (`mlflow.auth`, default: beyond
        loopback)."""
        return self.beyond_loopback if self.mlflow.auth is None else self.mlflow.auth

    @property
    def prefect_login_on(self) -> bool:
        """The embedded Prefect server asks for a login (`prefect.auth`, default: beyond
        loopback)."""
        return self.beyond_loopback if self.prefect.auth is None else self.prefect.auth

    @property
    def client_host(self) -> str:
        """The address a client on this machine uses to reach a service bound to `bind`."""
        return "127.0.0.1" if self.bind in WILDCARDS else self.bind

    @property
    def advertised_host(self) -> str:
        """The name or address other machines use to reach this stack (`advertise`)."""
        if self.advertise:
            return self.advertise
        return primary_address() if self.bind in WILDCARDS else self.bind

    def own_urls(self, host: str) -> dict[str, str]:
        """The URLs of the servers this stack starts (and of `mnistops serve`) at `host`."""
        at = f"http://{url_host(host)}"
        return {
            "s3": f"{at}:{self.s3.port}",
            "mlflow": f"{at}:{self.mlflow.port}",
            "prefect": f"{at}:{self.prefect.port}/api",
            "serve": f"{at}:{self.serve.port}",
        }

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint_url or self.own_urls(self.client_host)["s3"]

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow.tracking_uri or self.own_urls(self.client_host)["mlflow"]

    @property
    def prefect_api_url(self) -> str:
        return self.prefect.api_url or self.own_urls(self.client_host)["prefect"]

    @property
    def serve_url(self) -> str:
        """Where clients find the prediction service (`serve.url`, else ours)."""
        return (self.serve.url or self.local_serve_url).rstrip("/")

    @property
    def local_serve_url(self) -> str:
        """Where `mnistops serve` on this machine answers (whatever `serve.url` says)."""
        return self.own_urls(self.client_host)["serve"]

    def advertised_urls(self) -> dict[str, str]:
        """The services' URLs as another machine uses them: an external service's own
        URL, ours at the advertised host."""
        own = self.own_urls(self.advertised_host)
        return {
            "s3": self.s3.endpoint_url or own["s3"],
            "mlflow": self.mlflow.tracking_uri or own["mlflow"],
            "prefect": self.prefect.api_url or own["prefect"],
            "serve": (self.serve.url or own["serve"]).rstrip("/"),
        }

    @property
    def registry_dir(self) -> Path:
        return self.dataset.registry or self.home / "registry"

    @property
    def mnist_dir(self) -> Path:
        return self.data_dir / self.dataset.name


WILDCARDS = ("0.0.0.0", "::", "")
"""bind addresses that mean: every interface of this host"""


def primary_address() -> str:
    """This host's address on the network its default route leads to; else the first
    address of an interface that is up; else 127.0.0.1. Finding the route sends nothing
    (a UDP socket's connect only picks the source address)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            return str(probe.getsockname()[0])
    except OSError:
        pass
    import psutil

    stats = psutil.net_if_stats()
    for name, addresses in psutil.net_if_addrs().items():
        if not (name in stats and stats[name].isup):
            continue
        for address in addresses:
            if address.family == socket.AF_INET and not is_loopback(address.address):
                return str(address.address)
    return "127.0.0.1"


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def check_reachable_host(value: str) -> None:
    """A host name or an IP address other machines can connect to; ValueError if not."""
    import ipaddress

    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        value = value.removesuffix(".")  # a fully qualified name may end with a dot
        last_label = value.rsplit(".", 1)[-1]
        if len(value) > 253 or not _HOST_NAME.fullmatch(value) or last_label.isdigit():
            raise ValueError(
                "must be a host name or an IP address, without scheme or port"
                " (e.g. stack.example.com or 10.0.0.5)"
            ) from None
        return
    if getattr(address, "scope_id", None):
        raise ValueError("an IPv6 address with a zone (%...) is of one link only: give another")
    mapped = getattr(address, "ipv4_mapped", None)
    if address.is_unspecified or (mapped is not None and mapped.is_unspecified):
        raise ValueError(
            f"{value} is where to listen (bind), not an address to reach: give this host's"
            " name or address"
        )


def url_host(host: str) -> str:
    """`host` as it goes into a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


POSTGRES_ONLY = "must start with postgresql:// (only PostgreSQL is supported)"


def _is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def with_database_url(settings: Settings, url: str) -> Settings:
    """The settings with another database URL (the `--db` option)."""
    if not _is_postgres_url(url):
        raise ConfigError(f"--db: {POSTGRES_ONLY}")
    return settings.model_copy(update={"database_url": SecretStr(url)})


def default_config_dir() -> Path:
    """`$MNISTOPS_CONFIG_DIR`, else `./config`."""
    return Path(os.environ.get(f"{ENV_PREFIX}CONFIG_DIR", "config"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values, got {type(data).__name__}")
    return data


LAYOUT_ONLY_KEYS = {
    "RFS_NAME": "the tutorial's remote file system block of its docker layout; a worker"
    " here runs the flow from the installed package",
    "flow_py_name": "the tutorial's flow file; the flow is part of the installed package",
    "dvc_remote": "the DVC remote is the stack's object store (s3.buckets.dvc)",
    "train_data_path": "the data is read from a published version, or data_dir for ingest",
}
"""keys of the tutorial's files that meant something only for its docker layout"""


def _drop_layout_keys(path: Path, data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The file's keys without LAYOUT_ONLY_KEYS (top level, or in a section), each noted."""
    kept: dict[str, Any] = {}
    for key, value in data.items():
        if key in LAYOUT_ONLY_KEYS:
            notes.append(f"{path}: key '{key}' is ignored: {LAYOUT_ONLY_KEYS[key]}")
            continue
        if isinstance(value, dict):
            for inner in [k for k in value if k in LAYOUT_ONLY_KEYS]:
                notes.append(f"{path}: key '{key}.{inner}' is ignored: {LAYOUT_ONLY_KEYS[inner]}")
            value = {k: v for k, v in value.items() if k not in LAYOUT_ONLY_KEYS}
        kept[key] = value
    return kept


def _read_config_files(
    config_dir: Path, notes: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Merge the top-level keys of every config file; remember which file set each."""
    values: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for name in CONFIG_FILES:
        path = config_dir / name
        if not path.is_file():
            continue
        read = _drop_layout_keys(path, _read_yaml(path), notes if notes is not None else [])
        for key, value in read.items():
            if key in origin:
                raise ConfigError(f"{path}: key '{key}' is already set in {origin[key]}")
            values[key] = value
            origin[key] = path
    return values, origin


def _env_var_for(loc: tuple[Any, ...]) -> str:
    return ENV_PREFIX + ENV_NESTED.join(str(part).upper() for part in loc)


def _describe_error(err: dict[str, Any], origin: dict[str, Path], config_dir: Path) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(part) for part in loc)
    env_names = [_env_var_for(loc[:n]) for n in range(len(loc), 0, -1)]
    from_env = next((name for name in env_names if name in os.environ), None)
    if from_env:
        where = f"environment variable {from_env}"
    elif loc and loc[0] in origin:
        where = f"{origin[loc[0]]}: key '{key}'"
    else:
        where = f"key '{key}' (in {config_dir}/*.yml or {_env_var_for(loc)})"
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key; see the README's configuration section for the keys allowed"
    return f"{where}: {message}"


def environment_variables() -> list[str]:
    """Every MNISTOPS_* variable that sets a key (sections too: JSON values), plus
    MNISTOPS_CONFIG_DIR."""
    names = [f"{ENV_PREFIX}CONFIG_DIR"]

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            loc = (*prefix, name)
            names.append(_env_var_for(loc))
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, loc)

    walk(Settings, ())
    return names


STATE_DIR = ".mnistops"


def project_root(start: Path | None = None) -> Path | None:
    """The nearest folder, from `start` (the working dir) up, that holds a state dir."""
    start = (start or Path.cwd()).absolute()
    return next((f for f in (start, *start.parents) if (f / STATE_DIR).is_dir()), None)


def where_looked(start: Path | None = None) -> str:
    start = (start or Path.cwd()).absolute()
    return f"{start / STATE_DIR} and the {STATE_DIR} of every folder above it"


def _resolve(path: Path, root: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else root / path


def _embedded_urls(settings: Settings, host: str) -> dict[str, tuple[str, Any]]:
    """service -> (the URL our own server of it has at `host`, its section), for the
    three."""
    own = settings.own_urls(host)
    return {name: (own[name], getattr(settings, name)) for name in ("s3", "mlflow", "prefect")}


URL_KEYS = {"s3": "endpoint_url", "mlflow": "tracking_uri", "prefect": "api_url"}


def _url_settings(settings: Settings) -> list[tuple[Any, str]]:
    return [(getattr(settings, name), key) for name, key in URL_KEYS.items()]


def _same_url(a: str, b: str) -> bool:
    def norm(url: str) -> str:
        return url.rstrip("/").replace("://localhost:", "://127.0.0.1:")

    return norm(a) == norm(b)


def _own_services_back(settings: Settings) -> None:
    """A URL that points at the server this very state dir runs (what `stack env`
    exports, then read back in the same shell) is not an external service: `stack
    up/down/status` keep managing it, and its keys and logins come from the state dir."""
    if all(getattr(section, key) is None for section, key in _url_settings(settings)):
        return
    for host in {settings.client_host, settings.advertised_host}:
        for name, (own, section) in _embedded_urls(settings, host).items():
            url = getattr(section, URL_KEYS[name])
            if url is not None and _same_url(url, own) and (settings.home / name).is_dir():
                setattr(section, URL_KEYS[name], None)


def load_settings(config_dir: Path | None = None) -> Settings:
    """Read the config dir and the environment; raise ConfigError naming file and key.

    Run from a folder below a project (one that holds `.mnistops/`), the settings are
    that project's: its `config/` and state dir, as `git` finds its repository. An
    explicit `--config-dir`, MNISTOPS_CONFIG_DIR or MNISTOPS_HOME turns the search off.
    """
    root = Path.cwd()
    explicit_home = os.environ.get(f"{ENV_PREFIX}HOME")
    searching = config_dir is None and f"{ENV_PREFIX}CONFIG_DIR" not in os.environ
    if searching and not (root / "config").is_dir():
        # MNISTOPS_HOME names a project's state dir: its config/ is beside it. Else the
        # nearest project above the working dir.
        found = Path(explicit_home).expanduser().absolute().parent if explicit_home else None
        root = found or project_root(root) or root
        config_dir = root / "config"
    config_dir = config_dir or default_config_dir()
    notes: list[str] = []
    values, origin = _read_config_files(config_dir, notes)
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        lines = [_describe_error(dict(e), origin, config_dir) for e in exc.errors()]
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
    except SettingsError as exc:
        raise ConfigError(
            f"an {ENV_PREFIX}* environment variable cannot be read ({exc}): a whole section"
            f" takes JSON; or set one key, e.g. {ENV_PREFIX}S3__PORT=8334"
        ) from None
    settings.home = _resolve(settings.home, root).absolute()
    settings.data_dir = _resolve(settings.data_dir, root).absolute()
    if settings.dataset.registry is not None:
        settings.dataset.registry = _resolve(settings.dataset.registry, root).absolute()
    _own_services_back(settings)
    settings._sources = origin
    settings._notes = notes
    settings._config_dir = config_dir.absolute()
    return settings
