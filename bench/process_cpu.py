"""Where a command's processor time goes: every process on the machine read from /proc
twice a second while the command runs, summed by kind (the flow runs, each server, the
`mnistops` commands, the pytest workers...).

Usage: .venv/bin/python bench/process_cpu.py -- bash .ci/run
A process that lives less than half a second may be missed; the figure is a floor.
The README's per-group figures of the suite came from this sampling.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import defaultdict

TICK = os.sysconf("SC_CLK_TCK")
KINDS = (
    ("weed", r"/weed "),
    ("MLflow server", r"mlflow server|mnistops\.stack\.mlflow_server|mlflow\.server\.fastapi_app"),
    ("Prefect server", r"prefect server start"),
    ("Prefect worker", r"prefect worker start"),
    ("flow run", r"prefect\.engine"),
    ("pytest worker", r"-m pytest|exec\(eval\(sys\.stdin"),
    ("chromium", r"chrom"),
    ("postgres", r"postgres"),
)


def kind(command: str) -> str:
    for name, pattern in KINDS:
        if re.search(pattern, command):
            return name
    found = re.search(r"-m mnistops (?:--config-dir \S+ )?([a-z-]+)", command)
    if found:
        return f"mnistops {found.group(1)}"
    return "other"


def sample(seen: dict[str, list]) -> None:
    """pid+start time -> [command, CPU seconds so far]"""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            cpu = (int(fields[11]) + int(fields[12])) / TICK
            key = f"{pid}:{fields[19]}"
            if key not in seen:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    seen[key] = [f.read().replace(b"\0", b" ").decode(errors="replace"), cpu]
            seen[key][1] = cpu
        except (OSError, IndexError, ValueError):
            continue


def main() -> int:
    if "--" not in sys.argv:
        print(__doc__)
        return 2
    command = sys.argv[sys.argv.index("--") + 1 :]
    seen: dict[str, list] = {}
    sample(seen)
    before = {key: cpu for key, (_c, cpu) in seen.items()}
    began = time.monotonic()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(seen)
        time.sleep(0.5)
    sample(seen)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for key, (cmd, cpu) in seen.items():
        used = cpu - before.get(key, 0.0)
        if used > 0:
            totals[kind(cmd)][0] += used
            totals[kind(cmd)][1] += 1
    print(f"\n{time.monotonic() - began:.0f} s of wall time; CPU seconds by kind of process:")
    for name, (cpu, count) in sorted(totals.items(), key=lambda item: -item[1][0]):
        print(f"  {cpu:8.1f}  {int(count):4d}  {name}")
    print(f"  {sum(c for c, _n in totals.values()):8.1f}        in all")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
