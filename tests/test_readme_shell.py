"""The README's commands in one bash shell, in its order, `eval "$(mnistops stack env)"`
included: the variables that point clients at the stack never change what the state
dir's own `stack up/down/status` manage, and `stack env` prints the same complete set
whatever the shell holds and from whichever folder below the project it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mnistops.stack.ports import free_port_config

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCRIPT = r"""
set -u
step() { echo "=== $1"; }
cd "$PROJECT"
step up;        mnistops stack up >/dev/null; echo "rc=$?"
step env1;      mnistops stack env > first.env; echo "rc=$?"
eval "$(mnistops stack env)"
step status;    mnistops stack status; echo "rc=$?"
step down;      mnistops stack down; echo "rc=$?"
step up2;       mnistops stack up 2>&1 | tail -n 3; echo "rc=${PIPESTATUS[0]}"
step env2;      mnistops stack env > second.env; echo "rc=$?"
step sub;       mkdir -p deeper/down && cd deeper/down && mnistops stack status; echo "rc=$?"
step subenv;    mnistops stack env > ../../third.env; echo "rc=$?"
cd "$PROJECT"
step list;      mnistops data list; echo "rc=$?"
step client;    cd "$ELSEWHERE" && mnistops stack env > "$PROJECT/fourth.env"; echo "rc=$?"
unset MNISTOPS_S3__ENDPOINT_URL MNISTOPS_MLFLOW__TRACKING_URI MNISTOPS_PREFECT__API_URL
step elsewhere; mnistops stack env; echo "rc=$?"
H="$PROJECT/.mnistops"
step byhome;    MNISTOPS_HOME="$H" mnistops stack env > "$PROJECT/fifth.env"; echo "rc=$?"
cd "$PROJECT"
step final;     mnistops stack down; echo "rc=$?"
"""


def sections(output: str) -> dict[str, str]:
    parts = output.split("=== ")[1:]
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in parts}


@pytest.mark.slow(
    "every command of the README's shell in order: a stack up, an ingest, a training, a deploy"
)
def test_the_readme_shell(tmp_path: Path) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "config").mkdir(parents=True)
    elsewhere.mkdir()
    config = free_port_config(tmp_path)
    config.pop("home"), config.pop("data_dir")  # the defaults: .mnistops/ and data/
    (project / "config" / "stack.yml").write_text(yaml.safe_dump(config))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MNISTOPS_", "AWS_"))}
    env = {
        **clean,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PROJECT": str(project),
        "ELSEWHERE": str(elsewhere),
    }
    done = subprocess.run(
        ["bash", "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    try:
        steps = sections(done.stdout)
        ok = ("up", "env1", "status", "down", "up2", "env2", "sub", "subenv", "list", "client")
        ok += ("byhome",)
        for name in ok:
            assert "rc=0" in steps[name], (name, steps.get(name), done.stderr[-3000:])
        assert "Traceback" not in done.stderr
        assert "started" not in steps["down"] and "stopped: prefect, mlflow, s3" in steps["down"]
        assert "external" not in steps["status"] + steps["up2"]
        first = (project / "first.env").read_text()
        assert "AWS_SECRET_ACCESS_KEY=" in first
        assert (project / "second.env").read_text() == first
        assert (project / "third.env").read_text() == first
        assert (project / "fourth.env").read_text() == first, "a client shell: the same set"
        assert (project / "fifth.env").read_text() == first, "MNISTOPS_HOME names the stack"
        assert steps["sub"].count("healthy") >= 3 and "this host" in steps["sub"]
        assert "rc=2" in steps["elsewhere"] and "no mnistops stack found" in done.stderr
        assert str(elsewhere / ".mnistops") in " ".join(done.stderr.split())
        assert "rc=0" in steps["final"]
    finally:
        subprocess.run(
            [sys.executable, "-m", "mnistops", "stack", "down"],
            cwd=project,
            env=clean,
            capture_output=True,
            timeout=120,
        )
