"""A stack of the benchmarks' own: a config dir in a temp folder, every port free."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
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


CHAMPION_STEPS = (
    ("data", "ingest", "--fast"),
    ("data", "version", "v1.0", "-m", "v1"),
    ("train", "--fast"),
)


@contextmanager
def stack_with_a_champion(root: Path, mnistops: list[str]) -> Iterator[Settings]:
    """A scratch stack in `root` with v1.0 (--fast) published and a champion trained on
    it by `mnistops` (the command with its --config-dir); stopped at the end."""
    from mnistops import stack

    settings = scratch_settings(root)
    print("starting a stack, publishing v1.0 (--fast), training a champion ...", flush=True)
    stack.up(settings)
    try:
        for args in CHAMPION_STEPS:
            done = subprocess.run([*mnistops, *args], cwd=root, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        yield settings
    finally:
        stack.down(settings)
