"""The prediction log's writer process on its own: what it is given, and what it takes
again after a failed write. No object store: its endpoint is a closed port."""

from __future__ import annotations

import pytest

from mnistops.credentials import S3Keys
from mnistops.loop.log_process import StoreAccess, WriterProcess

pytestmark = pytest.mark.unit


def access(secret: str = "s3-secret-value") -> StoreAccess:
    return StoreAccess(
        endpoint_url="http://127.0.0.1:1",
        region="us-east-1",
        keys=S3Keys("key-id", secret),
        bucket="dvc",
        log_key=b"log-key-bytes-never-shown",
    )


def test_the_store_access_shows_no_secret() -> None:
    shown = repr(access())
    assert "s3-secret-value" not in shown and "log-key-bytes" not in shown
    assert "127.0.0.1:1" in shown


def test_a_failed_write_takes_the_access_again() -> None:
    """Keys read again after a failure: a regenerated key file needs no restart."""
    given: list[StoreAccess] = []

    def fresh() -> StoreAccess:
        given.append(access(f"secret-{len(given)}"))
        return given[-1]

    writer = WriterProcess(fresh)
    try:
        writer.start()
        assert len(given) == 1
        for attempt in (1, 2):
            with pytest.raises(RuntimeError):
                writer.call(("retain", 30))
            assert len(given) == attempt  # taken again before the next call, not now
        assert writer.proc is not None and writer.proc.poll() is None  # one process
    finally:
        writer.stop()
