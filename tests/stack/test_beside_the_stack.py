"""A typo in hyp.yml, flow.yml or dataset.yml never stops the stack's own commands: the
bad key is left at its default with one warning line naming it (`stack up`, `status`,
`env`, `logs`, `models`, `serve`), and the commands that use it still refuse, naming
file and key. (Issue: a running stack could not be looked at or stopped until the
training settings were fixed.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from mnistops.settings import Settings
from mnistops.stack.ports import free_port_pair
from tests.helpers import cli_command, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.bad_input]

BROKEN = {
    "hyp.yml": ("hyperparameter:\n  n_epochs: two\n", "hyperparameter.n_epochs", ("train",)),
    "flow.yml": ("scheduler:\n  method: weekly\n", "scheduler.method", ("deploy",)),
    "dataset.yml": ("dataset:\n  train_size: lots\n", "dataset.train_size", ("data", "list")),
}


def broken_config(settings: Settings, tmp_path: Path, name: str) -> tuple[Path, str]:
    """A copy of the stack's config dir with `name` broken; (the dir, the bad key)."""
    assert settings.config_dir is not None
    config_dir = tmp_path / "config"
    shutil.copytree(settings.config_dir, config_dir)
    (config_dir / name).write_text(BROKEN[name][0])
    return config_dir, BROKEN[name][1]


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_typo_beside_the_stack_never_stops_its_commands(
    stack_settings: Settings, tmp_path: Path, name: str
) -> None:
    config_dir, key = broken_config(stack_settings, tmp_path, name)
    for command in (
        ("stack", "up"),
        ("stack", "status"),
        ("stack", "env"),
        ("stack", "logs", "mlflow"),
        ("models",),
    ):
        done = run_cli(*command, config_dir=config_dir)
        assert done.returncode == 0, (command, done.stderr)
        assert done.stderr.count("warning:") == 1, done.stderr
        assert f"{name}: key '{key}'" in " ".join(done.stderr.split())
    assert "healthy" in run_cli("stack", "status", config_dir=config_dir).stdout


NOT_YAML = {
    "hyp.yml": (b"hyperparameter: [unclosed\n", "not valid YAML", ("train",)),
    "flow.yml": (b"- a\n- b\n", "must be a mapping", ("deploy",)),
    "dataset.yml": (bytes(range(128, 256)), "not UTF-8 text", ("data", "list")),
}


@pytest.mark.parametrize("name", sorted(NOT_YAML))
def test_a_file_that_is_no_yaml_beside_the_stack_never_stops_its_commands(
    stack_settings: Settings, tmp_path: Path, name: str
) -> None:
    """Not a typo but a file that cannot be read at all: the stack's commands still
    work with one warning naming the file; the commands that use it refuse."""
    assert stack_settings.config_dir is not None
    config_dir = tmp_path / "config"
    shutil.copytree(stack_settings.config_dir, config_dir)
    content, problem, user = NOT_YAML[name]
    (config_dir / name).write_bytes(content)
    for command in (("stack", "status"), ("stack", "env"), ("stack", "logs", "mlflow")):
        done = run_cli(*command, config_dir=config_dir)
        assert done.returncode == 0, (command, done.stderr)
        said = " ".join(done.stderr.split())
        assert done.stderr.count("warning:") == 1 and f"{name}: {problem}" in said, said
    refused = run_cli(*user, config_dir=config_dir)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{name}: {problem}" in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_serve_starts_beside_a_typo(stack_settings: Settings, tmp_path: Path, name: str) -> None:
    config_dir, key = broken_config(stack_settings, tmp_path, name)
    port = free_port_pair()
    service = subprocess.Popen(
        cli_command(("serve", "--port", str(port)), config_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        answered = False
        deadline = time.monotonic() + 90
        while not answered and service.poll() is None and time.monotonic() < deadline:
            try:
                answered = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code < 600
            except httpx.HTTPError:
                time.sleep(0.3)
    finally:
        service.terminate()
        _out, err = service.communicate(timeout=60)
    assert answered, err
    said = " ".join(err.split())
    assert said.count(f"{name}: key '{key}'") == 1, err
    assert "invalid settings" not in said and "Traceback" not in said, err


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_the_commands_that_use_it_still_refuse(
    stack_settings: Settings, tmp_path: Path, name: str
) -> None:
    config_dir, key = broken_config(stack_settings, tmp_path, name)
    done = run_cli(*BROKEN[name][2], config_dir=config_dir)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{name}: key '{key}'" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


BAD_VARIABLES = {
    "MNISTOPS_HYPERPARAMETER__N_EPOCHS": "two",
    "MNISTOPS_DATASET": "{not json",
    "MNISTOPS_HYPERPARAMTER__BATCH_SIZE": "64",
}


def test_bad_variables_beside_the_stack_never_stop_its_commands(
    stack_settings: Settings,
) -> None:
    """The issue's typo set in the environment instead (a wrong value, a section that is
    no JSON, a misspelled name): the stack's commands work with one warning naming them;
    `train` refuses, naming them."""
    env = {**os.environ, **BAD_VARIABLES}
    config_dir = stack_settings.config_dir
    for command in (("stack", "status"), ("stack", "env"), ("models",)):
        done = run_cli(*command, config_dir=config_dir, env=env)
        assert done.returncode == 0, (command, done.stderr)
        said = " ".join(done.stderr.split())
        assert done.stderr.count("warning:") == 1, done.stderr
        assert all(name in said for name in BAD_VARIABLES), said
    refused = run_cli("train", "--fast", config_dir=config_dir, env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "MNISTOPS_HYPERPARAMTER__BATCH_SIZE" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_stack_down_stops_a_stack_whatever_its_settings_say(tmp_path: Path) -> None:
    """On a stack of its own: with a bad hyp.yml and a bad key in stack.yml itself, or a
    stack.yml that is no YAML, `stack status` refuses (it needs stack.yml), `stack down`
    still stops what the state dir's records name."""
    import yaml

    from tests.helpers import write_stack_config

    config_dir = write_stack_config(tmp_path)
    up = run_cli("stack", "up", config_dir=config_dir, timeout=300)
    assert up.returncode == 0, up.stderr
    stack_yml = config_dir / "stack.yml"
    good = stack_yml.read_text()
    (config_dir / "hyp.yml").write_text(BROKEN["hyp.yml"][0])
    config = yaml.safe_load(good)
    config["mlflow"] = {**config["mlflow"], "port": "many"}
    stack_yml.write_text(yaml.safe_dump(config))
    status = run_cli("stack", "status", config_dir=config_dir)
    assert status.returncode == 2 and "stack.yml: key 'mlflow.port'" in status.stderr
    down = run_cli("stack", "down", config_dir=config_dir, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "stopped:" in down.stdout and "nothing was running" not in down.stdout
    assert "mlflow" in down.stdout and "s3" in down.stdout
    stack_yml.write_text(good)
    assert "healthy" not in run_cli("stack", "status", config_dir=config_dir).stdout

    # A stack.yml that is no YAML at all: `stack down` takes the state dir from its
    # `home:` line; every other stack command refuses, naming the file.
    assert run_cli("stack", "up", config_dir=config_dir, timeout=300).returncode == 0
    stack_yml.write_text(good + "broken: [\n")
    status = run_cli("stack", "status", config_dir=config_dir)
    assert status.returncode == 2 and "stack.yml: not valid YAML" in status.stderr
    assert "Traceback" not in status.stderr
    # ... and variables that no command could read, as well: still stopped.
    env = {**os.environ, **BAD_VARIABLES}
    down = run_cli("stack", "down", config_dir=config_dir, env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "mlflow" in down.stdout and "s3" in down.stdout, down.stdout
    said = " ".join(down.stderr.split())
    assert said.count("stack.yml: not valid YAML") == 1, down.stderr
    assert down.stderr.count("warning:") == 1 and all(name in said for name in BAD_VARIABLES)
    stack_yml.write_text(good)
    assert "healthy" not in run_cli("stack", "status", config_dir=config_dir).stdout
