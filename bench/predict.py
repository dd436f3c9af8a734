"""`mnistops predict IMG`: seconds end to end for one image with the champion cached,
on one embedded stack of its own (v1.0 --fast, one --fast training).

Beside it, in the same run, what it no longer pays:
  torch:    the CLI and `import torch`: the least a prediction run by PyTorch costs (the
            model now runs in ONNX Runtime on the graph checked at registration, NumPy
            where that is missing, `train.runtime`)
  before:   importing what `predict` imported to read the champion alias through MLflow's
            client (`mnistops.tracking.registry`: MLflow and torch), on
            top of the CLI: the cost of the old path's imports alone
Each row is the median of --runs (5) runs, after one warm-up run that downloads the
champion into this machine's cache. Goal (issue: fast where users wait): 1.5 s.
Usage: .venv/bin/python bench/predict.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from drift import cpu_name
from scratch import stack_with_a_champion

from mnistops.compat import bf16_is_native

BIN = Path(sys.executable).parent


def seconds(command: list[str], cwd: Path, runs: int) -> float:
    """The median wall time of `command` over `runs` runs (each must succeed)."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - began)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        mnistops = [str(BIN / "mnistops"), "--config-dir", str(root / "config")]
        with stack_with_a_champion(root, mnistops) as settings:
            image = sorted((settings.mnist_dir / "test" / "7").glob("*.png"))[0]
            predict = [*mnistops, "predict", str(image)]
            seconds(predict, root, 1)
            python = [sys.executable, "-c"]
            rows = {
                "mnistops predict IMG (champion cached)": seconds(predict, root, runs),
                "torch: the CLI + import torch": seconds(
                    [*python, "import mnistops.cli, torch"], root, runs
                ),
                "before: the CLI + the MLflow-client path's imports": seconds(
                    [*python, "import mnistops.cli, mnistops.tracking.registry"], root, runs
                ),
            }
    native = "native bf16" if bf16_is_native() else "no native bf16"
    print(f"\n{cpu_name()} ({native}), {os.cpu_count()} cores; median of {runs} runs")
    for label, value in rows.items():
        print(f"  {label:<52} {value:5.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
