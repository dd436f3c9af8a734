"""One typed settings object, read from `config/*.yml` and `MNISTOPS_*` variables.

Precedence, highest first: environment variables (`MNISTOPS_HOME`,
`MNISTOPS_MLFLOW__PORT`, ... nested keys joined by `__`), then the YAML files
of the config dir, then the defaults written in the models. Nothing is read at import
time: call `load_settings()`.

One module per concern:
- `base`: the error, the base section, ports and URLs checked, variable names
- `services`: `stack.yml`'s services (S3, MLflow, Prefect) and the prediction service
- `training`: `dataset.yml` and `hyp.yml`
- `flow`: `flow.yml`: the deployment, its schedule, the model registry and its gate
- `network`: this host's addresses, loopback, reachable names, database URLs
- `sources`: the config dir's YAML files as a pydantic-settings source
- `model`: `Settings`, every section, and the URLs derived from them
- `loading`: `load_settings`: the config dir found, read, errors named
"""

from mnistops.settings.base import ENV_PREFIX, ConfigError, Device
from mnistops.settings.flow import (
    DeploymentSettings,
    ModelRegistrySettings,
    MonitoringSettings,
    SchedulerSettings,
)
from mnistops.settings.loading import (
    SERVING_KEYS,
    STACK_KEYS,
    STATE_DIR_KEYS,
    environment_variables,
    load_settings,
    where_looked,
    with_database_url,
)
from mnistops.settings.model import Settings
from mnistops.settings.network import WILDCARDS, is_loopback, primary_address, url_host
from mnistops.settings.services import ServeSettings
from mnistops.settings.training import DatasetSettings, HyperParameters

__all__ = [
    "ENV_PREFIX",
    "SERVING_KEYS",
    "STACK_KEYS",
    "STATE_DIR_KEYS",
    "WILDCARDS",
    "ConfigError",
    "DatasetSettings",
    "DeploymentSettings",
    "Device",
    "HyperParameters",
    "ModelRegistrySettings",
    "MonitoringSettings",
    "SchedulerSettings",
    "ServeSettings",
    "Settings",
    "environment_variables",
    "is_loopback",
    "load_settings",
    "primary_address",
    "url_host",
    "where_looked",
    "with_database_url",
]
