"""The config dir's YAML files as a pydantic-settings source.

`load_settings` reads the files once into a `ConfigRead` and builds `Settings` inside
`reading(...)`; the source hands the files' values to pydantic-settings (below the
environment), and `Settings`' own validator places relative paths under the project
and records where each key came from. Built outside `reading` (`Settings()` in a test
or a script), the settings are the defaults and the environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import EnvSettingsSource, PydanticBaseSettingsSource

from mnistops.settings.base import CONFIG_FILES, ConfigError

LAYOUT_ONLY_KEYS = {
    "RFS_NAME": "the tutorial's remote file system block of its docker layout; a worker"
    " here runs the flow from the installed package",
    "flow_py_name": "the tutorial's flow file; the flow is part of the installed package",
    "dvc_remote": "the DVC remote is the stack's object store (s3.buckets.dvc)",
    "train_data_path": "the data is read from a published version, or data_dir for ingest",
}
"""keys of the tutorial's files that meant something only for its docker layout"""


@dataclass(frozen=True)
class ConfigRead:
    """One reading of a config dir: its values, which file set each top-level key, the
    keys of the tutorial's layout that were dropped, and the folder relative paths are
    placed under."""

    config_dir: Path
    root: Path
    values: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, Path] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    set_aside: tuple[str, ...] = ()
    """the errors of the keys left at their defaults (a command that does not read them)"""
    set_aside_keys: frozenset[str] = frozenset()
    unreadable: tuple[tuple[str, ConfigError], ...] = ()
    """(file name, why) of each file that could not be read (only when reading leniently)"""
    clashes: tuple[tuple[str, ConfigError], ...] = ()
    """(key, why) of each top-level key set in two files (only when reading leniently)"""

    def without(self, keys: set[str], errors: list[str]) -> ConfigRead:
        """The same reading with the top-level `keys` left out (of the files and of the
        environment), their `errors` kept."""
        return replace(
            self,
            set_aside=self.set_aside + tuple(errors),
            set_aside_keys=self.set_aside_keys | frozenset(keys),
        )

    @property
    def kept(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k not in self.set_aside_keys}

    @property
    def kept_origin(self) -> dict[str, Path]:
        return {k: v for k, v in self.origin.items() if k not in self.set_aside_keys}


_reading: ContextVar[ConfigRead | None] = ContextVar("mnistops_config_read", default=None)


@contextmanager
def reading(read: ConfigRead) -> Iterator[None]:
    """Settings built inside take `read`'s values and place paths under its root."""
    token = _reading.set(read)
    try:
        yield
    finally:
        _reading.reset(token)


def current_read() -> ConfigRead | None:
    """The reading that settings being built now come from (None: defaults and env)."""
    return _reading.get()


class ConfigDirSource(PydanticBaseSettingsSource):
    """The YAML files of the config dir being read (see `reading`)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        read = current_read()
        value = read.kept.get(field_name) if read else None
        return value, field_name, False

    def __call__(self) -> dict[str, Any]:
        read = current_read()
        return dict(read.kept) if read else {}


class KeptEnvSource(EnvSettingsSource):
    """The MNISTOPS_* variables, without those of the keys the reading set aside: a
    command that does not read a key is not stopped by its variable."""

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        read = current_read()
        if read is not None and field_name in read.set_aside_keys:
            return None
        return super().prepare_field_value(field_name, field, value, value_is_complex)


def read_config_dir(config_dir: Path, root: Path, lenient: bool = False) -> ConfigRead:
    """Merge the top-level keys of every config file; remember which file set each.

    `lenient`: a file that cannot be read, and a key set in two files, are listed in
    `unreadable` and `clashes` (the key left out) instead of raised, for the caller to
    judge against what its command reads."""
    values: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    notes: list[str] = []
    unreadable: list[tuple[str, ConfigError]] = []
    clashes: dict[str, ConfigError] = {}
    for name in CONFIG_FILES:
        path = config_dir / name
        if not path.exists() and not path.is_symlink():
            continue
        try:
            data = _read_yaml(path)
        except ConfigError as exc:
            if not lenient:
                raise
            unreadable.append((name, exc))
            continue
        for key, value in _drop_layout_keys(path, data, notes).items():
            if key in origin or key in clashes:
                where = origin.get(key) or "another file"
                clash = ConfigError(f"{path}: key '{key}' is already set in {where}")
                if not lenient:
                    raise clash
                clashes.setdefault(key, clash)
                values.pop(key, None)
                origin.pop(key, None)
                continue
            values[key] = value
            origin[key] = path
    return ConfigRead(
        config_dir.absolute(),
        root,
        values,
        origin,
        tuple(notes),
        unreadable=tuple(unreadable),
        clashes=tuple(clashes.items()),
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        # a folder, a FIFO (reading it would wait forever), a device, a broken link
        raise ConfigError(f"{path}: not a regular file: make it a YAML file of keys, or remove it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML{_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, on one line (PyYAML's own text quotes the line over several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{where}: {f'{context}, ' if context else ''}{problem}"


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
