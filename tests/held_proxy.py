"""A TCP proxy in front of a server that holds one chosen request in flight, so that a
test can break the server at an exact point of a command's transfer, with no race: the
command is waiting on the server's answer when the server dies, whatever its speed.

Run as a script (`python held_proxy.py HOST PORT METHOD PATH_PART`: standard library
only) on another host of the network tests, it prints its URL, then `held`."""

from __future__ import annotations

import socket
import threading
from contextlib import suppress
from typing import Any


class HeldProxy:
    """Passes every byte on, both ways, until the first request whose first line starts
    with `method` and holds `path_part`: that request is never sent on (`held` is set),
    and its client waits. A connection ends when the server ends it (its process dies);
    a new one to a dead server is closed at once, as a refused connection would be."""

    def __init__(self, port: int, method: bytes, path_part: bytes, host: str = "127.0.0.1") -> None:
        self.upstream = (host, port)
        self.method, self.path_part = method, path_part
        self.held = threading.Event()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        with self.lock:
            self.sockets += [client, server]
        threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
        self._pipe(client, server, watch=True)

    def _holds(self, chunk: bytes) -> bool:
        """The first request of its kind (a chunk that starts with its request line)."""
        line = chunk.split(b"\r\n", 1)[0]
        if not (line.startswith(self.method) and self.path_part in line):
            return False
        with self.lock:
            first = not self.held.is_set()
            self.held.set()
            return first

    def _pipe(self, source: socket.socket, sink: socket.socket, watch: bool = False) -> None:
        with suppress(OSError):
            while chunk := source.recv(65536):
                if watch and self._holds(chunk):
                    return
                sink.sendall(chunk)
        if not watch:
            # the server ended the connection: so does its client's side
            with suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> HeldProxy:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with suppress(OSError):
                    sock.close()


def main(host: str, port: str, method: str, path_part: str) -> None:
    proxy = HeldProxy(int(port), f"{method} ".encode(), path_part.encode(), host=host)
    print(proxy.url, flush=True)
    proxy.held.wait()
    print("held", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:])
