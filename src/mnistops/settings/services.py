"""`config/stack.yml`: the services and their ports, keys and logins (S3, MLflow,
Prefect) and the prediction service."""

from __future__ import annotations

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from mnistops.settings.base import Port, Section, _any_url, _check_port, _web_url


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
    auth_cache_s: int = Field(
        60,
        ge=0,
        le=3600,
        description="how long the embedded server's login app trusts a login it checked"
        " (MLflow's `auth_cache_ttl_seconds`); 0 checks the password hash at every request",
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


class PredictionLogSettings(Section):
    """What the service records of its answers and of the feedback on them: batches of
    records written to the object store (`s3.buckets.dvc`, under `predictions/` and
    `feedback/`), never on a request's path."""

    enabled: bool = Field(True, description="record every answer of /predict")
    batch_records: int = Field(
        2000, ge=1, le=100_000, description="a batch is written when it holds this many records"
    )
    batch_s: float = Field(
        30.0, gt=0, le=3600, description="... or when its oldest record is this many seconds old"
    )
    label_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="... or this many seconds after a label came (with what it labels), so"
        " `data add --feedback` soon finds it",
    )
    max_buffered: int = Field(
        50_000,
        ge=10,
        le=5_000_000,
        description="records waiting to be written at most; past it new ones are shed"
        " (counted in /metrics), an answer never waits",
    )
    retention_days: int = Field(
        30, ge=1, le=3650, description="batches older than this are deleted by the service"
    )
    feedback_window_h: float = Field(
        168.0, gt=0, le=24 * 365, description="how long an answer can be labelled (/feedback)"
    )
    feedback_per_minute: int = Field(
        600, ge=1, le=1_000_000, description="labels accepted per minute at most (429 beyond)"
    )
    known_requests: int = Field(
        100_000,
        ge=100,
        le=10_000_000,
        description="answers the service remembers for /feedback (the oldest are forgotten)",
    )

    @model_validator(mode="after")
    def _a_batch_fits_the_buffer(self) -> PredictionLogSettings:
        if self.max_buffered < self.batch_records:
            raise ValueError(
                f"max_buffered ({self.max_buffered}) must be at least batch_records"
                f" ({self.batch_records}): a batch is written from the buffer"
            )
        return self


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

    log: PredictionLogSettings = PredictionLogSettings()

    _ports = field_validator("port")(_check_port)
    _url = field_validator("url")(_web_url)
