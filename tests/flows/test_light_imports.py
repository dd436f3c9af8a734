"""What `mnistops deploy` and `mnistops run --wait` load: the flow's module for its
signature and artifact key, without the training's libraries (seconds of CPU each)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
