"""Slow and surplus connections cut, so a few clients cannot hold the service.

uvicorn times out an idle keep-alive connection, but not one that sends its headers or
body slowly, or never: 1,000 such connections stay open as long as their client likes
(a slowloris). Its HTTP protocol is extended here (uvicorn takes a protocol class as
`http=`; the class it extends is uvicorn's own httptools protocol):

- a request must arrive whole (headers and body) within `serve.request_timeout_s` of the
  connection, or of the previous answer on a kept-alive connection; else the connection
  is closed. The time the model takes to answer does not count;
- headers of more than 64 KiB are cut too (httptools sets no limit of its own);
- at most `serve.max_connections` connections are open (kept below the process's file
  limit); past that a new connection is closed at once, and the open ones are answered.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

from mnistops.compat import uvicorn_http_protocol
from mnistops.serving.metrics import Metrics

MAX_HEADER_BYTES = 64 * 1024
"""a request whose headers take more is cut (httptools sets no limit of its own)"""
FILES_KEPT_FREE = 256
"""file descriptors left for the model, logs, the registry's downloads and the loop"""


def raise_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int, file_limit: int) -> int:
    """`wanted`, but below the file limit with room for everything else."""
    return max(16, min(wanted, file_limit - FILES_KEPT_FREE))


_UVICORN_HTTP: Any = uvicorn_http_protocol()


class BoundedHttp(_UVICORN_HTTP):  # type: ignore[misc]  # uvicorn's class, checked by compat
    """uvicorn's httptools protocol with a deadline per request and a connection cap;
    `bounded_protocol` sets the three class attributes."""

    timeout_s: float = 5.0
    max_connections: int = 10_000
    counters: Metrics

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = True
        self._header_bytes = 0
        self._headers_done = 0

    def data_received(self, data: bytes) -> None:
        counting, done = self._in_headers, self._headers_done
        super().data_received(data)
        # still in the headers of the same request: a read that held a whole request
        # (headers, body and all) leaves `_in_headers` set for the next one
        if counting and self._in_headers and self._headers_done == done:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self.counters.connections_timed_out += 1
                self.transport.abort()

    def on_headers_complete(self) -> None:
        self._in_headers, self._header_bytes = False, 0
        self._headers_done += 1
        super().on_headers_complete()

    def connection_made(self, transport: asyncio.Transport) -> None:
        full = len(self.connections) >= self.max_connections
        super().connection_made(transport)
        if full:
            self.counters.connections_refused += 1
            transport.abort()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_complete(self) -> None:
        self._disarm()  # the request is whole: answering it takes what it takes
        self._in_headers = True  # what comes next on this connection is a new request
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection has its own deadline

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            return  # the last request arrived whole (pipelined) and is being answered
        if not self.transport.is_closing():
            self.counters.connections_timed_out += 1
            self.transport.abort()


def bounded_protocol(timeout_s: float, max_connections: int, counters: Metrics) -> type:
    """The protocol class for uvicorn's `http=`, with these bounds and counters."""
    return type(
        "Bounded",
        (BoundedHttp,),
        {"timeout_s": timeout_s, "max_connections": max_connections, "counters": counters},
    )
