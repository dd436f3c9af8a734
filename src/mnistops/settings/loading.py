"""Reading the settings: the config dir found like `git` finds its repository, the YAML
files merged (each key in one file), the environment on top, every error naming the
file or variable and the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    SecretStr,
    ValidationError,
)
from pydantic_settings import (
    SettingsError,
)

from mnistops.settings.base import CONFIG_FILES, ENV_PREFIX, ConfigError, env_var_for
from mnistops.settings.model import Settings
from mnistops.settings.network import POSTGRES_ONLY, _is_postgres_url


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


def _unneeded(
    exc: ValidationError, origin: dict[str, Path], needs: frozenset[str] | None
) -> set[str]:
    """The top-level keys to set aside: every error is in a file's key outside `needs`
    (none when one is not: the command refuses as before)."""
    if needs is None:
        return set()
    keys = set()
    for error in exc.errors():
        loc = tuple(error["loc"])
        top = str(loc[0]) if loc else ""
        from_env = any(env_var_for(loc[:n]) in os.environ for n in range(len(loc), 0, -1))
        if not top or top in needs or top not in origin or from_env:
            return set()
        keys.add(top)
    return keys


def _describe_error(err: dict[str, Any], origin: dict[str, Path], config_dir: Path) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(part) for part in loc)
    env_names = [env_var_for(loc[:n]) for n in range(len(loc), 0, -1)]
    from_env = next((name for name in env_names if name in os.environ), None)
    if from_env:
        where = f"environment variable {from_env}"
    elif loc and loc[0] in origin:
        where = f"{origin[loc[0]]}: key '{key}'"
    else:
        where = f"key '{key}' (in {config_dir}/*.yml or {env_var_for(loc)})"
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
            names.append(env_var_for(loc))
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


STACK_KEYS = frozenset(
    {
        "home",
        "data_dir",
        "bind",
        "advertise",
        "database_url",
        "database_prefix",
        "s3",
        "mlflow",
        "prefect",
        "serve",
    }
)
"""the keys of stack.yml: all that the stack's commands read"""


def load_settings(config_dir: Path | None = None, needs: frozenset[str] | None = None) -> Settings:
    """Read the config dir and the environment; raise ConfigError naming file and key.

    Run from a folder below a project (one that holds `.mnistops/`), the settings are
    that project's: its `config/` and state dir, as `git` finds its repository. An
    explicit `--config-dir`, MNISTOPS_CONFIG_DIR or MNISTOPS_HOME turns the search off.

    With `needs` (the top-level keys a command reads), a file's invalid key outside them
    is set aside (its section takes the defaults) and named in `set_aside`: a typo in
    hyp.yml never stops `stack down`. An invalid environment variable always refuses.
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
    set_aside: list[str] = []
    aside: set[str] = set()
    try:
        try:
            settings = Settings(**values)
        except ValidationError as exc:
            aside = _unneeded(exc, origin, needs)
            if not aside:
                raise
            set_aside = [_describe_error(dict(e), origin, config_dir) for e in exc.errors()]
            settings = Settings(**{k: v for k, v in values.items() if k not in aside})
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
    settings._sources = {k: v for k, v in origin.items() if k not in aside}
    settings._notes = notes
    settings._set_aside = set_aside
    settings._set_aside_keys = frozenset(aside)
    settings._config_dir = config_dir.absolute()
    return settings
