"""Bad configuration through the real command: an error naming the file and the key,
exit status 2, and nothing started or created (no state dir, no data dir)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.bad_input]

CASES = [
    ("stack.yml", "mlflow: [\n", ("stack", "up"), "stack.yml: not valid YAML"),
    ("stack.yml", "mlflow:\n  prot: 5050\n", ("stack", "up"), "stack.yml: key 'mlflow.prot'"),
    (
        "hyp.yml",
        "hyperparameter:\n  batch_size: many\n",
        ("train",),
        "hyp.yml: key 'hyperparameter.batch_size'",
    ),
    (
        "flow.yml",
        "scheduler:\n  cron: '61 * * * *'\n",
        ("deploy",),
        "flow.yml: key 'scheduler.cron'",
    ),
    (
        "flow.yml",
        "scheduler:\n  method: rrule\n  rrule: FREQ=SOMETIMES\n",
        ("deploy",),
        "flow.yml: key 'scheduler.rrule'",
    ),
    (
        "flow.yml",
        "scheduler:\n  timezone: Mars/Olympus\n",
        ("deploy",),
        "flow.yml: key 'scheduler.timezone'",
    ),
    ("flow.yml", "scheduler:\n  method: hourly\n", ("deploy",), "flow.yml: key 'scheduler.method'"),
    (
        "flow.yml",
        "deployment:\n  pool_name: gpu\n",
        ("deploy",),
        "flow.yml: key 'deployment.pool_name'",
    ),
]


@pytest.mark.parametrize(
    ("file", "text", "command", "expected"),
    CASES,
    ids=[c[3].split("'")[1] if "'" in c[3] else "yaml" for c in CASES],
)
def test_bad_config_stops_the_command_before_anything_is_made(
    tmp_path: Path, file: str, text: str, command: tuple[str, ...], expected: str
) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    home, data = tmp_path / "state", tmp_path / "data"
    if file != "stack.yml":
        (config_dir / "stack.yml").write_text(
            yaml.safe_dump({"home": str(home), "data_dir": str(data)})
        )
    (config_dir / file).write_text(text)
    done = run_cli(*command, config_dir=config_dir, cwd=tmp_path, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert expected in " ".join(done.stderr.split()), done.stderr
    assert not home.exists() and not data.exists() and not (tmp_path / ".mnistops").exists()


def test_a_data_folder_that_cannot_be_made_is_named_without_a_traceback(tmp_path: Path) -> None:
    """The operating system's refusal (here: a file where the data folder should be;
    alike for a folder not writable, a full disk) in one line naming the path."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (tmp_path / "afile").write_text("not a folder")
    data = tmp_path / "afile" / "data"
    (config_dir / "stack.yml").write_text(
        yaml.safe_dump({"home": str(tmp_path / "state"), "data_dir": str(data)})
    )
    done = run_cli("data", "ingest", "--fast", config_dir=config_dir, cwd=tmp_path, timeout=120)
    said = " ".join(done.stderr.split())
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert f"{data / 'MNIST'}: Not a directory" in said and "a file stands where" in said
