"""
A TLS context for ``websockets``' sync client that does not lose its first write.

websockets' sync client reads in a thread of its own and writes from the
caller's: two threads in one OpenSSL ``SSL`` object, which OpenSSL does not
allow (openssl/openssl#20446). Under TLS 1.3 the server's session tickets
arrive after the handshake; when the reading thread's ``SSL_read`` takes
them while the caller's ``SSL_write`` sends the upgrade request, the request
can vanish: the server completes TLS and then never receives a byte
(python/cpython#137583, python-websockets/websockets#1648; stomp.py#450 saw
the same). Here it made about one wss connection in 150 hang until the
gateway's ``handshake_timeout``, in bursts of connections on a busy machine.

``drained(ctx)`` wraps the socket as ``ctx`` would, then reads the
post-handshake messages in the caller's thread before websockets starts its
reader, so that thread only ever meets application data.
"""

from __future__ import annotations

import select
import socket
import ssl
from typing import Any

# How long the server's tickets may take after the handshake (a busy
# machine), and how long to wait for a second batch once one came.
_FIRST = 2.0
_MORE = 0.01


class _Drained:
    """What websockets uses of an ``ssl.SSLContext``: ``wrap_socket``."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx

    def wrap_socket(self, sock: socket.socket, **kwargs: Any) -> ssl.SSLSocket:
        tls = self._ctx.wrap_socket(sock, **kwargs)
        if tls.version() == "TLSv1.3":
            _read_tickets(tls)
        return tls


def _read_tickets(tls: ssl.SSLSocket) -> None:
    timeout = tls.gettimeout()
    wait = _FIRST
    try:
        while select.select([tls], [], [], wait)[0]:
            tls.setblocking(False)
            try:
                data = tls.recv(1)
            except ssl.SSLWantReadError:
                wait = _MORE  # the tickets are taken; another batch may follow
                continue
            finally:
                tls.settimeout(timeout)
            # the server spoke first (or closed): not a WebSocket server's way
            raise ConnectionError(f"TLS server sent {data!r} before the request")
    finally:
        tls.settimeout(timeout)


def drained(ctx: ssl.SSLContext) -> Any:
    """``ctx``, for ``websockets.sync.client.connect(ssl=...)``, minus the race above."""
    return _Drained(ctx)
