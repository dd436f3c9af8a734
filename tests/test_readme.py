"""The README is the user's guide: it names every command, key and variable there is."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from mnistops.cli import app
from mnistops.settings import environment_variables

pytestmark = pytest.mark.unit

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def command_paths(group, prefix: tuple[str, ...] = ()) -> list[str]:
    paths = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            paths += command_paths(command, (*prefix, name))
        else:
            paths.append(" ".join(("mnistops", *prefix, name)))
    return paths


def test_every_command_is_in_the_reference() -> None:
    paths = command_paths(typer.main.get_command(app))
    assert len(paths) > 15
    missing = [path for path in paths if f"| `{path}" not in README]
    assert not missing, missing


def test_every_variable_and_key_is_documented() -> None:
    missing = [name for name in environment_variables() if f"`{name}" not in README]
    assert not missing, missing


def test_the_screenshots_exist() -> None:
    for image in ("docs/mlflow-runs.png", "docs/prefect-deployments.png", "docs/serve-draw.png"):
        assert f"]({image})" in README
        assert (Path(__file__).resolve().parent.parent / image).stat().st_size > 10_000
