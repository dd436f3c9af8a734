"""Free ports for a throwaway stack (tests, benchmarks, a second stack beside the first)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

GRPC_OFFSET = 10000


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port_pair(taken: set[int], host: str = "127.0.0.1") -> int:
    """A port p such that p and p + 10000 (the gRPC twin SeaweedFS uses) are both free."""
    for _ in range(500):
        port = random.randint(20000, 30000)
        pair = {port, port + GRPC_OFFSET}
        if not pair & taken and not any(port_in_use(host, p) for p in pair):
            taken.update(pair)
            return port
    raise RuntimeError("no free pair of ports found in 20000-40000")


def free_port_config(root: Path) -> dict:
    """Stack settings (as in stack.yml) with the state in `root` and every port free."""
    taken: set[int] = set()
    return {
        "home": str(root / ".mnistops"),
        "data_dir": str(root / "data"),
        "s3": {
            name: free_port_pair(taken)
            for name in ("port", "master_port", "volume_port", "filer_port", "admin_port")
        },
        "mlflow": {"port": free_port_pair(taken)},
        "prefect": {"port": free_port_pair(taken)},
    }
