"""A TCP relay between one node and the engine's members, which a test can cut and heal.

Cut, it stops reading in both directions and keeps every connection open: what the node sends
waits in the kernel's buffers and nothing comes back, as across a partition (no RST, no FIN).
New connections are accepted and stall the same way. Healed, the bytes flow again. Loopback
only; every thread is a daemon and ends with :meth:`close`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class EngineProxy:
    def __init__(self, upstream: list[str]) -> None:
        self.cut = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.urls: list[str] = []
        for url in upstream:
            host, port = url.removeprefix("nats://").rsplit(":", 1)
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            self._track(listener)
            self.urls.append(f"nats://127.0.0.1:{listener.getsockname()[1]}")
            threading.Thread(target=self._accept, args=(listener, (host, int(port))), daemon=True).start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self, listener: socket.socket, upstream: tuple[str, int]) -> None:
        while not self._closed.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(upstream, timeout=2)
            except OSError:
                client.close()
                continue
            self._track(client)
            self._track(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.05)
        while not self._closed.is_set():
            if self.cut.is_set():
                self._closed.wait(0.05)      # not reading: the peer's sends pile up, as on a dead link
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def partitioned(self) -> Iterator[None]:
        self.cut.set()
        try:
            yield
        finally:
            self.cut.clear()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
