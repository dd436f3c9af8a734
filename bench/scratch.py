"""A stack of the benchmarks' own: a config dir in a temp folder, every port free."""

from __future__ import annotations

from pathlib import Path

import yaml

from mnistops.settings import Settings, load_settings
from mnistops.stack.ports import free_port_config


def scratch_settings(root: Path) -> Settings:
    """The settings of a stack in `root` (state dir, data, config/stack.yml), on free
    ports."""
    config_dir = root / "config"
    config_dir.mkdir()
    (config_dir / "stack.yml").write_text(yaml.safe_dump(free_port_config(root)))
    return load_settings(config_dir)
