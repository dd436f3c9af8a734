"""Ports for throwaway stacks: free now, and out of the kernel's reach until bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnistops.stack.ports import GRPC_OFFSET, _ephemeral_range, free_port_config

pytestmark = pytest.mark.unit


def test_ports_and_their_grpc_twins_avoid_the_ephemeral_range(tmp_path: Path) -> None:
    """An outgoing connection may take any free port of the ephemeral range as its own
    end, between the moment a port is picked and the moment SeaweedFS binds it."""
    low, _high = _ephemeral_range()
    config = free_port_config(tmp_path)
    ports = [*config["s3"].values(), config["mlflow"]["port"], config["prefect"]["port"]]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert port + GRPC_OFFSET < low, (port, low)
    twins = {p + GRPC_OFFSET for p in ports}
    assert not twins & set(ports)
