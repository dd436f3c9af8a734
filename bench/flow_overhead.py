"""What Prefect orchestration adds to a retraining: a flow run against the same training
called directly, on one embedded stack, in one run.

  direct: `mnistops train --data-version v1.0 --epochs 1` (the CLI, the same functions);
  flow:   `mnistops run --data-version v1.0 --epochs 1 --wait` with a worker already
          running (`mnistops worker --detach`), measured to the end of the flow run;
  supervised: the same, the deployment without mnistops' job variables (Prefect's
          default start: a supervisor process that imports Prefect, then the engine).
The three alternate, ROUNDS rounds; medians printed.
Both train digitnet for one epoch on v1.0 (30,000 training images, the full MNIST test
set), after a `--fast` run has decoded v1.0 into the array cache, so both start warm.
Also printed: the time from `mnistops run` to the start of the MLflow run, i.e.
to the first training step. Target: the flow adds at most max(15 s, 10 % of the run).
Usage: .venv/bin/python bench/flow_overhead.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from scratch import scratch_settings

from mnistops import stack
from mnistops.clients import prefect_client
from mnistops.flows.deployment import JOB_VARIABLES
from mnistops.settings import Settings

BIN = Path(sys.executable).parent
ROUNDS = 3
WAYS = {
    "direct": "direct: mnistops train (whole command)",
    "flow": "flow: mnistops run --wait (whole command)",
    "supervised": "flow, Prefect's default start (its supervisor)",
}


def set_engine(settings: Settings, ours: bool) -> None:
    """The deployment's job variables: ours (the engine started directly), or none, as
    an older mnistops deployed it (Prefect's workspace supervisor starts the engine)."""
    from prefect.client.schemas.actions import DeploymentUpdate

    with prefect_client(settings) as client:
        deployment = client.read_deployment_by_name(settings.deployment.full_name)
        client.update_deployment(
            deployment.id, DeploymentUpdate(job_variables=JOB_VARIABLES if ours else {})
        )


def latest_run_start(settings: Settings) -> float:
    """When the newest MLflow run of the experiment started (seconds since the epoch)."""
    client = MlflowClient(settings.mlflow_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    latest = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    return latest.info.start_time / 1000


def cli(config: Path, *args: str, cwd: Path) -> float:
    began = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "mnistops"), "--config-dir", str(config), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"mnistops {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return elapsed


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-flow-") as tmp:
        root = Path(tmp)
        settings = scratch_settings(root)
        config = root / "config"
        os.environ.pop("PREFECT_API_URL", None)
        print("starting a stack, ingesting MNIST, publishing v1.0 ...", flush=True)
        stack.up(settings)
        try:
            for args in (("data", "ingest"), ("data", "version", "v1.0", "-m", "v1")):
                cli(config, *args, cwd=root)
            cli(config, "deploy", cwd=root)
            cli(config, "worker", "--detach", cwd=root)
            time.sleep(5)
            train = ("--data-version", "v1.0", "--epochs", "1")
            print("warming the array cache of v1.0 (a --fast run) ...", flush=True)
            cli(config, "train", "--data-version", "v1.0", "--fast", cwd=root)
            times: dict[str, list[float]] = {name: [] for name in WAYS}
            to_first_step: list[float] = []
            for round_ in range(1, ROUNDS + 1):
                for name in WAYS:
                    print(f"round {round_}: {name} ...", flush=True)
                    if name == "direct":
                        times[name].append(cli(config, "train", *train, cwd=root))
                        continue
                    set_engine(settings, name == "flow")
                    submitted = time.time()
                    times[name].append(cli(config, "run", *train, "--wait", cwd=root))
                    if name == "flow":
                        to_first_step.append(latest_run_start(settings) - submitted)
        finally:
            stack.down(settings)
    direct, flow = statistics.median(times["direct"]), statistics.median(times["flow"])
    added = flow - direct
    allowed = max(15.0, 0.10 * direct)
    print(f"\n{'medians of ' + str(ROUNDS) + ' rounds, seconds':<58}{'':>9}")
    for name, label in WAYS.items():
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"{label:<58}{statistics.median(times[name]):>9.1f}  ({runs})")
    first_step = statistics.median(to_first_step)
    print(f"{'flow: from mnistops run to the MLflow run':<58}{first_step:>9.1f}")
    print(
        f"\norchestration adds {added:.1f} s ({added / direct:.0%} of the direct run);"
        f" target at most {allowed:.0f} s: {'met' if added <= allowed else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
