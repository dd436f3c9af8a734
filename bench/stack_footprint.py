"""Idle memory of the stack: total RSS of every process it runs, after start-up.

Runs the stack as mnistops configures it, then the same three servers started
the way a tutorial does (default flags), each in a temp dir on free ports, and
prints both. Usage: .venv/bin/python bench/stack_footprint.py [--idle SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil
from scratch import scratch_settings

from mnistops import stack
from mnistops.credentials import ensure_keys
from mnistops.stack import process
from mnistops.stack.services import MLFLOW_SERVER_MODULE, all_services

MB = 1024 * 1024


def rss_by_service(records: list[process.ProcessRecord]) -> dict[str, tuple[int, int]]:
    """service -> (process count, total RSS bytes)"""
    result = {}
    for record in records:
        tree = process.process_tree(record)
        total = 0
        for proc in tree:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        result[record.name] = (len(tree), total)
    return result


def print_table(title: str, figures: dict[str, tuple[int, int]]) -> int:
    total = sum(rss for _, rss in figures.values())
    print(f"\n{title}")
    for name, (count, rss) in figures.items():
        print(f"  {name:<8} {count:>2} processes  {rss / MB:7.0f} MB")
    print(
        f"  {'total':<8} {sum(c for c, _ in figures.values()):>2} processes  {total / MB:7.0f} MB"
    )
    return total


def measure_mnistops(root: Path, idle_s: float) -> int:
    settings = scratch_settings(root)
    stack.up(settings)
    try:
        time.sleep(idle_s)
        records = [
            process.read_record(stack.run_dir(settings), n) for n in ("s3", "mlflow", "prefect")
        ]
        return print_table(
            "mnistops stack (as configured)", rss_by_service([r for r in records if r])
        )
    finally:
        stack.down(settings)


def baseline_command(name: str, command: list[str]) -> list[str]:
    """The tutorial's way: the servers' default flags, keeping only ports, dirs and keys."""
    if name == "s3":
        keep = (
            "-dir=",
            "-ip=",
            "-ip.bind=",
            "-s3.config=",
            "-s3.port=",
            "-master.port=",
            "-volume.port=",
            "-filer.port=",
        )
        # `weed mini`, SeaweedFS's one-command default, with only our ports, dirs and keys
        return [command[0], "mini"] + [arg for arg in command[1:] if arg.startswith(keep)]
    if name == "mlflow":
        dropped = {"--workers"}
        out, skip = [], False
        for arg in _as_mlflow_server(command):
            if skip:
                skip = False
                continue
            if arg in dropped:
                skip = True
                continue
            out.append(arg)
        return out
    return command


def _as_mlflow_server(command: list[str]) -> list[str]:
    """The command as `mlflow server` itself: MLflow's two processes, not our one."""
    at = command.index(MLFLOW_SERVER_MODULE)
    return [*command[:at], "mlflow", "server", *command[at + 1 :]]


def measure_baseline(root: Path, idle_s: float) -> int:
    settings = scratch_settings(root)
    keys = ensure_keys(settings.home)
    records = []
    try:
        for svc in all_services(settings, keys):
            svc.prepare()
            env = dict(svc.env)
            env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)
            records.append(
                process.start(
                    svc.name,
                    baseline_command(svc.name, svc.command),
                    env,
                    stack.run_dir(settings),
                    stack.log_dir(settings),
                    svc.url,
                )
            )
            deadline = time.monotonic() + svc.start_timeout_s
            while not svc.healthy() and time.monotonic() < deadline:
                time.sleep(0.5)
        time.sleep(idle_s)
        return print_table("baseline (default server flags)", rss_by_service(records))
    finally:
        for record in records:
            process.stop(record, stack.run_dir(settings))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds idle before measuring")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as ours:
        total = measure_mnistops(Path(ours), args.idle)
    if not args.no_baseline:
        with tempfile.TemporaryDirectory() as base:
            baseline = measure_baseline(Path(base), args.idle)
        print(
            f"\nmnistops uses {total / MB:.0f} MB, baseline {baseline / MB:.0f} MB "
            f"({baseline / max(total, 1):.1f}x). Target: <= 1024 MB."
        )
    return 0 if total <= 1024 * MB else 1


if __name__ == "__main__":
    sys.exit(main())
