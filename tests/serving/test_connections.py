"""The service's connection rules on a small scale: past the cap a new connection is
closed at once while the open ones are answered; a kept-alive connection gets a fresh
deadline after each answer; a slow answer is never cut. (The 5,000-connection case runs
against the real service in test_serve.py.)"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from mnistops.serving.connections import bounded_protocol, connection_cap
from mnistops.serving.metrics import Metrics
from mnistops.stack.ports import free_port_pair

pytestmark = [pytest.mark.integration, pytest.mark.security]

CAP = 16
TIMEOUT_S = 1.0


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    """Answers `ok`; `/slow` takes twice the request deadline to answer."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":
        await asyncio.sleep(TIMEOUT_S * 2)
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, Metrics]]:
    metrics = Metrics()
    port = free_port_pair()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=bounded_protocol(TIMEOUT_S, CAP, metrics),
        timeout_keep_alive=30,
    )
    served = uvicorn.Server(config)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not served.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port, metrics
    served.should_exit = True
    thread.join(10)


def request(sock: socket.socket, path: str = "/") -> bytes:
    """One request on a kept-alive connection; the whole answer."""
    return send(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def send(sock: socket.socket, whole_request: bytes) -> bytes:
    """Send a request in one write; its whole answer (until `ok` or the server closes)."""
    sock.sendall(whole_request)
    answer = b""
    while not answer.endswith(b"\r\n\r\nok"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_past_the_cap_a_connection_is_closed_and_the_open_ones_answered(server) -> None:
    port, metrics = server
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(CAP)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        began = time.monotonic()
        assert closed_by_server(extra, 2.0), "a connection past the cap stays open"
        assert time.monotonic() - began < 1.0
        assert metrics.connections_refused >= 1
        assert b"200 OK" in request(held[0]), "an open connection is answered"
    finally:
        for sock in held:
            sock.close()


def test_a_kept_alive_connection_gets_a_new_deadline_and_slow_answers_stand(server) -> None:
    port, metrics = server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(3):  # three requests, 0.7 s apart: 2.1 s in all, each within 1 s
            time.sleep(TIMEOUT_S * 0.7)
            assert b"200 OK" in request(sock)
        assert b"200 OK" in request(sock, "/slow"), "the time to answer never counts"
        before = metrics.connections_timed_out
        sock.sendall(b"GET / HTTP/1.1\r\nHost")  # and never the rest
        assert closed_by_server(sock, TIMEOUT_S * 3)
        assert metrics.connections_timed_out == before + 1


def test_the_cap_stays_below_the_file_limit() -> None:
    assert connection_cap(10_000, 20_000) == 10_000
    assert connection_cap(10_000, 1_024) == 1_024 - 256
    assert connection_cap(10_000, 100) == 16


def test_headers_past_64_kib_are_cut(server) -> None:
    port, _metrics = server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (200 * 1024))
        assert closed_by_server(sock, 2.0), "a 200 KiB header is not held in memory"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        assert b"200 OK" in request(sock), "ordinary requests are answered"


def test_a_whole_large_request_in_one_read_is_answered(server) -> None:
    """A request of headers and a body of 65-255 KiB that arrives in one read (one read
    takes up to 256 KiB) is a body, not headers past 64 KiB: /predict's JSON batches are
    this large."""
    port, _metrics = server
    for size in range(65, 260, 5):
        body = b"0" * (size * 1024)
        head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            answer = send(sock, head + body)
        assert b"200 OK" in answer, "a large request was cut as if its headers were"
