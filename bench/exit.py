"""The end of a command: `mnistops` commands that skip the interpreter's teardown of
every imported module (`mnistops.compat.leave`) against the same commands ending the usual
way (the baseline, `leave` replaced by `sys.exit`), alternating, on one embedded stack of
its own (v1.0 --fast).

Commands: `data list` (no PyTorch), `predict IMG` with the champion cached, and a
`train` of one epoch on the --fast data (PyTorch, MLflow, torch.export). Each row: the
median wall time and CPU time (user + system) of --rounds runs of each way.
Usage: .venv/bin/python bench/exit.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
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
WAYS = {
    "leave (ours)": [str(BIN / "mnistops")],
    "sys.exit (baseline)": [
        sys.executable,
        "-c",
        "import sys; from mnistops import cli; cli.leave = sys.exit; cli.entry()",
    ],
}


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one run of `command`, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    rows: dict[str, dict[str, list[tuple[float, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-exit-") as tmp:
        root = Path(tmp)
        config = ["--config-dir", str(root / "config")]
        with stack_with_a_champion(root, [*WAYS["leave (ours)"], *config]) as settings:
            image = str(sorted((settings.mnist_dir / "test" / "7").glob("*.png"))[0])
            commands = {
                "data list": ["data", "list"],
                "predict IMG": ["predict", image],
                "train --epochs 1 --batch-size 16 (--fast data)": [
                    "train",
                    "--epochs",
                    "1",
                    "--batch-size",
                    "16",
                ],
            }
            for n in range(rounds):
                for label, args in commands.items():
                    for way, command in WAYS.items():
                        print(f"round {n + 1}: {way}: {label}", flush=True)
                        wall_cpu = timed([*command, *config, *args], root)
                        rows.setdefault(label, {}).setdefault(way, []).append(wall_cpu)
    native = "native bf16" if bf16_is_native() else "no native bf16"
    print(f"\n{cpu_name()} ({native}), {os.cpu_count()} cores; median of {rounds} rounds")
    for label, ways in rows.items():
        print(f"  {label}")
        for way, runs in ways.items():
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            print(f"    {way:<22} {wall:6.2f} s wall  {cpu:6.2f} s CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
