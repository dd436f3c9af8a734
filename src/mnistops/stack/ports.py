"""Free ports for a throwaway stack (tests, benchmarks, a second stack beside the first)."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

GRPC_OFFSET = 10000


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def accepts_connections(host: str, port: int) -> bool:
    """Whether a server accepts connections on the port. A connection attempt, not a look
    at the socket table: that needs every process's file descriptors, which a container
    may not show."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (Linux; the usual default
    elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _candidate_range() -> tuple[int, int]:
    """Ports p with p and p + GRPC_OFFSET both below the ephemeral range: a port that is free
    now can otherwise be taken by any outgoing connection before the server binds it."""
    low, _high = _ephemeral_range()
    top = low - 1 - GRPC_OFFSET
    return (max(10000, top - 8000), top) if top - 10000 >= 2000 else (20000, 30000)


HANDED_OUT: set[int] = set()
"""ports this process chose already: a stack configured but not started yet holds none"""
DEFAULT_LANE: tuple[int, int] | None = None
"""the lane of every choice of this process (the test suite sets each worker's own)"""


def lane_range(lane: tuple[int, int] | None) -> tuple[int, int]:
    """The candidate ports, or the `index`-th of `count` equal parts of them: processes
    that choose ports at once (test workers) each in their own part never choose the same
    port, though neither has started its servers yet."""
    first, last = _candidate_range()
    if lane is None:
        return first, last
    index, count = lane
    span = (last - first + 1) // count
    return first + index * span, first + (index + 1) * span - 1


def free_port_pair(host: str = "127.0.0.1", lane: tuple[int, int] | None = None) -> int:
    """A port p such that p and p + 10000 (the gRPC twin SeaweedFS uses) are both free,
    and neither chosen before by this process."""
    first, last = lane_range(lane or DEFAULT_LANE)
    for _ in range(500):
        port = random.randint(first, last)
        pair = {port, port + GRPC_OFFSET}
        if not pair & HANDED_OUT and not any(port_in_use(host, p) for p in pair):
            HANDED_OUT.update(pair)
            return port
    raise RuntimeError(f"no free pair of ports p, p + {GRPC_OFFSET} found for p in {first}-{last}")


def free_port_config(root: Path, lane: tuple[int, int] | None = None) -> dict[str, Any]:
    """Stack settings (as in stack.yml) with the state in `root` and every port free
    (within `lane`: see lane_range)."""

    def pick() -> int:
        return free_port_pair(lane=lane)

    return {
        "home": str(root / ".mnistops"),
        "data_dir": str(root / "data"),
        "s3": {name: pick() for name in ("port", "master_port", "volume_port", "filer_port")},
        "mlflow": {"port": pick()},
        "prefect": {"port": pick()},
        "serve": {"port": pick()},
    }
