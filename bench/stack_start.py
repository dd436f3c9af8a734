"""`stack up` of a new state dir: its Prefect database copied from the migrated one in the
user's cache, against Prefect migrating a new database itself (the baseline: the cache
pointed at a path that cannot be a folder), in alternating rounds, each on a new state
dir and free ports. Prints the wall time of `stack up` and the Prefect server's CPU
seconds when it answered. The cached database is made first, outside the rounds.

Usage: .venv/bin/python bench/stack_start.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil
from drift import cpu_name
from scratch import scratch_settings

from mnistops import stack
from mnistops.stack import prefect_db, process


def one_start(with_template: bool) -> tuple[float, float]:
    """(seconds of `stack up`, the Prefect server's CPU seconds then)."""
    saved = os.environ.get("XDG_CACHE_HOME")
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        if not with_template:
            blocker = Path(tmp) / "not-a-folder"
            blocker.write_text("")
            os.environ["XDG_CACHE_HOME"] = str(blocker)
        settings = scratch_settings(Path(tmp))
        began = time.perf_counter()
        try:
            stack.up(settings)
            took = time.perf_counter() - began
            record = process.read_record(stack.run_dir(settings), "prefect")
            assert record is not None
            times = psutil.Process(record.pid).cpu_times()
            return took, times.user + times.system
        finally:
            stack.down(settings)
            if saved is None:
                os.environ.pop("XDG_CACHE_HOME", None)
            else:
                os.environ["XDG_CACHE_HOME"] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    if not prefect_db.owned_privately(prefect_db.template_path()):
        print("making the cached Prefect database (once per machine and Prefect version)")
        one_start(True)
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for n in range(rounds):
        for with_template in (False, True):
            runs[with_template].append(one_start(with_template))
            took, cpu = runs[with_template][-1]
            label = "copied database" if with_template else "Prefect migrates"
            print(f"round {n + 1}: {label:<17} stack up {took:5.1f} s, Prefect CPU {cpu:5.1f} s")
    print(f"\n{cpu_name()}, {os.cpu_count()} cores; medians of {rounds} rounds")
    for with_template, label in ((False, "Prefect migrates"), (True, "copied database")):
        took = statistics.median(t for t, _ in runs[with_template])
        cpu = statistics.median(c for _, c in runs[with_template])
        print(f"  {label:<17} stack up {took:5.1f} s, Prefect server CPU {cpu:5.1f} s")


if __name__ == "__main__":
    main()
