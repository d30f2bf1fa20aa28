"""
The upstream of the at-least-once tests (tests/integration/test_durable*.py):
an echo server on a fixed port that can vanish without a close and come
back, recording each leg's headers and messages; and their gateway INI.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from support.gateway import free_port


@dataclass
class Leg:
    headers: dict[str, str]
    path: str = ""
    messages: list[Any] = field(default_factory=list)


class Backend:
    """An echo upstream on a fixed port that can vanish (RST, no close) and come back."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.legs: list[Leg] = []
        self.server: Any = None
        self.lock = threading.Lock()

    @property
    def node(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> Backend:
        def handler(ws: ServerConnection) -> None:
            leg = Leg({k.lower(): v for k, v in ws.request.headers.raw_items()}, ws.request.path)
            with self.lock:
                self.legs.append(leg)
            try:
                for msg in ws:
                    leg.messages.append(msg)
                    if leg.headers.get("x-wsgateway-replay") != "1":
                        ws.send(msg)
            except ConnectionClosed:
                pass

        self.server = serve(handler, "127.0.0.1", self.port, compression=None, max_size=None)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def vanish(self) -> None:
        """Stop listening and reset every connection: no close frame, no FIN."""
        server, self.server = self.server, None
        server.socket.shutdown(socket.SHUT_RDWR)
        for conn in list(server.connections):
            reset(conn.socket)
        server.shutdown()

    def delivered(self) -> dict[str, list[tuple[int, Any]]]:
        """conn id -> [(seq, message)] in the order received, duplicates included."""
        out: dict[str, list[tuple[int, Any]]] = {}
        with self.lock:
            legs = list(self.legs)
        for leg in legs:
            conn, seq = leg.headers.get("x-wsgateway-conn-id"), leg.headers.get("x-wsgateway-seq")
            assert conn and seq, leg.headers
            out.setdefault(conn, []).extend((int(seq) + i, m) for i, m in enumerate(leg.messages))
        return out


def reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass


def ini(node: str, *, extra: str = "", route: str = "", limits: str = "ping_interval = 0") -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [limits]
        {limits}

        [log]
        level = info
        format = text

        [queue]
        path = q.sqlite

        [upstream:backend]
        nodes = {node}
        connect_timeout = 1
        retries = 1
        backoff_initial = 0.05
        backoff_max = 0.2

        [route:main]
        path = /**
        upstream = backend
        delivery = at_least_once
        {route}
        {extra}
        """
