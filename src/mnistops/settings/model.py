"""The one settings object: every section, and the URLs and addresses derived from them."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from mnistops.settings.base import ENV_NESTED, ENV_PREFIX, env_var_for
from mnistops.settings.flow import (
    DeploymentSettings,
    ModelRegistrySettings,
    MonitoringSettings,
    SchedulerSettings,
)
from mnistops.settings.network import (
    POSTGRES_ONLY,
    WILDCARDS,
    _is_postgres_url,
    check_reachable_host,
    is_loopback,
    primary_address,
    url_host,
)
from mnistops.settings.services import MlflowSettings, PrefectSettings, S3Settings, ServeSettings
from mnistops.settings.sources import ConfigDirSource, ConfigRead, KeptEnvSource, current_read
from mnistops.settings.training import DatasetSettings, HyperParameters

URL_KEYS = {"s3": "endpoint_url", "mlflow": "tracking_uri", "prefect": "api_url"}
"""each service's setting that points at an external server of it"""


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
    monitoring: MonitoringSettings = MonitoringSettings()
    _read: ConfigRead | None = PrivateAttr(default=None)

    @property
    def config_dir(self) -> Path | None:
        """The folder of YAML files these settings were read from (None: not from files)."""
        return self._read.config_dir if self._read else None

    def where(self, key: str) -> str:
        """Where the setting `key` (dotted) is written, for a message: its file and key,
        or the variable that sets it."""
        loc = tuple(key.split("."))
        variables = [env_var_for(loc[:n]) for n in range(len(loc), 0, -1)]
        variable = next((name for name in variables if name in os.environ), None)
        if variable:
            return f"environment variable {variable}"
        source = self._read.kept_origin.get(loc[0]) if self._read else None
        return f"{source}: key '{key}'" if source else f"key '{key}'"

    @property
    def notes(self) -> list[str]:
        """What was read but not used (keys of the tutorial's docker layout), one line each."""
        return list(self._read.notes) if self._read else []

    @property
    def set_aside(self) -> list[str]:
        """Invalid keys of files this command does not read, left at their defaults."""
        return list(self._read.set_aside) if self._read else []

    @property
    def set_aside_keys(self) -> frozenset[str]:
        """The top-level keys left at their defaults because they were invalid."""
        return self._read.set_aside_keys if self._read else frozenset()

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
        # Highest first: arguments, the environment, the config dir's YAML files.
        return (init_settings, KeptEnvSource(settings_cls), ConfigDirSource(settings_cls))

    @model_validator(mode="after")
    def _placed_in_project(self) -> Settings:
        """Read from a config dir: relative paths are under its project, a URL that
        names this state dir's own server is ours, and where each key came from is
        kept for messages."""
        read = current_read()
        if read is None:
            return self
        self.home = _under(self.home, read.root)
        self.data_dir = _under(self.data_dir, read.root)
        if self.dataset.registry is not None:
            registry = _under(self.dataset.registry, read.root)
            self.dataset = self.dataset.model_copy(update={"registry": registry})
        self._own_servers_as_ours()
        self._read = read
        return self

    def _own_servers_as_ours(self) -> None:
        """A URL that points at the server this very state dir runs (what `stack env`
        exports, then read back in the same shell) is not an external service: `stack
        up/down/status` keep managing it, and its keys and logins come from the state
        dir."""
        if all(getattr(getattr(self, name), key) is None for name, key in URL_KEYS.items()):
            return
        for host in {self.client_host, self.advertised_host}:
            own = self.own_urls(host)
            for name, key in URL_KEYS.items():
                section = getattr(self, name)
                url = getattr(section, key)
                if url is not None and _same_url(url, own[name]) and (self.home / name).is_dir():
                    setattr(self, name, section.model_copy(update={key: None}))

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


def _under(path: Path, root: Path) -> Path:
    """`path` (`~` expanded), placed under `root` when relative."""
    path = path.expanduser()
    return (path if path.is_absolute() else root / path).absolute()


def _same_url(a: str, b: str) -> bool:
    def norm(url: str) -> str:
        return url.rstrip("/").replace("://localhost:", "://127.0.0.1:")

    return norm(a) == norm(b)
