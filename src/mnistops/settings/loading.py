"""Reading the settings: the config dir found like `git` finds its repository, the YAML
files merged (each key in one file), the environment on top, every error naming the
file or variable and the key."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    SecretStr,
    ValidationError,
)
from pydantic_settings import (
    SettingsError,
)

from mnistops.settings.base import CONFIG_FILES, ENV_NESTED, ENV_PREFIX, ConfigError, env_var_for
from mnistops.settings.model import Settings
from mnistops.settings.network import POSTGRES_ONLY, _is_postgres_url
from mnistops.settings.sources import ConfigRead, read_config_dir, reading


def with_database_url(settings: Settings, url: str) -> Settings:
    """The settings with another database URL (the `--db` option)."""
    if not _is_postgres_url(url):
        raise ConfigError(f"--db: {POSTGRES_ONLY}")
    return settings.model_copy(update={"database_url": SecretStr(url)})


def default_config_dir() -> Path:
    """`$MNISTOPS_CONFIG_DIR`, else `./config`."""
    return Path(os.environ.get(f"{ENV_PREFIX}CONFIG_DIR", "config"))


STATE_DIR_KEYS = frozenset({"home"})
"""all `stack down` needs: it stops what the state dir's records name"""


def _judged(read: ConfigRead, needs: frozenset[str] | None) -> ConfigRead:
    """The reading, once each file that could not be read and each key set twice is
    judged against what the command reads: refused (raised) when it may hold something
    the command needs, else set aside with its error, for the one warning line.

    A file other than stack.yml may be skipped when every key the command needs beyond
    the stack's is set by another file; stack.yml only by `stack down`, which needs
    only the state dir (MNISTOPS_HOME, or the default)."""
    if needs is None:
        return read
    errors: list[str] = []
    for key, clash in read.clashes:
        if key in needs:
            raise clash
        errors.append(" ".join(str(clash).split()))
    for name, problem in read.unreadable:
        if name == "stack.yml":
            skippable = needs <= STATE_DIR_KEYS
            if skippable:
                read = _with_home_line(read, read.config_dir / name)
        else:
            skippable = needs - STACK_KEYS <= set(read.origin)
        if not skippable:
            raise problem
        errors.append(" ".join(f"{problem} (the whole file)".split()))
    return read.without(set(), errors) if errors else read


HOME_LINE = re.compile(r"^home:[ \t]*([^#\s][^#\n]*?)[ \t]*(?:#.*)?$", re.MULTILINE)


def _with_home_line(read: ConfigRead, path: Path) -> ConfigRead:
    """The reading with the state dir of a stack.yml that is no YAML, from its one
    top-level `home:` line, so that `stack down` finds what that stack runs."""
    if not path.is_file():
        return read
    text = path.read_bytes().decode("utf-8", errors="replace")
    found = HOME_LINE.findall(text)
    if len(found) != 1 or "home" in read.origin:
        return read
    home = found[0].strip("'\"")
    return replace(read, values={**read.values, "home": home}, origin={**read.origin, "home": path})


def _unneeded(
    exc: ValidationError, origin: dict[str, Path], needs: frozenset[str] | None
) -> set[str]:
    """The top-level keys to set aside: every error is in a key outside `needs`, from a
    file or a variable (none when one is not: the command refuses as before). An
    unknown top-level key counts as the key it most resembles (`mlfow` as `mlflow`); one
    like no key counts as needed when stack.yml holds it, unless the command needs only
    the state dir (`stack down`)."""
    if needs is None:
        return set()
    keys = set()
    for error in exc.errors():
        loc = tuple(error["loc"])
        top = str(loc[0]) if loc else ""
        from_env = any(env_var_for(loc[:n]) in os.environ for n in range(len(loc), 0, -1))
        if not top or top in needs or (top not in origin and not from_env):
            return set()
        if error["type"] == "extra_forbidden" and len(loc) == 1 and needs > STATE_DIR_KEYS:
            meant = _closest_key(top)
            if meant in needs or (meant is None and origin.get(top, Path()).name == "stack.yml"):
                return set()
        keys.add(top)
    return keys


def _closest(name: str, known: list[str], cutoff: float) -> str | None:
    """The one of `known` that `name` most resembles (difflib's ratio >= cutoff), if any."""
    import difflib

    found = difflib.get_close_matches(name, known, n=1, cutoff=cutoff)
    return found[0] if found else None


def _closest_key(key: str) -> str | None:
    """The top-level key of the settings that `key` most resembles, if any."""
    return _closest(key, list(Settings.model_fields), 0.75)


def _closest_variable(name: str) -> str | None:
    """The settings variable that `name` all but is, if any."""
    return _closest(name, environment_variables(), 0.9)


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
    if err["type"] == "extra_forbidden" and from_env:
        meant_variable = _closest_variable(from_env)
        message = "sets no key" + (f": {_did_you_mean(meant_variable)}" if meant_variable else "")
    elif err["type"] == "extra_forbidden":
        meant = _closest_key(key) if len(loc) == 1 else None
        hint = f" (did you mean '{meant}'?)" if meant else ""
        message = f"unknown key{hint}; see the README's configuration section for the keys allowed"
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


def is_project(folder: Path) -> bool:
    """A folder holds a state dir, or a `config/` with one of mnistops' settings files."""
    return (folder / STATE_DIR).is_dir() or any(
        (folder / "config" / name).is_file() for name in CONFIG_FILES
    )


def project_root(start: Path | None = None) -> Path | None:
    """The nearest folder, from `start` (the working dir) up, that is a project."""
    start = (start or Path.cwd()).absolute()
    return next((f for f in (start, *start.parents) if is_project(f)), None)


def where_looked(start: Path | None = None) -> str:
    start = (start or Path.cwd()).absolute()
    return (
        f"{start / STATE_DIR} and the {STATE_DIR} of every folder above it (or the state"
        f" dir named by the nearest config/stack.yml)"
    )


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
SERVING_KEYS = STACK_KEYS | {"model_registry"}
"""what `serve` and the registry's commands (`models ...` but train) read"""


def load_settings(config_dir: Path | None = None, needs: frozenset[str] | None = None) -> Settings:
    """Read the config dir and the environment; raise ConfigError naming file and key.

    Run from a folder below a project (one that holds `.mnistops/` or a `config/` with
    mnistops' files), the settings are
    that project's: its `config/` and state dir, as `git` finds its repository. An
    explicit `--config-dir`, MNISTOPS_CONFIG_DIR or MNISTOPS_HOME turns the search off.

    With `needs` (the top-level keys a command reads), a file's invalid key outside them
    is set aside (its section takes the defaults) and named in `set_aside`: a typo in
    hyp.yml never stops `stack down`; nor does one in MNISTOPS_HYPERPARAMETER__*.
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
    read = _judged(read_config_dir(config_dir, root, lenient=needs is not None), needs)
    misspelled = _misspelled_variables()
    meant = {key for _line, key in misspelled}
    lines = [line for line, _key in misspelled]
    if misspelled and (needs is None or (needs > STATE_DIR_KEYS and meant & needs)):
        raise ConfigError("; ".join(lines))
    if misspelled:
        read = read.without(set(), lines)
    # A variable that cannot be parsed at all (a section that is no JSON) stops the
    # reading of the environment: set aside, one at a time, where the command does not
    # read its key; refused where it does.
    for _ in Settings.model_fields:
        try:
            return _built(read, needs)
        except SettingsError as exc:
            problem, key = _unreadable_variable(exc)
            if needs is None or key is None or key in needs or key in read.set_aside_keys:
                raise ConfigError(problem) from None
            read = read.without({key}, [problem])
    raise ConfigError("the environment's MNISTOPS_* variables cannot be read")


def _misspelled_variables() -> list[tuple[str, str]]:
    """(a line, the top-level key it was meant for) for each MNISTOPS_* variable that sets
    nothing but is all but the name of one that does (pydantic-settings ignores an
    unknown name: the key would silently keep its value). A name under a known section
    (MNISTOPS_HYPERPARAMETER__N_EPOCH) is left to the section's own check."""
    names = sorted(name for name in os.environ if name.startswith(ENV_PREFIX))
    known = environment_variables() if names else []
    found = []
    for name in names:
        if name in known or name.split(ENV_NESTED)[0] in known:
            continue
        meant = _closest_variable(name)
        if meant:
            key = meant.removeprefix(ENV_PREFIX).split(ENV_NESTED)[0].lower()
            found.append((f"environment variable {name} sets nothing: {_did_you_mean(meant)}", key))
    return found


def _did_you_mean(meant: str) -> str:
    return f"did you mean {meant}? (rename it, or unset it)"


def _unreadable_variable(exc: SettingsError) -> tuple[str, str | None]:
    """(the message, the top-level key) of a variable pydantic-settings could not parse."""
    field = re.search(r'field "(\w+)"', str(exc))
    key = field.group(1) if field else None
    name = f"{ENV_PREFIX}{key.upper()}" if key else f"an {ENV_PREFIX}* variable"
    return (
        f"environment variable {name} cannot be read: a whole section takes a JSON object,"
        f" e.g. {ENV_PREFIX}S3='{{\"port\": 8334}}'; or set one key, e.g. {ENV_PREFIX}S3__PORT=8334"
    ), key


def _built(read: ConfigRead, needs: frozenset[str] | None) -> Settings:
    """The settings from `read` and the environment; keys outside `needs` whose value is
    invalid set aside (see `_unneeded`), else ConfigError naming every bad key."""
    try:
        try:
            with reading(read):
                return Settings()
        except ValidationError as exc:
            aside = _unneeded(exc, read.origin, needs)
            if not aside:
                raise
            errors = [_describe_error(dict(e), read.origin, read.config_dir) for e in exc.errors()]
            with reading(read.without(aside, errors)):
                return Settings()
    except ValidationError as exc:
        lines = [_describe_error(dict(e), read.origin, read.config_dir) for e in exc.errors()]
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
