"""A ``websockets`` client whose messages a thread collects (channels and workers tests)."""

from __future__ import annotations

import threading
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect


class Listener:
    """A websockets client whose messages a thread collects."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.ws: ClientConnection = connect(url, open_timeout=10, **kwargs)
        self.got: list[Any] = []
        self.closed: tuple[int, str] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for msg in self.ws:
                self.got.append(msg)
        except ConnectionClosed:
            pass
        rcvd = self.ws.protocol.close_rcvd
        self.closed = (rcvd.code, rcvd.reason) if rcvd is not None else (1006, "")
