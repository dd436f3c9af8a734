"""Where a command's processor time goes: every process on the machine read from /proc
twice a second while the command runs, summed by kind (the flow runs, each server, the
`mnistops` commands, the pytest workers...).

Usage: .venv/bin/python bench/process_cpu.py [--by-test-file N] -- bash .ci/run
A process that lives less than half a second may be missed; the figure is a floor.
The README's per-group figures of the suite came from this sampling.

--by-test-file N also prints the N largest sums by test file and kind: a process counts
for the test that was running when it started (PYTEST_CURRENT_TEST in its environment),
or, for one started outside any test's environment (a flow run a Prefect worker
started, a service on a host made of a network namespace), for the pytest temp folder
its environment, command line or working dir names (`@folder`); `-` when neither.
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


TEMP_FOLDER = re.compile(rb"pytest-\d+/popen-gw\d+/([A-Za-z_]+)")


def test_of(pid: str, command: str) -> str:
    """The test file whose test started the process, or the pytest temp folder it uses."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd").encode()
    except OSError:
        return "-"
    for entry in env:
        if entry.startswith(b"PYTEST_CURRENT_TEST="):
            return entry.partition(b"=")[2].decode(errors="replace").split("::")[0]
    found = TEMP_FOLDER.search(b" ".join([*env, command.encode(), cwd]))
    return f"@{found.group(1).decode()}" if found else "-"


def sample(seen: dict[str, list]) -> None:
    """pid+start time -> [command, CPU seconds so far, test file]"""
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
                    command = f.read().replace(b"\0", b" ").decode(errors="replace")
                seen[key] = [command, cpu, test_of(pid, command)]
            seen[key][1] = cpu
        except (OSError, IndexError, ValueError):
            continue


def main() -> int:
    if "--" not in sys.argv:
        print(__doc__)
        return 2
    options = sys.argv[1 : sys.argv.index("--")]
    by_test = int(options[1]) if options[:1] == ["--by-test-file"] and len(options) == 2 else 0
    command = sys.argv[sys.argv.index("--") + 1 :]
    seen: dict[str, list] = {}
    sample(seen)
    before = {key: cpu for key, (_c, cpu, _t) in seen.items()}
    began = time.monotonic()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(seen)
        time.sleep(0.5)
    sample(seen)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    tests: dict[tuple[str, str], float] = defaultdict(float)
    for key, (cmd, cpu, test) in seen.items():
        used = cpu - before.get(key, 0.0)
        if used > 0:
            totals[kind(cmd)][0] += used
            totals[kind(cmd)][1] += 1
            tests[(test, kind(cmd))] += used
    print(f"\n{time.monotonic() - began:.0f} s of wall time; CPU seconds by kind of process:")
    for name, (cpu, count) in sorted(totals.items(), key=lambda item: -item[1][0]):
        print(f"  {cpu:8.1f}  {int(count):4d}  {name}")
    print(f"  {sum(c for c, _n in totals.values()):8.1f}        in all")
    if by_test:
        print(f"\nthe {by_test} largest by test file (or pytest temp folder) and kind:")
        for (test, name), cpu in sorted(tests.items(), key=lambda item: -item[1])[:by_test]:
            print(f"  {cpu:8.1f}  {test}  {name}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
