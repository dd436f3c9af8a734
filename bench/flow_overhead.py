"""What Prefect orchestration adds to a retraining: a flow run against the same training
called directly, on one embedded stack, in one run.

  direct: `mnistops train --data-version v1.0 --epochs 1` (the CLI, the same functions);
  flow:   `mnistops run --data-version v1.0 --epochs 1 --wait` with a worker already
          running (`mnistops worker --detach`), measured to the end of the flow run.
Both train digitnet for one epoch on v1.0 (30,000 training images, the full MNIST test
set), after a `--fast` run has decoded v1.0 into the array cache, so both start warm.
Also printed: the time from `mnistops run` to the start of the MLflow run, i.e.
to the first training step. Target: the flow adds at most max(15 s, 10 % of the run).
Usage: .venv/bin/python bench/flow_overhead.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from scratch import scratch_settings

from mnistops import stack

BIN = Path(sys.executable).parent


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
            print("direct: mnistops train ...", flush=True)
            direct = cli(config, "train", *train, cwd=root)
            print("flow: mnistops run --wait ...", flush=True)
            submitted = time.time()
            flow = cli(config, "run", *train, "--wait", cwd=root)
            client = MlflowClient(settings.mlflow_uri)
            experiment = client.get_experiment_by_name(settings.experiment_name)
            latest = client.search_runs(
                [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
            )[0]
            to_first_step = latest.info.start_time / 1000 - submitted
        finally:
            stack.down(settings)
    added = flow - direct
    allowed = max(15.0, 0.10 * direct)
    print(f"\n{'':<44}{'seconds':>9}")
    print(f"{'direct: mnistops train (whole command)':<44}{direct:>9.1f}")
    print(f"{'flow: mnistops run --wait (whole command)':<44}{flow:>9.1f}")
    print(f"{'flow: from mnistops run to the MLflow run':<44}{to_first_step:>9.1f}")
    print(
        f"\norchestration adds {added:.1f} s ({added / direct:.0%} of the direct run);"
        f" target at most {allowed:.0f} s: {'met' if added <= allowed else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
