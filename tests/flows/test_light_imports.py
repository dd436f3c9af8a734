"""What `mnistops deploy` and `mnistops run --wait` load: the flow's module for its
signature and artifact key, without the training's libraries (seconds of CPU each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import closed_port

pytestmark = pytest.mark.unit

HEAVY = ("torch", "mlflow", "matplotlib", "scipy")


def test_the_flow_modules_load_without_torch_or_mlflow() -> None:
    code = (
        "import sys\n"
        "import mnistops.flows.deployment, mnistops.flows.quick_runs, mnistops.flows.retrain\n"
        "from prefect.utilities.callables import parameter_schema\n"
        "parameter_schema(mnistops.flows.retrain.mnist_flow)\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


def test_the_event_of_a_published_version_needs_no_prefect_import(tmp_path: Path) -> None:
    """`data version` announces its version (the event, who listens) over the REST API:
    Prefect's client would cost every publish about a second of CPU. Here no server
    answers: the announcement says so, and nothing heavy was imported on the way."""
    code = (
        "import sys\n"
        "from mnistops.flows.events import announce\n"
        "from mnistops.settings import load_settings\n"
        "said = announce(load_settings(), 'v1.0', '0' * 64)\n"
        "assert said.problem and 'could not be sent' in said.problem, said\n"
    )
    assert heavy_imports_without_a_server(code, tmp_path) == []


def test_the_champion_lock_needs_no_prefect_import(tmp_path: Path) -> None:
    """`mnistops train` and `models promote` take the champion gate's lock over the REST
    API (Prefect's client cost each a second of CPU); with no server, a clear error."""
    code = (
        "import sys\n"
        "from mnistops.settings import load_settings\n"
        "from mnistops.stack.locks import LockError, held\n"
        "try:\n"
        "    with held(load_settings(), 'gate'):\n"
        "        raise AssertionError('taken with no server')\n"
        "except LockError as exc:\n"
        "    assert 'start the stack or set prefect.api_url' in str(exc), exc\n"
    )
    assert heavy_imports_without_a_server(code, tmp_path) == []


def heavy_imports_without_a_server(code: str, tmp_path: Path) -> list[str]:
    """Run `code` in a new Python with a Prefect URL where no server answers; then name
    Prefect and the heavy libraries it imported."""
    code += f"\nprint(' '.join(m for m in ('prefect', *{HEAVY!r}) if m in sys.modules))"
    with closed_port() as port:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "MNISTOPS_HOME": str(tmp_path / "state"),
            "MNISTOPS_PREFECT__API_URL": f"http://127.0.0.1:{port}/api",
        }
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
        )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def imported_anywhere(module: str) -> list[str]:
    """Every module `module`'s source imports, at its top or inside its functions."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    found = {module}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return sorted(found - {"__future__"})


def test_monitoring_here_needs_neither_torch_nor_prefect() -> None:
    """`mnistops monitor --here` judges logged answers with NumPy and SciPy and records
    the run in MLflow: importing torch (for an experiment's id) and Prefect (for the
    drift event, sent over REST) cost it about four of its ten seconds of CPU."""
    modules = sorted(
        {
            m
            for source in ("mnistops.loop.monitoring", "mnistops.loop.report")
            for m in imported_anywhere(source)
        }
        | {"mnistops.cli.loop", "mnistops.flows.events"}
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(m for m in ('torch', 'prefect') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
