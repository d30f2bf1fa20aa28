"""
An echo upstream built on Autobahn itself, the reference implementation
behind Autobahn|Testsuite, for the conformance tests
(tests/integration/test_conformance.py).

Run it as ``python -m support.autobahn_echo`` (from tests/) or by path: it
listens on 127.0.0.1, port 0, and prints the bound port on stdout as its
first line. Nothing here imports wsgateway.

Every connection echoes each message with the same type (text or binary) as
one frame. The factory keeps Autobahn's defaults for everything it checks
(masking required, RSV bits, opcodes, control frames, fragmentation, close
codes, ``utf8validateIncoming`` on, no size limit, no extension), with two
settings changed so that the client of the gateway can see the verdicts:

- ``failByDrop = False``: a connection Autobahn fails gets a close frame
  with its code (1002, 1007...) instead of a TCP drop. A request path under
  ``/drop/`` keeps Autobahn's default ``failByDrop = True``.
- ``echoCloseCodeReason = True``: a close frame is answered with the same
  code and reason (Autobahn's default answers 1000), so a client can see that
  its close travelled through the gateway unchanged.

What each connection received is recorded by request path; a WebSocket to
``/_seen/PATH`` gets it as one JSON text message:
``{"messages": [[binary, length, sha256-hex], ...], "close": [code, reason],
"clean": bool}`` (``close`` and ``clean`` are null while it is open), or
``null`` for a path never seen.

The pytest fixture ``autobahn_echo`` (module scope) runs it as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEEN_PREFIX = "/_seen"


def _serve() -> None:
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor

    seen: dict[str, dict[str, Any]] = {}

    class Echo(WebSocketServerProtocol):
        path = ""
        record: dict[str, Any] | None = None

        def onConnect(self, request: Any) -> None:
            self.path = request.path
            if self.path.startswith("/drop/"):
                self.failByDrop = True  # Autobahn's own default: fail by dropping TCP
            if not self.path.startswith(SEEN_PREFIX):
                self.record = seen.setdefault(self.path, {"messages": [], "close": None, "clean": None})
            return None  # accept, no subprotocol

        def onOpen(self) -> None:
            if self.path.startswith(SEEN_PREFIX):
                asked = self.path[len(SEEN_PREFIX):]
                self.sendMessage(json.dumps(seen.get(asked)).encode(), isBinary=False)
                self.sendClose(1000)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            if self.record is not None:
                self.record["messages"].append([isBinary, len(payload), hashlib.sha256(payload).hexdigest()])
            self.sendMessage(payload, isBinary)

        def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
            if self.record is not None:
                self.record["close"] = [code, reason]
                self.record["clean"] = wasClean

    factory = WebSocketServerFactory()
    factory.protocol = Echo
    factory.setProtocolOptions(failByDrop=False, echoCloseCodeReason=True, webStatus=False)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    sys.stdout.write(f"{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


@dataclass
class AutobahnEcho:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def node(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_autobahn_echo(stderr_path: Path | None = None, timeout: float = 15.0) -> AutobahnEcho:
    """Run this file in a subprocess and read its port (its first stdout line)."""
    from support.tiers import require_integration

    require_integration("the Autobahn echo upstream")
    err = open(stderr_path, "wb") if stderr_path is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL
        )
    finally:
        if stderr_path is not None:
            err.close()  # type: ignore[union-attr]
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait(5)
            raise RuntimeError(f"the Autobahn echo upstream printed no port (got {line!r}, exit {proc.returncode})")
        if select.select([proc.stdout], [], [], min(left, 0.2))[0]:
            chunk = os.read(proc.stdout.fileno(), 64)
            if not chunk:
                continue
            line += chunk
    return AutobahnEcho(port=int(line.strip()), proc=proc)


if __name__ != "__main__":  # the server itself needs no pytest
    import pytest

    @pytest.fixture(scope="module")
    def autobahn_echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AutobahnEcho]:
        """The Autobahn echo upstream, one process per test module, killed at its end."""
        echo = start_autobahn_echo(tmp_path_factory.mktemp("autobahn") / "autobahn-echo.stderr")
        yield echo
        echo.stop()


if __name__ == "__main__":
    _serve()
