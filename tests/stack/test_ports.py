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


def test_workers_choose_in_lanes_that_never_meet_and_a_process_never_twice(
    tmp_path: Path,
) -> None:
    """Two test workers configure stacks at once: each chooses in its own lane; one
    process never hands out a port it chose before (its stack may not be up yet)."""
    from mnistops.stack import ports

    lanes = [ports.lane_range((i, 4)) for i in range(4)]
    for (_a, a_last), (b_first, _b) in zip(lanes, lanes[1:], strict=False):
        assert a_last < b_first
    chosen = [ports.free_port_config(tmp_path, lane=(1, 4)) for _ in range(20)]
    flat = [p for c in chosen for p in (*c["s3"].values(), c["mlflow"]["port"])]
    assert len(set(flat)) == len(flat)
    assert all(lanes[1][0] <= p <= lanes[1][1] for p in flat)
